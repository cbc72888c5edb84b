"""The resume point (``last.pt``): its format, what it holds, and the checks before a run continues from it.

An epoch counts as done once its ``last.pt`` is written. ``last.pt`` holds model, head, optimizer, scheduler,
GradScaler, EMA, best and kept epoch, history and the non-finite counter, so a resumed run ends bit-identical to one
never interrupted on a deterministic device; and ``seconds``, the run's elapsed time so far over all its processes,
which a resumed run adds to its own (the fold JSON's ``seconds``; absent from older resume points: 0). Resuming
with another config is refused (the keys that differ are listed), except for :data:`RESUME_MAY_DIFFER`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from arcfold.config import ExperimentConfig, config_to_dict
from arcfold.errors import ArtifactExistsError, CorruptFileError
from arcfold.io import load_torch

__all__ = ["RESUME_MAY_DIFFER", "TRAIN_STATE_FORMAT", "check_resume_config", "load_resume_point"]

TRAIN_STATE_FORMAT = "arcfold.train_state/1"

# config keys that may differ between a run and its resumption: they do not change what is computed (each is tried
# by tests/training/test_reliability_resume_keys.py; train.device only as long as the kind of device stays the same)
RESUME_MAY_DIFFER = (
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


def check_resume_config(stored: dict[str, Any], cfg: ExperimentConfig, source: Path) -> None:
    """Refuse to resume with a config that changes the result: the continued run would mix two experiments."""

    def flat(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in mapping.items():
            if isinstance(value, dict) and key not in ("params", "miner_params"):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    before, now = flat(stored), flat(config_to_dict(cfg))
    differ = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k) and k not in RESUME_MAY_DIFFER)
    if differ:
        detail = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in differ)
        raise ArtifactExistsError(
            f"{source} was trained with another config ({detail}); resume with the same settings, or start "
            "over with train.force=true (or train a new experiment: name=...)"
        )


def load_resume_point(path: Path, cfg: ExperimentConfig) -> dict[str, Any]:
    """``last.pt``, checked to be a training state written with a config this run may continue."""
    ckpt = load_torch(path, hint="Start the fold over with train.force=true.")
    if not isinstance(ckpt, dict) or ckpt.get("format") != TRAIN_STATE_FORMAT:
        raise CorruptFileError(f"{path} is not an arcfold training state; start the fold over with train.force=true")
    check_resume_config(ckpt["config"], cfg, path)
    return ckpt
