"""The errors a user can cause and fix: each is reported by the CLI as one line (exit 2), never a traceback.

They sit at the bottom of the import graph so that any layer can raise them and the stage runner
(:func:`arcfold.stages.cli.run_cli`) can catch them all without importing the layers that raise them.
"""

from __future__ import annotations

__all__ = [
    "USER_ERRORS",
    "ArtifactExistsError",
    "BlendError",
    "ConfigError",
    "CorruptFileError",
    "DataValidationError",
    "DiskFullError",
    "LockedError",
    "NonFiniteLossError",
    "RerankError",
    "RunInterrupted",
    "SubmissionError",
    "UnsafeFileError",
]


class ConfigError(ValueError):
    """A config file or override is invalid (unknown key, wrong type, impossible value)."""


class ArtifactExistsError(FileExistsError):
    """A finished artifact would be overwritten and the user did not ask for it (``force``)."""


class CorruptFileError(ValueError):
    """A file exists but cannot be read as what it should be: truncated, corrupt, or of another kind."""


class UnsafeFileError(CorruptFileError):
    """A file that would run code if loaded (a pickle of Python objects besides tensors and plain data): refused."""


class DiskFullError(OSError):
    """A file could not be written because its disk is full; the message names the file and the free space."""


class LockedError(ArtifactExistsError):
    """Another process holds the lock of a job that must not run twice (the same fold, say)."""


class DataValidationError(ValueError):
    """The training data is not usable as given; the message lists every problem found."""


class BlendError(ValueError):
    """The experiments cannot be blended as asked (different folds, rows or fold files)."""


class RerankError(ValueError):
    """The rerank stage cannot run as asked."""


class SubmissionError(ValueError):
    """A submission (or the predictions meant for one) is not valid; the message names row, line and column."""


class NonFiniteLossError(FloatingPointError):
    """Too many training steps in a row were skipped for a non-finite loss or non-finite gradients."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped a training run; the message names the last finished epoch and how to continue.

    A ``KeyboardInterrupt`` still (``except Exception`` does not swallow it); the CLI prints it as one line, exit 130.
    """


# What a stage run reports as one line and exit 2. FileNotFoundError: a missing input the message names.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    DataValidationError,
    ArtifactExistsError,
    FileNotFoundError,
    CorruptFileError,
    BlendError,
    RerankError,
    SubmissionError,
    NonFiniteLossError,
    DiskFullError,
)
