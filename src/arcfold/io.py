"""Atomic file writes, guarded overwrites, safe loaders and file locks.

Every artifact arcfold writes (fold CSVs, checkpoints, OOF embeddings, scores, leaderboard, plots) goes through
:func:`atomic_path`: the data is written to a temporary file in the *same* directory and then ``os.replace``-d over
the target, so a crash or a kill leaves either the old file or the new one, never a half-written file that a later
stage would read as complete. A kill can leave the temporary file behind (``.<name>.<random>.<suffix>.tmp``);
nothing ever reads those, and the train stage removes its own when it starts again. The file gets the mode a plain
``open()`` would give it (``0o666 & ~umask``, e.g. 0644 under umask 022), not ``mkstemp``'s private 0600:
:func:`current_umask` reads the umask without changing it (``/proc/self/status``), so no other thread ever sees a
different one. A write that fails because the disk is full (``ENOSPC`` / ``EDQUOT``, or torch.save's C++ writer
failing on a disk with no space left) raises :class:`DiskFullError`, one line naming the file and the folder's free
space: the partial temporary file is removed and every file written before it is intact, so the same command
continues once space is freed (training: ``train.resume=true``).

The loaders (:func:`load_npz`, :func:`load_json`, :func:`load_torch`) turn a truncated or corrupt file
into a :class:`CorruptFileError` that names the file and says how to remake it; :func:`load_torch`
never runs code from the file (``torch.load(weights_only=True)``).

:func:`file_lock` serialises processes that share files (two ``train_fold.sh`` on different folds
at once): ``fcntl.flock`` on a lock file, released by the kernel when its process dies, even by
SIGKILL, so a crashed run never leaves a stale lock.

:func:`fault_point` is a test hook: the environment variable ``ARCFOLD_KILL_AT=<point>[#n]`` makes
the process SIGKILL itself the n-th time (default first) it reaches that named point, so tests can
kill a run at an exact place (mid-epoch, during validation, while writing a file).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from arcfold.errors import CorruptFileError, DiskFullError, LockedError, UnsafeFileError

log = logging.getLogger(__name__)

__all__ = [
    "atomic_path",
    "current_umask",
    "disk_full_error",
    "fault_point",
    "file_lock",
    "load_json",
    "load_npz",
    "load_torch",
    "remove_stale_temp_files",
    "save_json",
    "save_npz",
    "save_text",
    "save_torch",
    "unsafe_pickle_error",
]

KILL_AT_ENV = "ARCFOLD_KILL_AT"


# --------------------------------------------------------------------------------------------
# test hook: die at a named point

_fault_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    """SIGKILL this process here when ``ARCFOLD_KILL_AT`` is ``name`` or ``name#n`` (n-th visit, 1-based).

    A no-op (one dictionary lookup) unless the variable names this point. Points: ``train_batch``
    (before each training batch), ``validation`` (embeddings computed, nothing written yet),
    ``write:<file name>`` (the temporary file is complete, the rename has not happened).
    """
    target = os.environ.get(KILL_AT_ENV)
    if not target:
        return
    point, _, nth = target.partition("#")
    if point != name:
        return
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] == int(nth or 1):
        logging.shutdown()  # flush the log files, as a real crash would not; the kill itself is real
        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------------------------
# atomic writes


_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux >= 4.7: ``/proc/self/status``).

    Elsewhere it falls back to ``os.umask`` set and restored at once: for that instant a file another thread creates
    gets the stricter 0o077, never a looser mode (a lock keeps two such reads from restoring each other's 0o077).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    ``suffix`` defaults to the target's own suffix, because some writers (``np.savez``) append
    their extension to names that lack it. The file gets the mode ``open()`` would give it, ``0o666 & ~umask``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=(target.suffix if suffix is None else suffix) + ".tmp", dir=target.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it 0600; the writers keep the file's mode
        yield tmp
        # flush the file's data to disk before the rename makes it visible
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        fault_point(f"write:{target.name}")
        os.replace(tmp, target)
    except (OSError, RuntimeError) as e:
        full = disk_full_error(target, e)  # measured before the partial file is removed
        if full is None:
            raise
        raise full from e
    finally:
        if tmp.exists():
            tmp.unlink()


# torch.save's C++ stream writer reports a failed write without an errno: "basic_ios::clear: iostream error",
# "PytorchStreamWriter failed writing file data/0: file write failed", "unexpected pos ..."
_STREAM_WRITE_FAILED = re.compile(r"iostream error|file write failed|PytorchStreamWriter failed|unexpected pos")
# that failure counts as a full disk when less than this is left in the folder (the partial file not yet removed)
FULL_DISK_BYTES = 64 * 2**20


def disk_full_error(target: Path, error: BaseException) -> DiskFullError | None:
    """The one-line :class:`DiskFullError` for a write of ``target`` that failed for want of space, else None.

    An ``OSError`` says so by its errno (``ENOSPC``, ``EDQUOT``); torch's stream writer raises a ``RuntimeError``
    without one, taken for a full disk when the folder has less than :data:`FULL_DISK_BYTES` free.
    """
    try:
        free: int | None = shutil.disk_usage(target.parent).free
    except OSError:
        free = None
    if isinstance(error, OSError):
        full = error.errno in (errno.ENOSPC, errno.EDQUOT)
    else:
        full = bool(_STREAM_WRITE_FAILED.search(str(error))) and free is not None and free < FULL_DISK_BYTES
    if not full:
        return None
    space = f"{_size(free)} free" if free is not None else "free space unknown"
    return DiskFullError(
        f"cannot write {target}: no space left on the disk ({space} in {target.parent}); the files written before "
        "it are intact. Free some space and run the same command again (training continues from its last finished "
        "epoch with train.resume=true)"
    )


def _size(n_bytes: int) -> str:
    """1536 -> '1.5 KiB'."""
    size = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def save_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_json(path: str | os.PathLike, obj: Any) -> None:
    save_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """``np.savez`` (uncompressed: embeddings barely compress and loading stays fast), atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def remove_stale_temp_files(folder: str | os.PathLike, prefix: str = "") -> int:
    """Delete the temporary files :func:`atomic_path` left in ``folder`` when killed (names ``.<prefix>*.tmp``).

    Call it only while no other process can be writing those files (under the job's lock).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = [p for p in folder.glob(f".{prefix}*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        log.info("removed %d temporary file(s) left by an interrupted run in %s", len(stale), folder)
    return len(stale)


def _corrupt(path: str | os.PathLike, kind: str, error: BaseException, hint: str) -> CorruptFileError:
    return CorruptFileError(
        f"cannot read {path}: truncated, corrupt or not {kind} ({type(error).__name__}: {error}). {hint}".rstrip()
    )


def load_npz(path: str | os.PathLike, hint: str = "") -> dict[str, np.ndarray]:
    """Load every array of an ``.npz`` eagerly; a truncated or corrupt file raises :class:`CorruptFileError`.

    ``hint`` is appended to the message: how to remake the file.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise _corrupt(path, "an .npz file", e, hint) from e


def load_json(path: str | os.PathLike, hint: str = "") -> Any:
    """``json.load`` that names the file when it is truncated or not JSON (:class:`CorruptFileError`)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _corrupt(path, "a JSON file", e, hint) from e


def unsafe_pickle_error(path: str | os.PathLike, error: BaseException, hint: str = "") -> UnsafeFileError | None:
    """The :class:`UnsafeFileError` for ``torch.load(weights_only=True)``'s refusal, or None for other errors.

    torch's own message ends by suggesting ``weights_only=False``, which would run the payload: it is not repeated.
    """
    text = str(error)
    if "weights_only" not in text and "GLOBAL" not in text:
        return None
    found = re.findall(r"GLOBAL ([\w.]+)|Unsupported globals?: ([\w.]+(?:, [\w.]+)*)", text)
    names = sorted({name.strip(".") for pair in found for part in pair for name in part.split(", ") if name})
    what = f" ({', '.join(names)})" if names else ""
    return UnsafeFileError(
        f"refused to load {path}: it holds pickled Python objects{what} besides tensors and plain data, and "
        "unpickling them could run code (arcfold loads tensors and plain data only). "
        + (hint or "Use a state dict of tensors or a .safetensors file from a source you trust.")
    )


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path: str | os.PathLike, hint: str = "") -> Any:
    """``torch.load(weights_only=True)`` on CPU: tensors and plain data only, no code from the file runs.

    A pickle that would build any other object (a ``__reduce__`` payload calling ``os.system``, say) is
    refused before it runs (:class:`UnsafeFileError`); a truncated or corrupt file raises :class:`CorruptFileError`.
    """
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # pickle.UnpicklingError, RuntimeError (zip archive), EOFError, ...
        raise (unsafe_pickle_error(path, e, hint) or _corrupt(path, "a PyTorch file", e, hint)) from None


# --------------------------------------------------------------------------------------------
# file locks


def _lock_holder(handle) -> str:
    handle.seek(0)
    holder = handle.read().strip()
    return f" (held by {holder})" if holder else ""


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, blocking: bool = True, what: str = "") -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` (created if needed) for the ``with`` block.

    ``blocking=True`` waits for the holder (logging once that it waits); ``blocking=False`` raises
    :class:`LockedError` naming ``what`` and the holder. The lock file stays (it is tiny and reused);
    the lock itself dies with the process that holds it. POSIX only (``fcntl``), like Kaggle and Colab.
    """
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = _lock_holder(handle)
            if not blocking:
                raise LockedError(f"{what or path} is in use by another process{holder}; lock file {path}") from None
            log.info("waiting for %s%s (lock %s)", what or path, holder, path)
            t0 = time.time()
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            log.info("got %s after %.1f s", what or path, time.time() - t0)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        handle.flush()
        try:
            yield path
        finally:
            handle.seek(0)
            handle.truncate()
            handle.flush()
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
