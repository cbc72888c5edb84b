"""The README's command sequence, as a new user runs it, on tiny settings: prepare -> folds -> two folds (fold 0,
then 0..1: fold 0 skipped, fold 1 trained) -> a variant with overrides and its own name -> leaderboard -> blend ->
plots -> tune (2 trials) -> rerank -> holdout -> inference -> holdout score. Every command must succeed and no output
may hold a traceback. Runs in a scratch folder (the README's relative paths: input/, folds/, oof/, models/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from ..conftest import REPO, TINY

CONFIG = str(REPO / "configs" / "glyphs_arcface.yaml")
SMALL = [*TINY, "train.epochs=1", "train.limit_train_batches=4"]

pytestmark = pytest.mark.slow


def _run(cwd: Path, *cmd: str) -> str:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    if cmd[0] == "python":
        cmd = (sys.executable, *cmd[1:])
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    text = out.stdout + out.stderr
    assert out.returncode == 0, f"{' '.join(cmd)} -> {out.returncode}\n{text[-4000:]}"
    assert "Traceback" not in text, f"{' '.join(cmd)}\n{text[-4000:]}"
    return text


def test_the_readme_sequence_runs_end_to_end(tmp_path, glyphs_input):
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / "glyphs").symlink_to(glyphs_input / "glyphs")  # the generated default data, made once
    run = lambda *cmd: _run(tmp_path, *cmd)  # noqa: E731
    train_fold = ["bash", str(REPO / "train_fold.sh")]

    run("python", "-m", "arcfold", "prepare", "glyphs")
    run("python", "-m", "arcfold", "folds", "-c", CONFIG)
    run(*train_fold, "0", CONFIG, *SMALL)
    out = run(*train_fold, "0..1", CONFIG, *SMALL)  # after fold 0 finished: fold 0 skipped, fold 1 trained
    assert "fold 0 of 'glyphs_arcface' is finished" in out and "train_fold.sh: fold 1 trained" in out
    oof = tmp_path / "oof"
    assert {p.name for p in (oof / "glyphs_arcface").glob("fold*.npz")} == {"fold0.npz", "fold1.npz"}
    run(*train_fold, "0", CONFIG, *SMALL, "head.name=cosface", "head.margin=0.3", "name=glyphs_cosface")
    assert (oof / "glyphs_cosface" / "fold0.npz").is_file()

    board = run("python", "-m", "arcfold", "leaderboard")
    assert "glyphs_arcface" in board and "glyphs_cosface" in board
    run("python", "-m", "arcfold", "blend", "--experiments", "glyphs_arcface", "glyphs_cosface", "--name", "both",
        "--folds", "0")  # fmt: skip
    assert json.loads((oof / "blends" / "both.json").read_text())["experiments"] == ["glyphs_arcface", "glyphs_cosface"]
    run("python", "-m", "arcfold", "plots", "--experiment", "glyphs_arcface", "--fold", "0")
    assert list((oof / "glyphs_arcface" / "plots").glob("*.png"))
    space = str(REPO / "configs" / "tune" / "glyphs_arcface.yaml")
    run("python", "-m", "arcfold", "tune", "-c", CONFIG, "--space", space, "--trials", "2", "--folds", "0", *SMALL)
    assert (tmp_path / "configs" / "tuned" / "glyphs_arcface_best.yaml").is_file()

    run("python", "-m", "arcfold", "holdout", "make", "--experiment", "glyphs_arcface", "--fold", "0",
        "--out", "input/glyphs_holdout")  # fmt: skip
    run("python", "-m", "arcfold", "rerank", "--experiment", "glyphs_arcface", "--task", "recognition")
    run("python", str(REPO / "inference.py"), "-c", str(REPO / "configs" / "inference" / "glyphs.yaml"), "folds=[0]")
    submission = tmp_path / "submissions" / "glyphs_arcface.csv"
    assert len(pd.read_csv(submission)) == len(pd.read_csv(tmp_path / "input" / "glyphs_holdout" / "query.csv"))
    scores = run("python", "-m", "arcfold", "holdout", "score", "--submission", str(submission),
                 "--holdout", "input/glyphs_holdout", "--format", "top5")  # fmt: skip
    assert 0.0 <= json.loads(scores[scores.index("{") : scores.rindex("}") + 1])["map@5"] <= 1.0
