import os
import stat

import numpy as np
import pytest
import torch

import arcfold.io
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
