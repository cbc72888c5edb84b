"""Files: every artifact is written atomically (a kill mid-write leaves the old file), a truncated file is
reported by name with the way to remake it, and no file loaded as weights can run code."""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import arcfold.io
from arcfold.config import ModelConfig, load_config
from arcfold.data.folds import ensure_folds
from arcfold.errors import CorruptFileError, DataValidationError, UnsafeFileError
from arcfold.experiments.leaderboard import build_leaderboard, write_leaderboard
from arcfold.experiments.plots import make_plots
from arcfold.experiments.score import score_experiment
from arcfold.io import KILL_AT_ENV, load_npz, load_torch
from arcfold.models.embedding import build_model, create_backbone, embedding_checkpoint, load_embedding_model
from arcfold.training.fold import train_fold
from arcfold.training.paths import FoldPaths

from ..conftest import mini_overrides, write_mini_dataset
from ..experiments.test_leaderboard import clustered_embeddings, fold_rows, write_experiment, write_images

# --------------------------------------------------------------------------------------------
# atomic writes: killed while writing, the old file survives whole


def _killed_while_writing(name: str, write) -> int:
    """Run ``write()`` in a forked child that SIGKILLs itself between writing ``name``'s temp file and renaming it."""

    def child():
        os.environ[KILL_AT_ENV] = f"write:{name}"
        arcfold.io._fault_counts.clear()
        write()

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join(timeout=120)
    return proc.exitcode


@pytest.fixture
def experiment(tmp_path):
    """A finished two-fold experiment 'exp' (the files train_fold writes), with its images."""
    rng = np.random.default_rng(0)
    rows = {k: fold_rows(k, n_classes=6, per_class=3) for k in (0, 1)}
    emb = {k: clustered_embeddings(rows[k]["labels"], 16, 1.0, rng) for k in (0, 1)}
    oof_dir = write_experiment(tmp_path, "exp", emb, rows, n_splits=2, overrides=("data.dataset=fake",))
    write_images(tmp_path / "input" / "fake", rows, size=16)
    return oof_dir


WRITERS = {
    "scores": lambda oof: score_experiment(oof),
    "leaderboard": lambda oof: write_leaderboard(build_leaderboard(oof.parent), oof.parent),
    "plots": lambda oof: make_plots("exp", oof.parent, 0, n_queries=2, max_points=40),
}


def _write_and_die(artifact: str, name: str, oof: str) -> None:
    os.environ[KILL_AT_ENV] = f"write:{name}"
    arcfold.io._fault_counts.clear()  # a forked child inherits the parent's counts
    WRITERS[artifact](Path(oof))


@pytest.mark.parametrize(
    "artifact, name",
    [
        ("scores", "scores.csv"),
        ("scores", "scores.json"),
        ("leaderboard", "leaderboard.csv"),
        ("leaderboard", "leaderboard.md"),
        ("plots", "plots.json"),
        ("plots", "fold0_embedding_map.png"),
    ],
)
def test_kill_while_writing_an_artifact_leaves_the_previous_one_whole(experiment, artifact, name):
    WRITERS[artifact](experiment)  # a first, complete version
    target = next(p for p in experiment.parent.rglob(name) if not p.name.startswith("."))
    before = target.read_bytes()
    (experiment / "fold1.npz").unlink()  # the next version would differ (one fold fewer)
    (experiment / "fold1.json").unlink()
    # plots run t-SNE: after a fork, a child entering an OpenMP region the parent already used can hang forever
    # in libgomp, so that child is spawned (slower: it imports everything again)
    context = multiprocessing.get_context("spawn" if artifact == "plots" else "fork")
    proc = context.Process(target=_write_and_die, args=(artifact, name, str(experiment)))
    proc.start()
    proc.join(timeout=300)
    assert proc.exitcode == -signal.SIGKILL
    assert target.read_bytes() == before  # never a half-written or mixed file
    assert list(target.parent.glob(f".{name}.*.tmp"))  # the new version died in its temporary file


def test_kill_while_writing_the_fold_file_leaves_no_fold_file(tmp_path):
    write_mini_dataset(tmp_path / "input")
    cfg = load_config(None, [*mini_overrides(tmp_path), "data.check_images=none"])
    assert _killed_while_writing("mini.csv", lambda: ensure_folds(cfg)) == -signal.SIGKILL
    assert not cfg.folds_path.exists()  # not a partial fold file that the next run would reuse
    path = ensure_folds(cfg)  # the next run makes it whole
    assert path.exists() and path.with_suffix(".json").exists()


# --------------------------------------------------------------------------------------------
# truncated and corrupt files are named, with the way out


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_fold_json_is_named_by_score_and_leaderboard(experiment):
    _truncate(experiment / "fold1.json")
    with pytest.raises(CorruptFileError, match=r"fold1\.json: truncated, corrupt or not a JSON file") as e:
        score_experiment(experiment)
    assert "--recompute" in str(e.value)
    assert len(score_experiment(experiment, recompute=True)) == 4  # 2 folds + mean + std, from the embeddings
    with pytest.raises(CorruptFileError, match=r"fold1\.json.*--exclude"):
        build_leaderboard(experiment.parent)


def test_truncated_oof_npz_is_named_with_the_fix(experiment):
    _truncate(experiment / "fold0.npz")
    with pytest.raises(CorruptFileError, match=r"fold0\.npz: truncated, corrupt or not an \.npz file.*train\.force"):
        score_experiment(experiment, recompute=True)


def test_truncated_checkpoint_and_resume_point_are_named(tmp_path):
    cfg = load_config(None, [*mini_overrides(tmp_path)])
    model = build_model(cfg.model)
    path = tmp_path / "fold0.pt"
    torch.save(embedding_checkpoint(model, cfg, fold=0), path)
    _truncate(path)
    with pytest.raises(CorruptFileError, match=r"fold0\.pt: truncated, corrupt.*Retrain the fold"):
        load_embedding_model(path)
    paths = FoldPaths(cfg, 0)
    paths.work.mkdir(parents=True)
    paths.last.write_bytes(path.read_bytes())
    with pytest.raises(CorruptFileError, match=r"last\.pt: truncated, corrupt.*train\.force=true"):
        train_fold(load_config(None, [*mini_overrides(tmp_path), "train.resume=true"]), 0)


def test_truncated_fold_file_is_refused_naming_rows(tmp_path):
    write_mini_dataset(tmp_path / "input")
    cfg = load_config(None, [*mini_overrides(tmp_path), "data.check_images=none"])
    path = ensure_folds(cfg)
    text = path.read_text()
    path.write_text(text[: len(text) // 2].rsplit(",", 1)[0])  # cut inside a row, as a copy cut short would be
    with pytest.raises(DataValidationError, match=r"mini\.csv: column 'fold' must hold fold numbers.*row \d+ \(line"):
        ensure_folds(cfg)


# --------------------------------------------------------------------------------------------
# untrusted files never run code


class _Payload:
    """Unpickling this calls os.system: what a malicious 'weights' file on a Kaggle data set would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _malicious(path: Path, marker: Path, arcfold_like: bool = True) -> Path:
    state = {"conv.weight": torch.zeros(2), "evil": _Payload(marker)}
    obj = {"format": "arcfold.embedding/1", "config": {}, "state_dict": state} if arcfold_like else state
    torch.save(obj, path)
    return path


def test_the_payload_is_live(tmp_path):
    """The malicious file of these tests does run code when loaded without weights_only (so they can fail)."""
    marker = tmp_path / "pwned"
    torch.load(_malicious(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.exists()


def test_malicious_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = _malicious(tmp_path / "fold0.pt", marker)
    unsafe = r"refused to load .*fold0\.pt: it holds pickled Python objects \(posix\.system\).*could run code"
    with pytest.raises(UnsafeFileError, match=unsafe):
        load_embedding_model(path)
    with pytest.raises(UnsafeFileError, match=unsafe):
        load_torch(path)
    assert not marker.exists()


def test_malicious_resume_point_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    cfg = load_config(None, [*mini_overrides(tmp_path), "train.resume=true"])
    paths = FoldPaths(cfg, 0)
    paths.work.mkdir(parents=True)
    _malicious(paths.last, marker)
    with pytest.raises(UnsafeFileError, match=r"refused to load .*last\.pt"):
        train_fold(cfg, 0)
    assert not marker.exists()


def test_malicious_pretrained_weights_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = _malicious(tmp_path / "resnet10t.pth", marker, arcfold_like=False)
    with pytest.raises(
        UnsafeFileError, match=r"refused to load model.pretrained_path=.*resnet10t\.pth: it holds pickled"
    ):
        create_backbone(ModelConfig(backbone="resnet10t", pretrained_path=str(path)))
    assert not marker.exists()


def test_npz_with_pickled_objects_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "fold0.npz"
    np.savez(path, embeddings=np.array([_Payload(marker)], dtype=object))
    with pytest.raises(CorruptFileError, match=r"fold0\.npz"):
        load_npz(path)  # allow_pickle=False
    assert not marker.exists()
