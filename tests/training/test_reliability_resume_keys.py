"""Every key of ``train.RESUME_MAY_DIFFER`` is result-neutral: changing it gives the OOF embeddings and the
training history (losses, learning rates, scores) of the run without the change, to the bit.

Tiny runs of the deterministic config of ``conftest.mini_overrides`` (2 epochs of 2 batches), on images of 48 px
trained at 32 px, so that the resize matters: one reference run, one run per group of changed keys (each run has
its own ``paths.oof_dir`` and ``paths.models_dir``, so those two keys differ in every run), and one run interrupted
after its first epoch and resumed with every key that can change on a resume changed at once.
"""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from arcfold.config import load_config
from arcfold.errors import ArtifactExistsError
from arcfold.io import load_npz, load_torch, save_torch
from arcfold.training.fold import train_fold
from arcfold.training.paths import FoldPaths
from arcfold.training.state import RESUME_MAY_DIFFER

from ..conftest import mini_overrides, write_mini_dataset

TIMING = ["train_images_per_s", "train_seconds", "val_seconds"]  # wall-clock columns of history.csv
# train.device spelled otherwise for the same device: "auto" is the CPU here unless CUDA is present
OTHER_DEVICE = "auto" if not torch.cuda.is_available() else "cpu:0"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mini_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_keys")
    write_mini_dataset(root / "input", size=48)
    shutil.copytree(root / "input", root / "input_copy")  # data.input_dir: the same images elsewhere
    return root


def _overrides(root, run: str) -> list[str]:
    return [
        *mini_overrides(root / run),
        f"data.input_dir={root / 'input'}",
        f"paths.folds_dir={root / 'folds'}",  # one fold file for all runs (copied for the paths.folds_dir run)
        "train.epochs=2",
        "train.limit_train_batches=2",
    ]


def _outputs(cfg) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    paths = FoldPaths(cfg, 0)
    return load_npz(paths.oof), pd.read_csv(paths.history).drop(columns=TIMING)


def _assert_same_outputs(cfg, reference) -> None:
    oof, history = _outputs(cfg)
    ref_oof, ref_history = reference
    assert oof.keys() == ref_oof.keys()
    for key in oof:
        np.testing.assert_array_equal(oof[key], ref_oof[key], err_msg=key)
    pd.testing.assert_frame_equal(history, ref_history)


@pytest.fixture(scope="module")
def reference(mini_root):
    cfg = load_config(None, _overrides(mini_root, "reference"))
    train_fold(cfg, 0)
    return _outputs(cfg)


def _changed(mini_root, group: str) -> list[str]:
    """The overrides of a group of keys (``paths.folds_dir``: a copy of the reference's, see :func:`_copy_folds`)."""
    if group == "others":
        return [
            "train.force=true",
            "train.progress=true",
            f"train.device={OTHER_DEVICE}",
            "train.max_nonfinite_steps=3",
            "train.dist_timeout_s=60",
            f"data.input_dir={mini_root / 'input_copy'}",
            "data.check_images=none",
            f"paths.folds_dir={mini_root / 'folds_copy'}",
        ]
    return {"num_workers": ["data.num_workers=1"], "cache_images": ["data.cache_images=false"]}[group]


def _copy_folds(mini_root) -> None:
    """The reference run's fold file, in another folder (after the reference fixture made it)."""
    if not (mini_root / "folds_copy").exists():
        shutil.copytree(mini_root / "folds", mini_root / "folds_copy")


class _Stop(Exception):
    pass


def _key(override: str) -> str:
    return override.split("=", 1)[0]


def test_the_groups_cover_every_key_that_may_differ(mini_root) -> None:
    tried = {_key(o) for group in ("others", "num_workers", "cache_images") for o in _changed(mini_root, group)}
    tried |= {"train.resume", "paths.oof_dir", "paths.models_dir"}  # every run: own output folders; the resume
    assert tried == set(RESUME_MAY_DIFFER)


@pytest.mark.parametrize("group", ["others", "num_workers", "cache_images"])
def test_a_key_that_may_differ_on_resume_does_not_change_the_result(mini_root, reference, group) -> None:
    _copy_folds(mini_root)
    cfg = load_config(None, [*_overrides(mini_root, group), *_changed(mini_root, group)])
    train_fold(cfg, 0)
    _assert_same_outputs(cfg, reference)


def test_a_run_resumed_with_those_keys_changed_ends_as_the_run_never_interrupted(mini_root, reference) -> None:
    overrides = _overrides(mini_root, "resumed")
    cfg = load_config(None, overrides)

    def stop_in_epoch_1(row) -> None:
        if row["epoch"] == 1:
            raise _Stop  # before epoch 1's resume point is written: resumes from epoch 0

    with pytest.raises(_Stop):
        train_fold(cfg, 0, on_epoch_end=stop_in_epoch_1)
    paths = FoldPaths(cfg, 0)
    state = load_torch(paths.last)
    assert state["epoch"] == 0 and state["device_type"] == "cpu"

    _copy_folds(mini_root)
    changed = [
        "train.resume=true",
        "data.num_workers=1",
        "data.cache_images=false",
        *(o for o in _changed(mini_root, "others") if _key(o) != "train.force"),
    ]
    save_torch(paths.last, {**state, "device_type": "cuda"})  # as if trained on a GPU: no resume on the CPU
    with pytest.raises(ArtifactExistsError, match="was trained on cuda, this run is on cpu"):
        train_fold(load_config(None, [*overrides, *changed]), 0)
    save_torch(paths.last, state)
    train_fold(load_config(None, [*overrides, *changed]), 0)
    _assert_same_outputs(cfg, reference)
