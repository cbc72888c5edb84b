import numpy as np
import pytest

from arcfold.io import atomic_path, load_npz, save_json, save_npz


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
