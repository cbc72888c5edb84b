"""The full-data fit (``--fold full``, ``bash train_fold.sh full``): one model on every row of every fold, never the
test split, no validation, the last epoch kept; its epoch count, resume and refusal to overwrite; the test stage and
inference take ``full.pt`` as a member, alone or with the folds."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import arcfold.training.fold
from arcfold.__main__ import main as arcfold_main
from arcfold.artifacts import parse_folds
from arcfold.config import load_config
from arcfold.data.dataset import ImageDataset
from arcfold.data.folds import file_sha256
from arcfold.data.transforms import build_eval_transform
from arcfold.errors import ArtifactExistsError, ConfigError
from arcfold.inference.config import load_inference_config
from arcfold.inference.ensemble import embed_images, load_ensemble
from arcfold.io import load_json, load_npz, load_torch
from arcfold.models.embedding import load_embedding_model
from arcfold.retrieval.ensemble import blend_embeddings
from arcfold.retrieval.metrics import DEFAULT_KS, retrieval_metrics
from arcfold.training.finalize import full_fit_epochs
from arcfold.training.fold import train_fold
from arcfold.training.paths import FoldPaths

from ..conftest import REPO, mini_overrides, write_mini_dataset

METRICS = [f"recall@{k}" for k in DEFAULT_KS] + ["map@r"]


def _overrides(root: Path, *extra: str) -> list[str]:
    """The mini data set (4 groups) with 1 group held out as the test split and the other 3 in 2 folds."""
    write_mini_dataset(root / "input")
    base = [o for o in mini_overrides(root) if not o.startswith("folds.n_splits")]
    return [*base, "folds.n_splits=2", "folds.test_fraction=0.25", *extra]


def _folds(cfg) -> pd.DataFrame:
    return pd.read_csv(cfg.folds_path, dtype=str, keep_default_na=False)


def _write_fold_json(cfg, fold: int, finished: bool = True, **fields) -> None:
    cfg.oof_dir.mkdir(parents=True, exist_ok=True)
    (cfg.oof_dir / f"fold{fold}.json").write_text(json.dumps({"fold": fold, **fields}))
    if finished:  # the OOF file marks a fold finished; its content is never read here
        (cfg.oof_dir / f"fold{fold}.npz").write_bytes(b"")


def test_parse_folds_takes_full_alone_or_last_in_a_list():
    assert parse_folds("full") == ["full"]
    assert parse_folds("full,0..2") == [0, 1, 2, "full"]
    assert parse_folds("1,3") == [1, 3]
    for bad in ("fulll", "0,x", "", "-1"):
        with pytest.raises(ValueError, match="bad fold spec"):
            parse_folds(bad)


def test_full_fit_trains_on_every_non_test_row_without_validation(tmp_path, monkeypatch, caplog):
    cfg = load_config(None, _overrides(tmp_path, "train.epochs=2"))
    datasets: list[ImageDataset] = []

    class Recorded(ImageDataset):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            datasets.append(self)

    def no_validation(*args, **kwargs):
        raise AssertionError("the full fit has no validation set")

    monkeypatch.setattr(arcfold.training.fold, "ImageDataset", Recorded)
    monkeypatch.setattr(arcfold.training.fold, "extract_embeddings", no_validation)
    with caplog.at_level(logging.INFO, logger="arcfold"):
        info = train_fold(cfg, "full")

    folds = _folds(cfg)
    root = cfg.data_dir
    non_test, test = folds[folds["fold"] != "-1"], folds[folds["fold"] == "-1"]
    assert (len(non_test), len(test), non_test["fold"].nunique()) == (90, 30, 2)
    trained = [d for d in datasets if d.labels is not None]
    assert len(trained) == 1
    # every row of both folds, and no test row
    assert sorted(trained[0].paths) == sorted(str(root / p) for p in non_test["image"])
    assert not {str(root / p) for p in test["image"]} & set(trained[0].paths)
    classes = dict(zip(trained[0].paths, trained[0].labels, strict=True))
    by_label = non_test.groupby("label")["image"].apply(lambda s: {classes[str(root / p)] for p in s})
    assert (by_label.map(len) == 1).all() and len(set().union(*by_label)) == 15  # one id per class, 15 classes
    assert (info["n_images"], info["n_classes"]) == (90, 15)
    assert info["fold_train_images_mean"] == 45.0  # each fold trains on the other fold's rows: 30 and 60

    # the checkpoint: the format of fold<K>.pt, marked as the full fit, the last epoch's weights
    paths = FoldPaths(cfg, "full")
    assert paths.weights == cfg.models_dir / "full.pt" and paths.scores == cfg.models_dir / "full.json"
    ckpt = load_torch(paths.weights)
    assert (ckpt["format"], ckpt["fold"], ckpt["epoch"]) == ("arcfold.embedding/1", "full", 1)
    model, model_cfg, _ = load_embedding_model(paths.weights)
    assert model_cfg.name == "mini" and model.embedding_size == 32
    assert load_json(paths.scores) == info
    assert (info["fold"], info["epochs"], info["epochs_rule"], info["kept_epoch"]) == (
        "full",
        2,
        "train.epochs (train.keep=last)",
        1,
    )
    assert info["folds_sha256"] == file_sha256(cfg.folds_path) and info["git_commit"] and info["seconds"] > 0
    assert pd.read_csv(paths.history)["epoch"].tolist() == [0, 1]
    assert not paths.last.exists() and not list(paths.work.glob("best_*"))
    assert not cfg.oof_dir.exists() or not list(cfg.oof_dir.iterdir())  # no OOF: nothing for score or leaderboard
    assert "full fit of 'mini': 2 epochs (train.epochs (train.keep=last))" in caplog.text
    assert "train 90 images / 15 classes" in caplog.text


def test_full_fit_epochs_rule(tmp_path):
    overrides = _overrides(tmp_path, "train.epochs=7")
    last = {"epochs": 7, "epochs_rule": "train.epochs (train.keep=last)"}
    assert full_fit_epochs(load_config(None, overrides)) == last
    assert full_fit_epochs(load_config(None, [*overrides, "train.full_epochs=4"])) == {
        "epochs": 4,
        "epochs_rule": "train.full_epochs",
    }
    best = load_config(None, [*overrides, "train.keep=best"])
    with pytest.raises(FileNotFoundError, match=r"the full fit of 'mini' .* has no finished fold"):
        full_fit_epochs(best)
    # kept epochs 2 and 5, and 3 in a file from before train.keep (best_epoch): 3, 6, 4 epochs -> median 4
    _write_fold_json(best, 0, kept_epoch=2, best_epoch=2)
    _write_fold_json(best, 1, kept_epoch=5, best_epoch=5)
    _write_fold_json(best, 2, best_epoch=3)
    _write_fold_json(best, 3, finished=False, kept_epoch=40)  # not finished (no OOF file): not counted
    rule = full_fit_epochs(best)
    assert rule["epochs"] == 4 and rule["fold_kept_epochs"] == {"0": 2, "1": 5, "2": 3}
    assert rule["epochs_rule"].startswith("median of kept_epoch + 1 over folds 0,1,2")
    (best.oof_dir / "fold2.npz").unlink()
    assert full_fit_epochs(best)["epochs"] == 5  # 3 and 6 epochs: median 4.5, rounded half up (round() gives 4)
    assert full_fit_epochs(load_config(None, [*overrides, "train.keep=best", "train.full_epochs=9"]))["epochs"] == 9
    with pytest.raises(ConfigError, match="train.full_epochs must not be negative"):
        load_config(None, [*overrides, "train.full_epochs=-1"])


def test_full_fit_with_keep_best_trains_the_median_of_the_folds(tmp_path):
    cfg = load_config(None, _overrides(tmp_path, "train.keep=best", "train.epochs=9", "train.limit_train_batches=1"))
    _write_fold_json(cfg, 0, kept_epoch=0)
    _write_fold_json(cfg, 1, kept_epoch=2)  # 1 and 3 epochs: median 2
    info = train_fold(cfg, "full")
    assert (info["epochs"], info["kept_epoch"], info["fold_kept_epochs"]) == (2, 1, {"0": 0, "1": 2})
    assert pd.read_csv(FoldPaths(cfg, "full").history)["epoch"].tolist() == [0, 1]


class _Stop(Exception):
    pass


def _stop_at_epoch(epoch: int):
    def on_epoch_end(row):
        if row["epoch"] == epoch:
            raise _Stop  # before the epoch's resume point: a resume trains it again

    return on_epoch_end


def test_full_fit_resumes_bit_identically_and_is_never_overwritten_unasked(tmp_path):
    overrides = _overrides(tmp_path, "train.epochs=2")
    whole = load_config(None, [*overrides, "name=whole"])
    train_fold(whole, "full")
    reference = load_torch(FoldPaths(whole, "full").weights)["state_dict"]

    cfg = load_config(None, [*overrides, "name=cut"])
    paths = FoldPaths(cfg, "full")
    with pytest.raises(_Stop):
        train_fold(cfg, "full", on_epoch_end=_stop_at_epoch(1))
    assert load_torch(paths.last)["epoch"] == 0 and not paths.weights.exists()
    with pytest.raises(ArtifactExistsError, match=r"an unfinished run of the full fit exists .*train\.resume=true"):
        train_fold(cfg, "full")
    with pytest.raises(ArtifactExistsError, match=r"train\.full_epochs: 0 -> 3"):  # the run's epochs stay fixed
        train_fold(load_config(None, [*overrides, "name=cut", "train.resume=true", "train.full_epochs=3"]), "full")
    resumed = load_config(None, [*overrides, "name=cut", "train.resume=true"])
    info = train_fold(resumed, "full")
    assert pd.read_csv(paths.history)["epoch"].tolist() == [0, 1] and info["epochs"] == 2
    state = load_torch(paths.weights)["state_dict"]
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in reference)  # as if never interrupted

    # finished: skipped (with or without train.resume), retrained with train.force
    written = paths.weights.stat().st_mtime_ns
    assert train_fold(cfg, "full") == info and paths.weights.stat().st_mtime_ns == written
    assert train_fold(resumed, "full") == info and paths.weights.stat().st_mtime_ns == written
    again = train_fold(load_config(None, [*overrides, "name=cut", "train.force=true"]), "full")
    assert again["finished_at"] >= info["finished_at"] and paths.weights.stat().st_mtime_ns != written
    state = load_torch(paths.weights)["state_dict"]
    assert all(torch.equal(state[k], reference[k]) for k in reference)


def _embed_directly(checkpoint: Path, images: list[Path]) -> np.ndarray:
    """The checkpoint's model on the images, read with PIL (the mini images are already 32 px): (N, D), unit rows."""
    model, model_cfg, _ = load_embedding_model(checkpoint)
    transform = build_eval_transform(model_cfg.data.image_size)
    x = torch.stack([transform(image=np.asarray(Image.open(p).convert("RGB")))["image"] for p in images])
    return model.embed(x).numpy()  # (N, D)


def test_test_stage_and_inference_take_the_full_fit_as_a_member(tmp_path, caplog):
    overrides = _overrides(tmp_path, "train.epochs=1")
    cfg = load_config(None, overrides)
    where = ["--oof-dir", str(tmp_path / "oof"), "--models-dir", str(tmp_path / "models")]
    assert arcfold_main(["train", "--fold", "0", *overrides]) == 0
    caplog.clear()
    assert arcfold_main(["test", "-e", "mini", *where, "--folds", "0,full"]) == 2
    assert "the full fit of experiment 'mini' is not finished" in caplog.text and "train_fold.sh full" in caplog.text
    assert arcfold_main(["train", "--fold", "full", *overrides]) == 0

    folds = _folds(cfg)
    test_rows = folds[folds["fold"] == "-1"].reset_index(drop=True)
    images = [cfg.data_dir / p for p in test_rows["image"]]
    labels = test_rows["label"].to_numpy()
    full = _embed_directly(cfg.models_dir / "full.pt", images)  # (30, 32)
    fold0 = _embed_directly(cfg.models_dir / "fold0.pt", images)

    # the full fit alone: its own row and array, equal to embedding the images with its model
    assert arcfold_main(["test", "-e", "mini", *where, "--folds", "full"]) == 0
    result = json.loads((cfg.oof_dir / "test.json").read_text())
    arrays = load_npz(cfg.oof_dir / "test.npz")
    np.testing.assert_allclose(arrays["full"], full, atol=1e-5)
    assert result["folds"] == ["full"] and list(result["separate"]["per_fold"]) == ["full"]
    scores = retrieval_metrics(arrays["full"], labels, ks=DEFAULT_KS)
    assert result["separate"]["per_fold"]["full"] == pytest.approx({m: scores[m] for m in METRICS}, abs=1e-12)
    assert result["concatenated"] == pytest.approx(result["separate"]["per_fold"]["full"], abs=1e-12)

    # with the folds: a member of the concatenation like a fold
    assert arcfold_main(["test", "-e", "mini", *where, "--folds", "0,full", "--force"]) == 0
    result = json.loads((cfg.oof_dir / "test.json").read_text())
    arrays = load_npz(cfg.oof_dir / "test.npz")
    assert result["folds"] == [0, "full"] and list(result["separate"]["per_fold"]) == ["0", "full"]
    np.testing.assert_allclose(arrays["fold0"], fold0, atol=1e-5)
    np.testing.assert_allclose(arrays["full"], full, atol=1e-5)
    both = retrieval_metrics(blend_embeddings([arrays["fold0"], arrays["full"]], [1, 1]), labels, ks=DEFAULT_KS)
    assert result["concatenated"] == pytest.approx({m: both[m] for m in METRICS}, abs=1e-12)

    # inference: folds=[full] is the full fit's model, folds=[0,full] the concatenation of the two
    table = tmp_path / "test_rows.csv"
    test_rows[["id", "image"]].to_csv(table, index=False)
    base = ["experiment=mini", f"models_dir={cfg.models_dir.parent}", f"query.csv={table}", f"gallery.csv={table}"]
    base += [f"query.image_root={cfg.data_dir}", f"gallery.image_root={cfg.data_dir}", "progress=false"]
    paths = [str(p) for p in images]
    for members, expected in (("[full]", full), ("[0,full]", blend_embeddings([fold0, full], [1, 1]))):
        infer_cfg = load_inference_config(None, [*base, f"folds={members}"])
        ensemble = load_ensemble(infer_cfg, torch.device("cpu"))
        embedded = embed_images(ensemble, paths, tta=infer_cfg.tta, progress=False)
        np.testing.assert_allclose(embedded, expected, atol=1e-5)
    assert [m.fold for m in ensemble.models] == [0, "full"]
    with pytest.raises(ConfigError, match=r"folds are fold numbers K >= 0 or full"):
        load_inference_config(None, [*base, "folds=[0,fulll]"])

    # score ignores the full fit (no OOF); the leaderboard shows the experiment and notes the test run's members
    assert arcfold_main(["score", "-e", "mini", "--oof-dir", str(tmp_path / "oof")]) == 0
    assert json.loads((cfg.oof_dir / "scores.json").read_text())["folds"] == [0]
    caplog.clear()
    assert arcfold_main(["leaderboard", "--oof-dir", str(tmp_path / "oof")]) == 0
    board = pd.read_csv(tmp_path / "oof" / "leaderboard.csv")
    assert board["experiment"].tolist() == ["mini"]
    assert board.loc[0, "test_recall@1"] == pytest.approx(result["concatenated"]["recall@1"], abs=1e-6)
    assert "test scored folds 0,full" in board.loc[0, "notes"]


@pytest.mark.slow
def test_train_fold_sh_full_trains_the_full_fit_and_skips_scoring(tmp_path):
    config = tmp_path / "mini.yaml"
    config.write_text("folds:\n  n_splits: 2\n  test_fraction: 0.25\n")
    overrides = [o for o in _overrides(tmp_path, "train.epochs=1") if not o.startswith("folds.")]
    env = {**os.environ, "PYTHON": sys.executable}

    def run(spec: str) -> subprocess.CompletedProcess:
        cmd = ["bash", str(REPO / "train_fold.sh"), spec, str(config), *overrides]
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    bad = run("0,fulll")
    assert bad.returncode == 2 and "bad fold spec '0,fulll'" in bad.stderr
    done = run("full")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "only the full fit was trained" in done.stderr and "full fit finished: 1 epochs" in done.stderr
    models = tmp_path / "models" / "mini"
    assert load_torch(models / "full.pt")["fold"] == "full" and load_json(models / "full.json")["n_images"] == 90
    assert not (tmp_path / "oof" / "mini").exists()
