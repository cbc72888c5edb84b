"""Logging set-up: the console format of every stage, and a run's log file (``train.log``).

:func:`quiet_loaders` keeps the import-time chatter of libraries below WARNING: faiss's loader logs six INFO lines
on every import, one of them ``ModuleNotFoundError(... swigfaiss_avx512)`` (it tries its AVX-512 build first and
falls back), which reads like a failure in an inference or notebook log. Their warnings and errors still show.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

__all__ = ["QUIET_LOGGERS", "attach_file_log", "detach_file_log", "quiet_loaders", "setup_logging"]

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

QUIET_LOGGERS: tuple[str, ...] = ("faiss.loader",)  # shown from WARNING up, whatever the console level


def quiet_loaders() -> None:
    """Raise :data:`QUIET_LOGGERS` to WARNING, unless someone already gave them a level of their own."""
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format=FORMAT, datefmt="%H:%M:%S", stream=sys.stderr)
    quiet_loaders()


def attach_file_log(path: Path) -> logging.Handler:
    """Send arcfold's log records to ``path`` (appended: a resumed run continues the log of the killed one).

    The file gets INFO records even when nobody configured logging (``train_fold`` called from a notebook):
    the ``arcfold`` logger is lowered to INFO while the handler is attached, and restored by
    :func:`detach_file_log`; with no other handler configured, the console still shows warnings only.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(FORMAT))
    logger = logging.getLogger("arcfold")
    handler.previous_level = logger.level  # type: ignore[attr-defined]
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return handler


def detach_file_log(handler: logging.Handler) -> None:
    logger = logging.getLogger("arcfold")
    logger.removeHandler(handler)
    logger.setLevel(handler.previous_level)  # type: ignore[attr-defined]
    handler.close()
