"""Multi-stage fine-tuning (``model.init_from``, :mod:`arcfold.init_from`): a fold starts from a finished fold's
weights (the head's too when it fits), refuses a checkpoint that saw the fold's validation rows, and is only the
starting point of a resumed fold.

Stage 1 is the tiny deterministic config of ``conftest.mini_overrides`` at 32 px (1 epoch of 2 batches); stage 2
trains the same fold at 48 px. Most tests stop stage 2 where the optimizer is built (the weights initialised, no
step taken) and compare those weights with the checkpoint's."""

from __future__ import annotations

import copy
import logging
import re

import pytest
import torch

import arcfold.training.fold
from arcfold.config import load_config
from arcfold.errors import ConfigError, CorruptFileError
from arcfold.io import load_json, load_torch, save_torch
from arcfold.training.fold import train_fold
from arcfold.training.paths import FoldPaths

from ..conftest import mini_overrides, write_mini_dataset


class _Stop(Exception):
    pass


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _overrides(root, run: str, *extra: str) -> list[str]:
    return [
        *mini_overrides(root / run),
        f"name={run}",
        f"data.input_dir={root / 'input'}",
        f"paths.folds_dir={root / 'folds'}",  # one fold file for every run
        "train.epochs=1",
        "train.limit_train_batches=2",
        *extra,
    ]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """Fold 0 trained at 32 px; returns (root, the fold{fold}.pt template, the checkpoint)."""
    root = tmp_path_factory.mktemp("init_from")
    write_mini_dataset(root / "input")
    cfg = load_config(None, _overrides(root, "stage1"))
    train_fold(cfg, 0)
    return root, str(cfg.models_dir / "fold{fold}.pt"), load_torch(FoldPaths(cfg, 0).weights)


def _initial_weights(root, run: str, fold: int, *extra: str) -> dict:
    """Stage 2 of ``fold`` stopped once its weights are initialised: ``{"model": state, "head": state}``."""
    start = {}

    def spy_optimizer(cfg, model, head):  # called after model.init_from, before any step
        start.update(copy.deepcopy({"model": model.state_dict(), "head": head.state_dict()}))
        raise _Stop

    with pytest.MonkeyPatch.context() as mp, pytest.raises(_Stop):
        mp.setattr(arcfold.training.fold, "build_optimizer", spy_optimizer)
        train_fold(load_config(None, _overrides(root, run, "data.image_size=48", *extra)), fold)
    return start


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_fresh_fold_starts_from_the_checkpoint_weights_and_head(stage1, caplog):
    root, template, source = stage1
    caplog.set_level(logging.INFO, logger="arcfold")
    start = _initial_weights(root, "same_head", 0, f"model.init_from={template}")
    assert _equal(start["model"], source["state_dict"])  # backbone, pooling, neck, BatchNorm statistics
    assert _equal(start["head"], source["head"])  # same head.name, same classes: the class centres too
    assert "embedding model and head (arcface) loaded" in caplog.text
    fresh = _initial_weights(root, "no_init", 0)  # without init_from: the random init, which differs
    assert not torch.equal(fresh["model"]["neck.0.weight"], source["state_dict"]["neck.0.weight"])
    assert not torch.equal(fresh["head"]["weight"], source["head"]["weight"])


@pytest.mark.parametrize(
    "extra, change, reason",
    [
        (["head.name=cosface"], None, "head.name is 'cosface' here, 'arcface' in the checkpoint"),
        ([], lambda c: {**c, "classes": c["classes"][::-1]}, "other classes (15 in the checkpoint, 15 here, first"),
        ([], lambda c: {k: v for k, v in c.items() if k != "head"}, "holds no head weights"),
    ],
)
def test_the_head_starts_fresh_when_it_does_not_fit_and_the_log_says_why(
    stage1, tmp_path, caplog, extra, change, reason
):
    root, template, source = stage1
    path = tmp_path / "fold0.pt"
    save_torch(path, change(source) if change else source)
    caplog.set_level(logging.INFO, logger="arcfold")
    start = _initial_weights(root, "fresh_head", 0, f"model.init_from={path}", *extra)
    fresh = _initial_weights(root, "fresh_ref", 0, *extra)  # the head a run without init_from starts from
    assert _equal(start["model"], source["state_dict"])  # the embedding model is loaded all the same
    assert _equal(start["head"], fresh["head"])
    lines = [r.getMessage() for r in caplog.records if "the head starts fresh" in r.getMessage()]
    assert len(lines) == 1 and reason in lines[0], caplog.text


def test_two_stages_32_then_48_px_end_to_end_record_init_from(stage1):
    root, template, source = stage1
    cfg = load_config(None, _overrides(root, "stage2", "data.image_size=48", "optim.lr=1e-4",
                                       f"model.init_from={template}"))  # fmt: skip
    scores = train_fold(cfg, 0)
    expected = {"path": template.replace("{fold}", "0"), "fold": 0, "epoch": source["epoch"], "head": True}
    assert scores["init_from"] == expected and load_json(FoldPaths(cfg, 0).scores)["init_from"] == expected
    assert load_torch(FoldPaths(cfg, 0).weights)["config"]["model"]["init_from"] == template
    assert 0 <= scores["recall@1"] <= 1 and scores["n_queries"] == 30


def test_a_resumed_fold_continues_from_its_own_checkpoint_not_from_init_from(stage1, tmp_path):
    root, _, source = stage1
    path = tmp_path / "fold0.pt"
    save_torch(path, source)
    overrides = _overrides(root, "resumed", "data.image_size=48", "train.epochs=2", f"model.init_from={path}")

    def stop_in_epoch_1(row) -> None:
        if row["epoch"] == 1:
            raise _Stop

    with pytest.raises(_Stop):
        train_fold(load_config(None, overrides), 0, on_epoch_end=stop_in_epoch_1)
    path.unlink()  # a resume never reads it again
    scores = train_fold(load_config(None, [*overrides, "train.resume=true"]), 0)
    assert scores["init_from"]["path"] == str(path) and scores["last_epoch"] == 1


@pytest.mark.parametrize(
    "fold, change, message",
    [
        (1, None, r"records fold 0, not fold 1: it was trained on rows of fold 1's validation set \(a data leak\)"),
        (0, lambda c: {**c, "fold": "full"}, r"records fold 'full', not fold 0: .* \(a data leak\)"),
        (0, lambda c: {**c, "folds_sha256": "0" * 64}, r"was trained on another fold file \(sha256 000000000000"),
        (
            0,
            lambda c: _without_sha(c, seed=7),
            r"records no fold-file hash and its fold settings differ \(folds.seed",
        ),
    ],
)
def test_a_checkpoint_that_saw_the_folds_validation_rows_is_refused(stage1, tmp_path, fold, change, message):
    root, _, source = stage1
    path = tmp_path / "source.pt"
    save_torch(path, change(source) if change else source)
    cfg = load_config(None, _overrides(root, "leak", f"model.init_from={path}"))
    with pytest.raises(ConfigError, match=f"^model.init_from={re.escape(str(path))} {message}"):
        train_fold(cfg, fold)


def _without_sha(ckpt: dict, seed: int) -> dict:
    """A checkpoint as written before the fold file's hash was recorded, its config's folds.seed set to ``seed``."""
    config = copy.deepcopy(ckpt["config"])
    config["folds"]["seed"] = seed
    return {**{k: v for k, v in ckpt.items() if k != "folds_sha256"}, "config": config}


def test_an_older_checkpoint_of_the_same_fold_settings_is_accepted_with_a_warning(stage1, tmp_path, caplog):
    root, _, source = stage1
    path = tmp_path / "old.pt"
    save_torch(path, _without_sha(source, seed=source["config"]["folds"]["seed"]))
    start = _initial_weights(root, "old", 0, f"model.init_from={path}")
    assert _equal(start["model"], source["state_dict"])
    assert "records no fold-file hash (written before it was recorded)" in caplog.text


def test_unusable_sources_are_one_line_errors_naming_the_path(stage1, tmp_path):
    root, template, source = stage1
    missing = tmp_path / "nowhere" / "fold0.pt"
    with pytest.raises(FileNotFoundError, match=f"^model.init_from: no such file: {re.escape(str(missing))}$"):
        train_fold(load_config(None, _overrides(root, "bad", f"model.init_from={missing}")), 0)
    other = tmp_path / "other.pt"
    save_torch(other, {"model": source["state_dict"]})  # a plain state dict, not an arcfold checkpoint
    with pytest.raises(CorruptFileError, match=f"^model.init_from={re.escape(str(other))} is not an arcfold embedding"):
        train_fold(load_config(None, _overrides(root, "bad", f"model.init_from={other}")), 0)
    for extra, first in [
        ("model.embedding_size=16", "'neck.0.weight' has shape (32, 512) in the checkpoint, (16, 512) here"),
        ("model.backbone=resnet18", "'backbone.conv1.weight' is missing from the checkpoint"),
    ]:
        cfg = load_config(None, _overrides(root, "bad", f"model.init_from={template}", extra))
        with pytest.raises(ConfigError, match="does not fit this model: " + re.escape(first)):
            train_fold(cfg, 0)
    for option in ("model.pretrained_path=weights.pth", "model.pretrained=true"):
        with pytest.raises(ConfigError, match="model.init_from and model.pretrained"):
            load_config(None, [f"model.init_from={template}", option])
