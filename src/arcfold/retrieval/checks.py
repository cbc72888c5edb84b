"""Argument checks shared by the retrieval functions: one clear ``ValueError`` naming the argument."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["check_int", "check_real", "numba_available"]


def check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_real(value: Any, name: str, lo: float, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if not (lo <= float(value) <= hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")
    return float(value)


def numba_available() -> bool:
    """Whether numba can be imported (the compiled kernels of :mod:`arcfold.retrieval.kernels`)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True
