"""Logging set-up: the console format of every stage, and a run's log file (``train.log``).

:func:`quiet_loaders` keeps the import-time chatter of libraries below WARNING: faiss's loader logs six INFO lines
on every import, one of them ``ModuleNotFoundError(... swigfaiss_avx512)`` (it tries its AVX-512 build first and
falls back), which reads like a failure in an inference or notebook log. Their warnings and errors still show.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from arcfold.errors import USER_ERRORS

__all__ = ["QUIET_LOGGERS", "attach_file_log", "detach_file_log", "quiet_loaders", "run_log", "setup_logging"]

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
    handler = _RunLogHandler(path)
    handler.setFormatter(logging.Formatter(FORMAT))
    logger = logging.getLogger("arcfold")
    handler.previous_level = logger.level  # type: ignore[attr-defined]
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return handler


class _RunLogHandler(logging.FileHandler):
    """A run's log file. A record it cannot write (a full disk) is said once, in one line on stderr, instead of
    logging's traceback for every record: the run goes on, and the error that stops it names the disk."""

    failed = False

    def handleError(self, record: logging.LogRecord | None) -> None:
        if not self.failed:
            self.failed = True
            sys.stderr.write(f"arcfold: cannot write the log file {self.baseFilename}: {sys.exc_info()[1]}\n")

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # the last records could not be flushed
            self.handleError(None)


@contextlib.contextmanager
def run_log(path: Path) -> Iterator[logging.Handler]:
    """:func:`attach_file_log` for the ``with`` block, which also records in the file the error that ends it.

    The console is left to whoever catches the error (the CLI prints a user error or Ctrl-C as one line); the file
    gets the same line, or, for anything else (a bug), the error with its traceback.
    """
    handler = attach_file_log(path)
    try:
        yield handler
    except BaseException as e:
        one_line = isinstance(e, (*USER_ERRORS, KeyboardInterrupt))
        message = (str(e) or "interrupted (Ctrl-C)") if one_line else f"{type(e).__name__}: {e}"
        exc_info = None if one_line else (type(e), e, e.__traceback__)
        handler.handle(logging.LogRecord("arcfold", logging.ERROR, __file__, 0, "%s", (message,), exc_info))
        raise
    finally:
        detach_file_log(handler)


def detach_file_log(handler: logging.Handler) -> None:
    logger = logging.getLogger("arcfold")
    logger.removeHandler(handler)
    logger.setLevel(handler.previous_level)  # type: ignore[attr-defined]
    handler.close()
