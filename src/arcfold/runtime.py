"""Where and how code runs, shared by training and inference: the device, the AMP dtype, seeds, the commit."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import numpy as np
import torch

from arcfold.errors import ConfigError

__all__ = ["amp_dtype_for", "git_commit", "resolve_device", "seed_everything"]


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """``auto`` is CUDA when present, else CPU; asking for CUDA without it is a :class:`ConfigError` naming ``key``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={name} but CUDA is not available; use {key}=cpu or auto")
    return device


def amp_dtype_for(amp: str, device: torch.device, key: str = "train.amp") -> torch.dtype | None:
    """None means full fp32. fp16 needs a GradScaler; bf16 (same exponent range as fp32) does not."""
    if amp == "auto":
        return torch.float16 if device.type == "cuda" else None
    if amp == "fp16" and device.type == "cpu":
        raise ConfigError(f"{key}=fp16 is not supported on CPU; use bf16 or off")
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "off": None}[amp]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def git_commit() -> str:
    """The code's commit (``git describe --always --dirty``), or "-" outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "-"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "-"
