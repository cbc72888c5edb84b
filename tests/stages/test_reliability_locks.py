"""Concurrent runs: two ``train_fold.sh`` on different folds at once (one per GPU) share the data set, the fold
file, the experiment's scores and the leaderboard; file locks make them take turns, and the same fold can never
be trained by two processes at once."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time

import pandas as pd
import pytest

import arcfold.data.folds
import arcfold.datasets.glyphs
from arcfold.config import load_config
from arcfold.data.folds import ensure_folds
from arcfold.datasets.glyphs import ensure_glyphs
from arcfold.errors import LockedError
from arcfold.io import file_lock
from arcfold.training.fold import train_fold
from arcfold.training.paths import FoldPaths

from ..conftest import REPO, mini_overrides, write_mini_dataset

FORK = multiprocessing.get_context("fork")


def _hold(path, started, release, log=None) -> None:
    with file_lock(path):
        started.set()
        release.wait(30)
        if log is not None:
            with open(log, "a") as f:
                f.write("holder done\n")


def test_a_lock_makes_the_second_process_wait_or_names_the_holder(tmp_path):
    lock, log = tmp_path / ".x.lock", tmp_path / "log"
    started, release = FORK.Event(), FORK.Event()
    holder = FORK.Process(target=_hold, args=(lock, started, release, log))
    holder.start()
    assert started.wait(30)
    with pytest.raises(LockedError, match=rf"the thing is in use by another process \(held by pid {holder.pid} "):
        with file_lock(lock, blocking=False, what="the thing"):
            pass
    release.set()
    with file_lock(lock):  # waits for the holder, which finished its work first
        assert log.read_text() == "holder done\n"
    holder.join(10)


def test_a_lock_dies_with_a_killed_holder(tmp_path):
    lock = tmp_path / ".x.lock"
    started, release = FORK.Event(), FORK.Event()
    holder = FORK.Process(target=_hold, args=(lock, started, release))
    holder.start()
    assert started.wait(30)
    holder.kill()  # SIGKILL: no cleanup code runs
    holder.join(10)
    with file_lock(lock, blocking=False):  # free at once: no stale lock to delete by hand
        pass


def test_the_same_fold_twice_at_once_is_refused(tmp_path):
    cfg = load_config(None, mini_overrides(tmp_path))
    started, release = FORK.Event(), FORK.Event()
    holder = FORK.Process(target=_hold, args=(FoldPaths(cfg, 0).lock, started, release))
    holder.start()
    assert started.wait(30)
    try:
        with pytest.raises(LockedError, match=r"fold 0 of experiment 'mini' is in use by another process \(held by"):
            train_fold(cfg, 0)
    finally:
        release.set()
        holder.join(10)


def _together(target, n: int = 2) -> list[int]:
    """Run ``target()`` in ``n`` forked processes released at the same moment; their exit codes."""
    barrier = FORK.Barrier(n)

    def run():
        barrier.wait(30)
        target()

    procs = [FORK.Process(target=run) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    return [p.exitcode for p in procs]


def test_data_set_generation_and_fold_file_are_made_once(tmp_path, monkeypatch):
    made = tmp_path / "made.log"

    def slow_generate(out_dir, seed=0, **kwargs):  # stands in for the glyph generator (seconds of work)
        with open(made, "a") as f:
            f.write(f"data {os.getpid()}\n")
        time.sleep(0.5)
        write_mini_dataset(tmp_path / "staging")
        os.replace(tmp_path / "staging" / "mini", out_dir)

    real_write_folds = arcfold.data.folds.write_folds

    def slow_write_folds(*args, **kwargs):
        with open(made, "a") as f:
            f.write(f"folds {os.getpid()}\n")
        time.sleep(0.5)
        return real_write_folds(*args, **kwargs)

    monkeypatch.setattr(arcfold.datasets.glyphs, "generate_glyphs", slow_generate)
    monkeypatch.setattr(arcfold.data.folds, "write_folds", slow_write_folds)
    data = tmp_path / "input" / "mini"
    cfg = load_config(None, [*mini_overrides(tmp_path), "data.check_images=exists"])

    def prepare():  # what each train_fold.sh does first
        ensure_glyphs(data)
        ensure_folds(cfg)

    assert _together(prepare) == [0, 0]
    lines = made.read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["data", "folds"], lines  # once each, not once per process
    assert len(pd.read_csv(cfg.folds_path)) == 120


@pytest.mark.slow
def test_two_train_fold_sh_on_different_folds_at_once(tmp_path):
    write_mini_dataset(tmp_path / "input")
    overrides = [*mini_overrides(tmp_path), "train.epochs=1", "train.limit_train_batches=2"]
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    procs = {
        fold: subprocess.Popen(
            ["bash", str(REPO / "train_fold.sh"), str(fold), *overrides],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for fold in (0, 1)
    }
    outputs = {fold: p.communicate(timeout=300) for fold, p in procs.items()}
    for fold, p in procs.items():
        assert p.returncode == 0, outputs[fold][1][-3000:]
    stderr = [err for _, err in outputs.values()]
    assert sum("folds: wrote" in err for err in stderr) == 1  # one wrote the fold file, the other reused it
    cfg = load_config(None, overrides)
    scores = pd.read_csv(cfg.oof_dir / "scores.csv", index_col=0)
    assert scores.index.tolist() == ["0", "1", "mean", "std"]  # the later scorer saw both folds
    for fold in (0, 1):  # each fold's log holds its own fold only
        log = FoldPaths(cfg, fold).log_file.read_text()
        assert f"fold {fold} finished" in log and f"fold {1 - fold} " not in log
