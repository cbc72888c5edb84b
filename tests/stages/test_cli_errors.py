"""The README's promise, through the real CLI: a mistake or an interruption is one line on stderr and an exit code,
never a traceback, and it leaves nothing behind that the next run trips over."""

from __future__ import annotations

import os
import subprocess
import sys

from ..conftest import REPO, TINY, tmp_path_overrides


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " ERROR " in line]


def test_a_fold_that_does_not_exist_is_one_line_and_leaves_nothing_behind(tmp_path):
    cmd = ["bash", str(REPO / "train_fold.sh"), "7", "configs/glyphs_arcface.yaml", *tmp_path_overrides(tmp_path)]
    cmd += TINY
    result = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert _errors(result.stderr) == [result.stderr.strip()]  # the one line is all it prints
    assert "fold 7 does not exist: experiment 'glyphs_arcface' has folds 0..4 (folds.n_splits=5)" in result.stderr
    assert list(tmp_path.iterdir()) == []  # no lock, no train.log, not even the data set or the fold file


def test_a_spec_reaching_past_the_last_fold_is_refused_before_the_first_fold_trains(tmp_path):
    cmd = [sys.executable, "-m", "arcfold", "train", "--fold", "3..5", *tmp_path_overrides(tmp_path), *TINY]
    result = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "fold 5 does not exist" in result.stderr
    assert list(tmp_path.iterdir()) == []
