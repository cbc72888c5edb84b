"""Training with ``data.augment=shift`` and ``data.batch_augment=true`` (the default): every batch is shifted on
the device by BatchShift instead of per image, and a killed run resumes to the uninterrupted run's bits."""

from __future__ import annotations

import signal

import numpy as np
import pytest
import torch

import arcfold.data.transforms
from arcfold.config import load_config
from arcfold.io import load_npz, load_torch
from arcfold.training.fold import train_fold
from arcfold.training.paths import FoldPaths

from ..conftest import mini_overrides, write_mini_dataset
from .test_reliability_resume import run_fold

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shift_run(tmp_path_factory):
    """The overrides of a run called ``name`` on a mini data set (written once) with the ``shift`` preset, 2 epochs."""
    root = tmp_path_factory.mktemp("mini_shift")
    write_mini_dataset(root / "input")
    fixed = [f"data.input_dir={root / 'input'}", "data.augment=shift", "train.epochs=2"]
    return lambda name, *extra: [*mini_overrides(root / name), *fixed, *extra]


def test_every_training_batch_is_shifted_once_on_the_batch(shift_run, monkeypatch):
    calls: list[tuple[torch.dtype, int]] = []
    real = arcfold.data.transforms.BatchShift.apply

    def counted(x, shifts):
        calls.append((x.dtype, len(x)))
        return real(x, shifts)

    monkeypatch.setattr(arcfold.data.transforms.BatchShift, "apply", staticmethod(counted))
    train_fold(load_config(None, shift_run("counted")), 0)
    assert calls == [(torch.uint8, 16)] * 6  # 2 epochs x 3 batches, uint8 before the normalisation
    calls.clear()
    train_fold(load_config(None, shift_run("per_image", "data.batch_augment=false")), 0)
    assert calls == []  # albumentations per image instead


def test_a_run_killed_mid_epoch_resumes_to_the_same_bits(shift_run):
    reference = shift_run("reference")
    assert run_fold(reference) == 0
    killed = shift_run("killed")
    assert run_fold(killed, kill_at="train_batch#5") == -signal.SIGKILL  # batch 1 of epoch 1
    assert run_fold([*killed, "train.resume=true"]) == 0
    ref_paths, paths = FoldPaths(load_config(None, reference), 0), FoldPaths(load_config(None, killed), 0)
    oof, ref_oof = load_npz(paths.oof), load_npz(ref_paths.oof)
    np.testing.assert_array_equal(oof["embeddings"], ref_oof["embeddings"])
    weights, ref_weights = load_torch(paths.weights)["state_dict"], load_torch(ref_paths.weights)["state_dict"]
    assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights)
