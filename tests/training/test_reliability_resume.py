"""SIGKILL at any point of a training run, then ``train.resume=true``: the run finishes with the same OOF
embeddings, scores and weights as a run never interrupted.

Each run is a child process forked from the test (torch already imported: a fresh interpreter would cost
seconds per run) that trains one fold of the tiny deterministic config of ``conftest.mini_overrides``. The
environment variable ``ARCFOLD_KILL_AT`` (``arcfold.io.fault_point``) makes the child SIGKILL itself at an
exact place, so each kill lands where the test says, not wherever a timer happens to fall.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import numpy as np
import pandas as pd
import pytest
import torch

import arcfold.errors
import arcfold.io
import arcfold.training.fold
from arcfold.config import load_config
from arcfold.io import KILL_AT_ENV, load_json, load_npz, load_torch
from arcfold.retrieval.metrics import retrieval_metrics
from arcfold.training.fold import train_fold
from arcfold.training.paths import FoldPaths

from ..conftest import mini_overrides, write_mini_dataset

METRICS = ["recall@1", "recall@2", "recall@4", "recall@5", "recall@8", "recall@10", "map@r", "n_queries"]
TIMING = ["train_images_per_s", "train_seconds", "val_seconds"]  # the only columns allowed to differ


def _child(overrides: list[str], kill_at: str | None, no_improvement: bool) -> None:
    os.environ.pop(KILL_AT_ENV, None)
    if kill_at:
        os.environ[KILL_AT_ENV] = kill_at
    arcfold.io._fault_counts.clear()
    torch.set_num_threads(1)  # the same arithmetic in every child, whatever the parent used
    if no_improvement:  # what a non-deterministic device may do: the epoch trained again scores lower
        real = arcfold.training.fold.retrieval_metrics
        arcfold.training.fold.retrieval_metrics = lambda *a, **k: {**real(*a, **k), "recall@1": 0.0}
    train_fold(load_config(None, overrides), 0)


def run_fold(overrides: list[str], kill_at: str | None = None, no_improvement: bool = False) -> int:
    """Train fold 0 in a forked child; its exit code (-9 when it was SIGKILLed)."""
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(overrides, kill_at, no_improvement))
    proc.start()
    proc.join(timeout=300)
    if proc.exitcode is None:
        proc.kill()
        pytest.fail("training child hung")
    return proc.exitcode


def _epoch_done(paths: FoldPaths) -> int:
    return load_torch(paths.last)["epoch"] if paths.last.exists() else -1


@pytest.fixture(scope="module")
def mini_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini")
    write_mini_dataset(root / "input")
    return root


@pytest.fixture(scope="module")
def reference(mini_root):
    """The run never interrupted while training; it is stopped once, writing its OOF file after the last epoch,
    to keep its final training state (model, head, optimizer, scheduler: ``last.pt``) for comparison, whichever
    epoch turns out best."""
    overrides = [*mini_overrides(mini_root / "reference"), f"data.input_dir={mini_root / 'input'}"]
    cfg = load_config(None, overrides)
    paths = FoldPaths(cfg, 0)
    assert run_fold(overrides, kill_at="write:fold0.npz") == -signal.SIGKILL
    final_state = load_torch(paths.last)
    assert final_state["epoch"] == cfg.train.epochs - 1
    assert run_fold([*overrides, "train.resume=true"]) == 0
    return paths, final_state


def _assert_equal_states(a, b, where: str = "") -> None:
    """Nested dicts/lists of tensors and plain values, equal to the bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_equal_states(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal_states(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_run_killed_mid_epoch_in_validation_and_while_writing_resumes_bit_exact(mini_root, reference):
    overrides = [*mini_overrides(mini_root / "killed"), f"data.input_dir={mini_root / 'input'}"]
    resume = [*overrides, "train.resume=true"]
    cfg = load_config(None, overrides)
    paths = FoldPaths(cfg, 0)
    # 3 batches per epoch: the 5th training batch is batch 1 of epoch 1
    assert run_fold(overrides, kill_at="train_batch#5") == -signal.SIGKILL
    assert _epoch_done(paths) == 0 and not paths.oof.exists()  # mid-epoch: resumes from the last finished epoch
    history_epoch0 = pd.read_csv(paths.history)

    assert run_fold(resume, kill_at="validation") == -signal.SIGKILL  # epoch 1 trained again, killed validating
    assert _epoch_done(paths) == 0

    assert run_fold(resume, kill_at="write:last.pt") == -signal.SIGKILL  # killed writing epoch 1's resume point
    assert _epoch_done(paths) == 0, "a half-written checkpoint must not count as a finished epoch"
    assert list(paths.work.glob(".last.pt.*.tmp")), "the kill should have left the temporary file"

    assert run_fold(resume, kill_at="write:fold0.npz") == -signal.SIGKILL  # killed writing the OOF file
    assert _epoch_done(paths) == 2 and not paths.oof.exists()
    # the training state after the last epoch is the uninterrupted run's, to the bit (timings aside)
    ref, ref_state = reference
    state = load_torch(paths.last)
    for row in [*state["history"], *ref_state["history"]]:
        for key in TIMING:
            row.pop(key)
    for key in ("model", "head", "optimizer", "scheduler", "scaler", "best", "history", "epoch"):
        _assert_equal_states(state[key], ref_state[key], key)

    assert run_fold(resume) == 0
    assert paths.oof.exists() and not paths.last.exists()
    assert not list(paths.work.glob(".*.tmp")) and not list(cfg.oof_dir.glob(".*.tmp"))  # leftovers cleaned

    # the same outputs as the run never interrupted, to the bit
    oof, ref_oof = load_npz(paths.oof), load_npz(ref.oof)
    assert oof.keys() == ref_oof.keys()
    for key in oof:
        np.testing.assert_array_equal(oof[key], ref_oof[key], err_msg=key)
    scores, ref_scores = load_json(paths.scores), load_json(ref.scores)
    assert {k: scores[k] for k in [*METRICS, "best_epoch"]} == {k: ref_scores[k] for k in [*METRICS, "best_epoch"]}
    weights, ref_weights = load_torch(paths.weights)["state_dict"], load_torch(ref.weights)["state_dict"]
    assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights)
    history, ref_history = pd.read_csv(paths.history), pd.read_csv(ref.history)
    pd.testing.assert_frame_equal(history.drop(columns=TIMING), ref_history.drop(columns=TIMING))
    pd.testing.assert_frame_equal(history.iloc[:1], history_epoch0)  # the finished epoch was kept, not redone
    log_text = paths.log_file.read_text()
    assert "resuming fold 0 from epoch 1" in log_text and "resuming fold 0 from epoch 3" in log_text


def test_resume_with_another_config_is_refused(mini_root):
    overrides = [*mini_overrides(mini_root / "other"), f"data.input_dir={mini_root / 'input'}"]
    assert run_fold(overrides, kill_at="train_batch#5") == -signal.SIGKILL
    cfg = load_config(None, [*overrides, "train.resume=true", "optim.lr=0.01", "train.progress=true"])
    with pytest.raises(arcfold.errors.ArtifactExistsError, match=r"another config \(optim.lr: 0.001 -> 0.01\)"):
        train_fold(cfg, 0)  # train.progress may differ: it changes nothing that is computed


def test_best_files_of_an_epoch_cut_short_are_never_taken_for_the_best(mini_root, reference):
    """train.keep=best, killed after an improved epoch wrote its best files but before its resume point: if that
    epoch, trained again, scores lower (a GPU need not repeat itself), the fold's outputs are the best *finished*
    epoch's."""
    ref, ref_state = reference
    assert ref_state["best"]["epoch"] == 2, "this test needs the last epoch to improve (it does on the mini set)"
    overrides = [*mini_overrides(mini_root / "cut"), f"data.input_dir={mini_root / 'input'}", "train.keep=best"]
    cfg = load_config(None, overrides)
    paths = FoldPaths(cfg, 0)
    assert run_fold(overrides, kill_at="write:history.csv#3") == -signal.SIGKILL  # epoch 2: best files written
    assert _epoch_done(paths) == 1 and paths.best(2).exists()
    assert run_fold([*overrides, "train.resume=true"], no_improvement=True) == 0
    recall = [row["recall@1"] for row in ref_state["history"][:2]]
    best_finished = recall.index(max(recall))  # the best of epochs 0 and 1 (ties: the first)
    scores, oof = load_json(paths.scores), load_npz(paths.oof)
    assert scores["best_epoch"] == load_torch(paths.weights)["epoch"] == best_finished
    # the stored scores are the scores of the stored embeddings: both of that epoch, not of the cut-short one
    recomputed = retrieval_metrics(oof["embeddings"], oof["labels"])
    assert {k: scores[k] for k in METRICS} == {k: recomputed[k] for k in METRICS}
    assert not list(paths.work.glob("best_*"))


class _Stop(Exception):
    pass


def test_a_resumed_run_counts_the_seconds_of_the_processes_before_it(tmp_path):
    write_mini_dataset(tmp_path / "input")
    overrides = mini_overrides(tmp_path)

    def slow_then_stop(row):  # epoch 0 takes 3 s more, then the process stops in epoch 1 (epoch 0's resume point kept)
        if row["epoch"] == 0:
            time.sleep(3.0)
        else:
            raise _Stop

    with pytest.raises(_Stop):
        train_fold(load_config(None, overrides), 0, on_epoch_end=slow_then_stop)
    paths = FoldPaths(load_config(None, overrides), 0)
    assert load_torch(paths.last)["seconds"] >= 3.0
    t0 = time.time()
    scores = train_fold(load_config(None, [*overrides, "train.resume=true"]), 0)
    resumed_wall = time.time() - t0
    # the first process's share (>= 3 s of sleep) plus the resumed one's; it used to be the resumed one's alone
    assert scores["seconds"] >= 3.0 and scores["seconds"] > resumed_wall
    assert load_json(paths.scores)["seconds"] == scores["seconds"]
