import errno
import json
import os
import shutil
import stat
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import arcfold.io
from arcfold.errors import DiskFullError
from arcfold.io import atomic_path, current_umask, load_npz, save_json, save_npz, save_text, save_torch


def test_atomic_write_leaves_old_file_on_crash(tmp_path):
    target = tmp_path / "scores.json"
    save_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"a": 2, "half')
        raise RuntimeError("killed mid-write")
    assert target.read_text().strip().replace(" ", "").replace("\n", "") == '{"a":1}'
    assert [p.name for p in tmp_path.iterdir()] == ["scores.json"]  # no temp file left behind


def test_npz_round_trip_and_truncation(tmp_path):
    path = tmp_path / "fold0.npz"
    save_npz(path, embeddings=np.eye(3, dtype=np.float32), labels=np.array(["a", "b", "c"]))
    arrays = load_npz(path)
    assert arrays["labels"].tolist() == ["a", "b", "c"] and arrays["embeddings"].shape == (3, 3)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated"):
        load_npz(path)


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring the previous one after."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_written_files_get_the_mode_open_would_give(tmp_path, umask, mask, mode):
    umask(mask)
    save_json(tmp_path / "a.json", {"a": 1})
    save_npz(tmp_path / "b.npz", x=np.zeros(2))
    save_torch(tmp_path / "c.pt", {"w": torch.zeros(2)})
    save_text(tmp_path / "d.md", "text\n")
    with atomic_path(tmp_path / "e.png") as tmp:
        tmp.write_bytes(b"\x89PNG")
    with open(tmp_path / "plain.txt", "w"):  # the reference: what a plain open() gives under this umask
        pass
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["a.json", "b.npz", "c.pt", "d.md", "e.png", "plain.txt"], mode)


def test_current_umask_reads_without_changing_it(umask, monkeypatch):
    umask(0o027)
    assert current_umask() == 0o027
    assert os.umask(0o027) == 0o027  # unchanged by the read

    def no_proc(*args, **kwargs):
        raise OSError("no /proc here")

    monkeypatch.setattr(arcfold.io, "open", no_proc, raising=False)  # the set/restore fallback
    assert current_umask() == 0o027
    assert os.umask(0o027) == 0o027


# --------------------------------------------------------------------------------------------
# a full disk: one line naming the file and the free space, the old file intact


@pytest.fixture
def full_disk(monkeypatch):
    """``shutil.disk_usage`` reports a disk with nothing left (4 KiB, less than one more block)."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: _usage(free=4096))


def _usage(free: int) -> SimpleNamespace:
    return SimpleNamespace(total=10 * 2**30, used=10 * 2**30 - free, free=free)


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_names_the_file_and_the_free_space_and_keeps_the_old_file(tmp_path, monkeypatch, full_disk):
    target = tmp_path / "scores.json"
    save_json(target, {"a": 1})
    monkeypatch.setattr(Path, "write_text", _no_space)  # the writer: text files and JSON
    with pytest.raises(DiskFullError) as e:
        save_json(target, {"a": 2})
    assert str(e.value).startswith(f"cannot write {target}: no space left on the disk (4.0 KiB free in {tmp_path}); ")
    assert "the files written before it are intact" in str(e.value) and "train.resume=true" in str(e.value)
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["scores.json"]  # the partial file is removed

    monkeypatch.setattr(np, "savez", _no_space)  # the writer of OOF embeddings
    with pytest.raises(DiskFullError, match=rf"^cannot write {tmp_path / 'fold0.npz'}: no space left"):
        save_npz(tmp_path / "fold0.npz", embeddings=np.eye(2))
    assert [p.name for p in tmp_path.iterdir()] == ["scores.json"]


@pytest.mark.parametrize(
    "message",
    ["basic_ios::clear: iostream error", "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"],
)
def test_torch_save_on_a_full_disk_names_the_file(tmp_path, monkeypatch, full_disk, message):
    def failing_save(obj, f):  # what torch's C++ stream writer raises on a full disk: no errno, no file name
        Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise RuntimeError(message)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(DiskFullError, match=rf"^cannot write {tmp_path / 'last.pt'}: no space left on the disk "):
        save_torch(tmp_path / "last.pt", {"epoch": 0})
    assert list(tmp_path.iterdir()) == []


def test_other_write_failures_are_not_called_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: _usage(free=9 * 2**30))

    def failing_save(obj, f):
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(RuntimeError, match="^basic_ios::clear: iostream error$"):  # 9 GiB free: something else
        save_torch(tmp_path / "last.pt", {"epoch": 0})

    def permission_denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "write_text", permission_denied)
    with pytest.raises(PermissionError):
        save_json(tmp_path / "x.json", {})
