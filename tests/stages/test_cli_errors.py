"""The README's promise, through the real CLI: a mistake or an interruption is one line on stderr and an exit code,
never a traceback, and it leaves nothing behind that the next run trips over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

import arcfold.stages.train
import arcfold.training.fold
from arcfold.config import load_config
from arcfold.io import load_torch
from arcfold.stages.cli import run_cli
from arcfold.training.fold import train_fold
from arcfold.training.paths import FoldPaths

from ..conftest import REPO, TINY, mini_overrides, tmp_path_overrides, write_mini_dataset


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


def test_ctrl_c_during_training_is_one_line_exit_130_and_the_run_resumes(tmp_path):
    write_mini_dataset(tmp_path / "input")
    overrides = [*mini_overrides(tmp_path), "train.epochs=4"]
    paths = FoldPaths(load_config(None, overrides), 0)
    cmd = [sys.executable, "-m", "arcfold", "train", "--fold", "0", *overrides]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not paths.last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends, once epoch 0's resume point exists
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    epoch = load_torch(paths.last)["epoch"]  # the resume point is intact
    assert 0 <= epoch < 3 and not paths.oof.exists()
    line = f"fold 0 of 'mini' interrupted after epoch {epoch} (the last finished); continue with train.resume=true"
    assert [e.split(": ", 1)[1] for e in _errors(stderr)] == [line]
    assert paths.log_file.read_text().splitlines()[-1].endswith(f" ERROR arcfold: {line}")  # train.log records it

    scores = train_fold(load_config(None, [*overrides, "train.resume=true"]), 0)
    assert paths.oof.exists() and scores["kept_epoch"] == 3
    assert pd.read_csv(paths.history)["epoch"].tolist() == list(range(4))


def test_ctrl_c_before_the_first_epoch_finished_says_so(tmp_path, monkeypatch, caplog):
    write_mini_dataset(tmp_path / "input")
    overrides = mini_overrides(tmp_path)

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(arcfold.training.fold, "train_one_epoch", ctrl_c)
    assert run_cli(arcfold.stages.train.main, ["--fold", "0", *overrides]) == 130
    assert caplog.messages[-1] == (
        "fold 0 of 'mini' interrupted before the first epoch finished; continue with train.resume=true"
    )


# the train stage in a fresh process whose disk fills up while epoch 1's resume point is written: torch.save raises
# what its C++ writer raises on a full disk, and the disk reports 0 bytes free
FULL_DISK_AT_EPOCH_1 = """
import shutil, sys, types
import torch
from arcfold.__main__ import main

real_save, calls = torch.save, []


def save(obj, f, *args, **kwargs):
    calls.append(str(f))
    if "last.pt" in str(f) and sum("last.pt" in c for c in calls) == 2:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    return real_save(obj, f, *args, **kwargs)


torch.save = save
shutil.disk_usage = lambda path: types.SimpleNamespace(total=2**30, used=2**30, free=0)
sys.exit(main(sys.argv[1:]))
"""


def test_a_full_disk_during_training_is_one_line_exit_2_and_the_run_resumes(tmp_path):
    write_mini_dataset(tmp_path / "input")
    overrides = mini_overrides(tmp_path)
    paths = FoldPaths(load_config(None, overrides), 0)
    cmd = [sys.executable, "-c", FULL_DISK_AT_EPOCH_1, "train", "--fold", "0", *overrides]
    result = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    [error] = _errors(result.stderr)
    assert f"cannot write {paths.last}: no space left on the disk (0 B free in {paths.work}); " in error
    assert paths.log_file.read_text().splitlines()[-1].endswith(error.split(" ", 1)[1])  # the same line in train.log
    assert load_torch(paths.last)["epoch"] == 0  # epoch 0's resume point is intact
    assert sorted(p.name for p in paths.work.iterdir()) == ["history.csv", "last.pt", "train.log"]  # no partial file

    train_fold(load_config(None, [*overrides, "train.resume=true"]), 0)
    assert paths.oof.exists() and pd.read_csv(paths.history)["epoch"].tolist() == [0, 1, 2]


def test_the_error_that_stops_a_run_is_recorded_in_train_log(tmp_path, monkeypatch, caplog):
    write_mini_dataset(tmp_path / "input")
    (tmp_path / "resnet10t.safetensors").write_text("<html>403 Forbidden</html>")  # a failed download
    overrides = [*mini_overrides(tmp_path), f"model.pretrained_path={tmp_path / 'resnet10t.safetensors'}"]
    paths = FoldPaths(load_config(None, overrides), 0)
    with pytest.raises(SystemExit) as e:  # the CLI's exit 2 (python -m arcfold train ...)
        run_cli(arcfold.stages.train.main, ["--fold", "0", *overrides])
    assert e.value.code == 2
    line = f"cannot read model.pretrained_path={tmp_path / 'resnet10t.safetensors'}: truncated, corrupt or not a "
    assert caplog.messages[-1].startswith(line)
    assert paths.log_file.read_text().splitlines()[-1].endswith(f" ERROR arcfold: {caplog.messages[-1]}")  # same line

    def bug(*args, **kwargs):  # not a user error: train.log gets its traceback, as the console does
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(arcfold.training.fold, "train_one_epoch", bug)
    with pytest.raises(ZeroDivisionError):
        train_fold(load_config(None, [*mini_overrides(tmp_path), "train.force=true"]), 0)
    text = paths.log_file.read_text()
    assert " ERROR arcfold: ZeroDivisionError: division by zero\nTraceback (most recent call last):" in text
    assert text.rstrip().endswith("ZeroDivisionError: division by zero")
