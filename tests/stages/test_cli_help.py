"""``python -m arcfold`` and every stage's ``--help`` answer at once: the list of stages, a hint for a typo, and no
heavy library (torch, timm, faiss, pandas, optuna) imported before the arguments are parsed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from arcfold.__main__ import STAGES, main

from ..conftest import REPO

HEAVY = ("torch", "timm", "faiss", "pandas", "optuna")

# in a fresh interpreter: each stage's --help and an argument error, then the heavy modules each one loaded first
PROBE = """
import contextlib, io, json, sys
from arcfold.__main__ import STAGES, main

heavy, loaded = %r, {}
for stage in STAGES:
    before = set(sys.modules)
    for argv in ([stage, "--help"], [stage, "--no-such-option"]):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                main(argv)
            except SystemExit:
                pass
    loaded[stage] = sorted(m for m in heavy if m in sys.modules and m not in before)
print(json.dumps(loaded))
"""


def test_no_stage_imports_a_heavy_library_for_help_or_an_argument_error():
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE % (HEAVY,)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = json.loads(out.stdout.splitlines()[-1])
    assert loaded == {stage: [] for stage in STAGES}  # before the fix: prepare, blend, tune, rerank, holdout did


def test_constants_restated_in_the_stages_equal_the_librarys():
    import arcfold.datasets.prepare
    import arcfold.experiments.blend
    import arcfold.experiments.rerank
    import arcfold.retrieval.submission
    import arcfold.stages.blend
    import arcfold.stages.holdout
    import arcfold.stages.prepare
    import arcfold.stages.rerank
    import arcfold.stages.tune
    import arcfold.training.tune

    assert arcfold.stages.prepare.BUILTIN == arcfold.datasets.prepare.BUILTIN
    assert arcfold.stages.blend.DEFAULT_GRID == arcfold.experiments.blend.DEFAULT_GRID
    assert arcfold.stages.rerank.METHODS == arcfold.experiments.rerank.METHODS
    assert arcfold.stages.rerank.DEFAULT_NEW_LABEL == arcfold.experiments.rerank.DEFAULT_NEW_LABEL
    assert arcfold.stages.holdout.FORMATS == tuple(arcfold.retrieval.submission.DEFAULT_HEADERS)
    assert arcfold.stages.tune.DEFAULT_GRACE_PERIOD == arcfold.training.tune.DEFAULT_GRACE_PERIOD


def _stage_lines(text: str) -> list[str]:
    return [line.split()[0] for line in text.splitlines() if line.startswith("  ")]


def test_without_a_stage_it_lists_the_stages_one_line_each(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m arcfold STAGE [options]")
    assert _stage_lines(err) == list(STAGES)
    assert "  train        train folds (--fold 0, 0..4, full) and write their OOF embeddings and scores\n" in err

    assert main(["--help"]) == 0
    assert _stage_lines(capsys.readouterr().out) == list(STAGES)


@pytest.mark.parametrize(
    "typo, hint",
    [("trian", " (did you mean 'train'?)"), ("leaderbord", " (did you mean 'leaderboard'?)"), ("xyz", "")],
)
def test_an_unknown_stage_is_exit_2_with_a_hint_and_the_list(typo, hint, capsys):
    assert main([typo, "-c", "configs/glyphs_arcface.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m arcfold: unknown stage '{typo}'{hint}\n")
    assert _stage_lines(err) == list(STAGES)
