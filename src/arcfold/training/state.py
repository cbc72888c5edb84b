"""The resume point (``last.pt``): its format, what it holds, and the checks before a run continues from it; and
the check that a run belongs to the experiment whose folders it writes to (:func:`check_same_experiment`).

An epoch counts as done once its ``last.pt`` is written. ``last.pt`` holds model, head, optimizer, scheduler,
GradScaler, EMA, best and kept epoch, history and the non-finite counter, so a resumed run ends bit-identical to one
never interrupted on a deterministic device; and ``seconds``, the run's elapsed time so far over all its processes,
which a resumed run adds to its own (the fold JSON's ``seconds``; absent from older resume points: 0). Resuming
with another config is refused (the keys that differ are listed), except for :data:`RESUME_MAY_DIFFER`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from arcfold.config import ExperimentConfig, config_to_dict
from arcfold.errors import ArtifactExistsError, CorruptFileError
from arcfold.io import load_torch

__all__ = [
    "RESUME_MAY_DIFFER",
    "SAME_EXPERIMENT_MAY_DIFFER",
    "TRAIN_STATE_FORMAT",
    "check_resume_config",
    "check_same_experiment",
    "config_differences",
    "load_resume_point",
    "variant_name",
]

TRAIN_STATE_FORMAT = "arcfold.train_state/1"

# config keys that may differ between a run and its resumption: they do not change what is computed (each is tried
# by tests/training/test_reliability_resume_keys.py; train.device only as long as the kind of device stays the same)
RESUME_MAY_DIFFER: tuple[str, ...] = (
    "train.resume",
    "train.force",
    "train.progress",
    "train.device",
    "train.max_nonfinite_steps",
    "train.dist_timeout_s",
    "data.input_dir",
    "data.num_workers",
    "data.check_images",
    "data.cache_images",
    "paths.folds_dir",
    "paths.oof_dir",
    "paths.models_dir",
)
# ... and between the runs of one experiment (its folds, its full fit): the full fit's epoch count too
SAME_EXPERIMENT_MAY_DIFFER = (*RESUME_MAY_DIFFER, "train.full_epochs")


def _flat(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and key not in ("params", "miner_params"):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(
    stored: dict[str, Any], cfg: ExperimentConfig, may_differ: tuple[str, ...]
) -> list[tuple[str, Any, Any]]:
    """``(key, stored value, value now)`` of every dotted key that differs, except ``may_differ``.

    A key the stored config does not have (it was written before the key existed) counts at the key's default: a
    new key's default keeps the code's former behaviour, so a run that sets it otherwise differs (and one that
    leaves it at its default does not)."""
    defaults = _flat(config_to_dict(ExperimentConfig()))
    before, now = {**defaults, **_flat(stored)}, _flat(config_to_dict(cfg))
    keys = before.keys() | now.keys()
    return [(k, before.get(k), now.get(k)) for k in sorted(keys) if before.get(k) != now.get(k) and k not in may_differ]


def _detail(differ: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in differ)


def check_resume_config(stored: dict[str, Any], cfg: ExperimentConfig, source: Path) -> None:
    """Refuse to resume with a config that changes the result: the continued run would mix two experiments."""
    differ = config_differences(stored, cfg, RESUME_MAY_DIFFER)
    if differ:
        raise ArtifactExistsError(
            f"{source} was trained with another config ({_detail(differ)}); resume with the same settings, or start "
            "over with train.force=true (or train a new experiment: name=...)"
        )


def variant_name(cfg: ExperimentConfig, differ: list[tuple[str, Any, Any]]) -> str:
    """A name for a variant of ``cfg.name`` from the keys it changes, e.g. ``glyphs_arcface_cosface`` for
    ``head.name=cosface`` or ``glyphs_arcface_epochs20`` for ``train.epochs=20``."""
    parts = []
    for key, _, value in differ[:2]:
        leaf = key.rsplit(".", 1)[-1]
        parts.append(str(value) if leaf == "name" else f"{leaf}{value}")
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "_".join([cfg.name, *parts])).strip("-")


def check_same_experiment(cfg: ExperimentConfig, own_config: Path, force: bool) -> None:
    """Refuse a run whose config changes the result compared with the experiment's finished runs (each fold's
    ``oof/<exp>/fold<K>.config.yaml``, the full fit's ``models/<exp>/full.config.yaml``): their outputs would mix
    two experiments in one folder. ``own_config`` is this run's own file, not compared when ``force`` retrains it.
    :data:`SAME_EXPERIMENT_MAY_DIFFER` may differ; a key a stored config does not have counts at its default."""
    stored_paths = sorted(cfg.oof_dir.glob("fold*.config.yaml")) + [cfg.models_dir / "full.config.yaml"]
    for path in stored_paths:
        if not path.is_file() or (force and path == own_config):
            continue
        try:
            stored = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise CorruptFileError(
                f"{path}: not a readable config ({e}); retrain that fold: train.force=true"
            ) from None
        differ = config_differences(stored or {}, cfg, SAME_EXPERIMENT_MAY_DIFFER)
        if differ:
            raise ArtifactExistsError(
                f"experiment '{cfg.name}' was trained with another config ({path}: {_detail(differ)}); a run that "
                f"changes the result is another experiment: give it its own name, e.g. name={variant_name(cfg, differ)}"
            )


def load_resume_point(path: Path, cfg: ExperimentConfig) -> dict[str, Any]:
    """``last.pt``, checked to be a training state written with a config this run may continue."""
    ckpt = load_torch(path, hint="Start the fold over with train.force=true.")
    if not isinstance(ckpt, dict) or ckpt.get("format") != TRAIN_STATE_FORMAT:
        raise CorruptFileError(f"{path} is not an arcfold training state; start the fold over with train.force=true")
    check_resume_config(ckpt["config"], cfg, path)
    return ckpt
