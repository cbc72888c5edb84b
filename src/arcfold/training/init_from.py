"""Multi-stage fine-tuning (``model.init_from``): a fold starts from a finished fold's weights.

The second stage of the Google Landmarks winners: the same fold trained again from the first stage's weights,
typically at a larger image size, a lower lr and fewer epochs::

    bash train_fold.sh 0..4 configs/omniglot_arcface.yaml name=omniglot_96 data.image_size=96 optim.lr=2e-4 \\
        train.epochs=3 'model.init_from=models/omniglot_arcface/fold{fold}.pt'

``{fold}`` in the path is replaced by the fold being trained. The source is an arcfold embedding checkpoint
(``models/<exp>/fold<K>.pt``, format ``arcfold.embedding/1``). What is copied, on a fresh fold only (a resumed
fold continues from its own ``last.pt``; ``init_from`` is only the starting point):

* the embedding model (backbone, pooling, neck): every tensor of its state dict, BatchNorm statistics included.
  A key missing on either side or a shape that differs is an error naming the first such key (another backbone,
  neck or embedding size). Image size may differ (convolutional backbones do not depend on it).
* the head's *parameters* (class centres, proxies) when the checkpoint holds a head (``fold<K>.pt`` written since
  ``model.init_from`` exists) of the same ``head.name``, for the same classes in the same order (the checkpoint
  stores its class list) and of the same shapes. The head's buffers (class weights, per-class margins, AdaCos's
  scale) are those the new config computes. Otherwise the head starts fresh and the log says why in one line; a
  sharded head (``head.sharded``) always starts fresh.

A data leak is refused: the source must be a checkpoint of the *same fold* of the *same fold file* (the sha256
the checkpoint records; a checkpoint older than that record is accepted when its config's fold settings equal
this run's, with a warning). Another fold's checkpoint trained on this fold's validation rows; so did a
full-data fit (``fold`` not an int).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from arcfold.config import ExperimentConfig, config_to_dict
from arcfold.errors import ConfigError, CorruptFileError
from arcfold.io import load_torch
from arcfold.models.embedding import CHECKPOINT_FORMAT

log = logging.getLogger(__name__)

__all__ = ["FOLD_FIELD", "init_path", "init_weights_from", "load_init_checkpoint"]

FOLD_FIELD = "{fold}"  # replaced by the fold being trained
# the config keys that decide which rows a fold holds: checked when a checkpoint records no fold-file hash
_FOLD_KEYS = {
    "data": ("dataset", "csv", "label_column", "group_column"),
    "folds": ("n_splits", "group_column", "stratify_column", "min_class_size", "seed", "test_fraction", "test_groups"),
}


def init_path(template: str, fold: int) -> Path:
    """``model.init_from`` for ``fold``: ``models/a/fold{fold}.pt`` -> ``models/a/fold2.pt``."""
    return Path(template.replace(FOLD_FIELD, str(fold)))


def load_init_checkpoint(cfg: ExperimentConfig, fold: int, folds_sha256: str) -> tuple[Path, dict[str, Any]]:
    """The checkpoint ``cfg.model.init_from`` names for ``fold``, checked: it exists, is an arcfold embedding
    checkpoint, and was trained on fold ``fold`` of the fold file of sha256 ``folds_sha256`` (no leak)."""
    assert cfg.model.init_from
    path = init_path(cfg.model.init_from, fold)
    if not path.is_file():
        raise FileNotFoundError(f"model.init_from: no such file: {path}")
    ckpt = load_torch(path, hint="Use a finished fold's models/<exp>/fold<K>.pt.")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "state_dict" not in ckpt:
        raise CorruptFileError(
            f"model.init_from={path} is not an arcfold embedding checkpoint (format {CHECKPOINT_FORMAT}); "
            "use a finished fold's models/<exp>/fold<K>.pt"
        )
    _check_no_leak(ckpt, path, cfg, fold, folds_sha256)
    return path, ckpt


def _check_no_leak(ckpt: dict[str, Any], path: Path, cfg: ExperimentConfig, fold: int, folds_sha256: str) -> None:
    source_fold = ckpt.get("fold")
    if type(source_fold) is not int or source_fold != fold:
        what = f"fold {source_fold!r}" if source_fold is not None else "no fold"
        raise ConfigError(
            f"model.init_from={path} records {what}, not fold {fold}: it was trained on rows of fold {fold}'s "
            f"validation set (a data leak); start fold {fold} from a fold-{fold} checkpoint (.../fold{FOLD_FIELD}.pt)"
        )
    source_sha = ckpt.get("folds_sha256")
    if source_sha is not None:
        if source_sha != folds_sha256:
            raise ConfigError(
                f"model.init_from={path} was trained on another fold file (sha256 {source_sha[:12]}..., this run's "
                f"{folds_sha256[:12]}...): its fold {fold} holds other rows, a data leak; use a checkpoint of this "
                "fold file"
            )
        return
    stored, now = ckpt.get("config", {}), config_to_dict(cfg)
    differ = [
        f"{section}.{key}"
        for section, keys in _FOLD_KEYS.items()
        for key in keys
        if stored.get(section, {}).get(key) != now[section][key]
    ]
    if differ:
        raise ConfigError(
            f"model.init_from={path} records no fold-file hash and its fold settings differ ({', '.join(differ)}): "
            f"its fold {fold} may hold other rows, a data leak; use a checkpoint of this fold file"
        )
    log.warning(
        "model.init_from=%s records no fold-file hash (written before it was recorded); its fold settings equal "
        "this run's, so it is taken as fold %d of the same fold file",
        path,
        fold,
    )


def _first_mismatch(expected: dict[str, torch.Tensor], found: dict[str, Any]) -> str | None:
    """The first key of ``expected`` missing from ``found`` or of another shape, then the first extra key."""
    for key, tensor in expected.items():
        if key not in found:
            return f"'{key}' is missing from the checkpoint"
        if not isinstance(found[key], torch.Tensor) or found[key].shape != tensor.shape:
            shape = tuple(found[key].shape) if isinstance(found[key], torch.Tensor) else type(found[key]).__name__
            return f"'{key}' has shape {shape} in the checkpoint, {tuple(tensor.shape)} here"
    extra = [key for key in found if key not in expected]
    return f"'{extra[0]}' of the checkpoint does not exist here" if extra else None


def _head_mismatch(
    ckpt: dict[str, Any], path: Path, cfg: ExperimentConfig, head: nn.Module, classes: list[str], sharded: bool
) -> str | None:
    """Why the head cannot start from the checkpoint's, or None when it can."""
    if sharded:
        return "head.sharded=true (each process holds only its rows)"
    if "head" not in ckpt or "classes" not in ckpt:
        return f"{path} holds no head weights (written by an older arcfold, or by a head.sharded run)"
    source_name = ckpt.get("config", {}).get("head", {}).get("name")
    if source_name != cfg.head.name:
        return f"head.name is {cfg.head.name!r} here, {source_name!r} in the checkpoint"
    source_classes = list(ckpt["classes"])
    if source_classes != classes:
        first = next((i for i, (a, b) in enumerate(zip(source_classes, classes, strict=False)) if a != b), None)
        where = (
            "" if first is None else f", first difference at {first}: {source_classes[first]!r} vs {classes[first]!r}"
        )
        return f"other classes ({len(source_classes)} in the checkpoint, {len(classes)} here{where})"
    buffers = {name for name, _ in head.named_buffers()}  # computed from the new config: not compared
    source = {k: v for k, v in ckpt["head"].items() if k not in buffers}
    mismatch = _first_mismatch(dict(head.named_parameters()), source)
    return f"head weights of another shape: {mismatch}" if mismatch else None


@torch.no_grad()
def init_weights_from(
    path: Path,
    ckpt: dict[str, Any],
    cfg: ExperimentConfig,
    model: nn.Module,
    head: nn.Module,
    classes: list[str],
    sharded: bool = False,
) -> dict[str, Any]:
    """Copy the checkpoint's embedding weights into ``model`` and, when they fit (see the module docstring), its
    head's parameters into ``head``. Returns what was done, for the fold JSON:
    ``{"path", "fold", "epoch", "head": bool, "head_fresh_because": str}`` (the last only when the head is fresh)."""
    mismatch = _first_mismatch(model.state_dict(), ckpt["state_dict"])
    if mismatch:
        source = ckpt.get("config", {}).get("model", {})
        raise ConfigError(
            f"model.init_from={path} does not fit this model: {mismatch} (checkpoint: backbone "
            f"{source.get('backbone')!r}, neck {source.get('neck')!r}, embedding_size {source.get('embedding_size')}; "
            f"here: {cfg.model.backbone!r}, {cfg.model.neck!r}, {cfg.model.embedding_size})"
        )
    model.load_state_dict(ckpt["state_dict"])
    info: dict[str, Any] = {"path": str(path), "fold": ckpt.get("fold"), "epoch": ckpt.get("epoch")}
    reason = _head_mismatch(ckpt, path, cfg, head, classes, sharded)
    if reason is None:
        for name, p in head.named_parameters():
            p.copy_(ckpt["head"][name])
        log.info("model.init_from=%s: embedding model and head (%s) loaded", path, cfg.head.name)
    else:
        log.info("model.init_from=%s: embedding model loaded; the head starts fresh: %s", path, reason)
        info["head_fresh_because"] = reason
    info["head"] = reason is None
    return info
