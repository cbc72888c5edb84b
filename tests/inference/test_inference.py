"""Inference: ensembles and TTA against hand-combined embeddings, the offline end-to-end run, the Kaggle notebook."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from arcfold.config import load_config
from arcfold.data.transforms import build_eval_transform
from arcfold.errors import ConfigError
from arcfold.inference.config import TTAConfig, load_inference_config
from arcfold.inference.ensemble import embed_images, load_ensemble
from arcfold.inference.run import run_inference
from arcfold.io import load_npz, save_json
from arcfold.retrieval.search import search
from arcfold.retrieval.submission import map_at_k

from ..conftest import REPO, TINY, tmp_path_overrides

pytestmark = pytest.mark.slow

EXP = "tiny_infer"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, glyphs_input) -> Path:
    """Folds 0 and 1 of a tiny glyph experiment (1 epoch each), out of 5: root with oof/, models/, folds/."""
    from arcfold.training.fold import train_fold

    root = tmp_path_factory.mktemp("infer")
    cfg = load_config(
        REPO / "configs" / "glyphs_arcface.yaml",
        [*tmp_path_overrides(root), f"data.input_dir={glyphs_input}", *TINY, f"name={EXP}", "train.epochs=1"],
    )
    for fold in (0, 1):
        train_fold(cfg, fold)
    return root


def _cfg(root: Path, glyphs_input: Path, *overrides: str):
    oof = load_npz(root / "oof" / EXP / "fold0.npz")
    table = root / "fold0_images.csv"
    if not table.exists():
        pd.DataFrame({"id": oof["ids"], "image": oof["images"], "label": oof["labels"]}).to_csv(table, index=False)
    base = [
        f"experiment={EXP}",
        f"models_dir={root / 'models'}",
        f"query.csv={table}",
        f"query.image_root={glyphs_input / 'glyphs'}",
        f"gallery.csv={table}",
        f"gallery.image_root={glyphs_input / 'glyphs'}",
        "progress=false",
        f"out_dir={root / 'submissions'}",
        f"oof_dir={root / 'oof'}",
    ]
    return load_inference_config(None, [*base, *overrides]), oof


def _paths(oof, glyphs_input: Path) -> list[str]:
    return [str(glyphs_input / "glyphs" / p) for p in oof["images"]]


@pytest.fixture(scope="module", params=[True, False], ids=["cache-on", "cache-off"])
def fold0_48px(request, tmp_path_factory, glyphs_input) -> Path:
    """Fold 0 at 48 px, where the 64 px glyphs are resized by 3/4 (at 32 px, area and bilinear interpolation agree),
    1 epoch of 2 batches, with ``data.cache_images`` on or off (one fold file for both): root as ``trained``."""
    from arcfold.training.fold import train_fold

    root = tmp_path_factory.mktemp(f"infer_cache_{request.param}")
    folds_dir = tmp_path_factory.getbasetemp() / "infer_cache_folds"
    overrides = [*tmp_path_overrides(root), f"data.input_dir={glyphs_input}", f"paths.folds_dir={folds_dir}"]
    cfg = load_config(
        REPO / "configs" / "glyphs_arcface.yaml",
        [*overrides, *TINY, f"name={EXP}", "data.image_size=48", "train.epochs=1", "train.limit_train_batches=2"]
        + [f"data.cache_images={str(request.param).lower()}", "data.check_images=none"],
    )
    train_fold(cfg, 0)
    return root


def test_one_fold_model_reproduces_the_oof_embeddings(fold0_48px, glyphs_input) -> None:
    """Training (cache on or off), its OOF embeddings and inference resize alike (arcfold.data.dataset.resize_image)."""
    cfg, oof = _cfg(fold0_48px, glyphs_input, "folds=[0]")
    ensemble = load_ensemble(cfg, torch.device("cpu"))
    emb = embed_images(ensemble, _paths(oof, glyphs_input), tta=cfg.tta, progress=False)
    np.testing.assert_allclose(emb, oof["embeddings"], atol=1e-5)


def test_tta_views_are_averaged_and_folds_give_the_mean_of_their_cosines(trained, glyphs_input) -> None:
    cfg, oof = _cfg(trained, glyphs_input, "folds=[0,1]")
    ensemble = load_ensemble(cfg, torch.device("cpu"))
    paths = _paths(oof, glyphs_input)[:40]
    tta = TTAConfig(hflip=True, scales=[1.0, 1.5])
    got = embed_images(ensemble, paths, tta=tta, batch_size=16, progress=False)
    assert got.shape == (40, 2 * 64)  # two folds of 64-d, side by side

    # by hand: for each model, each scale (32 and 48 px) and flip, embed; the model's embedding is their mean
    import cv2

    from arcfold.data.dataset import read_image

    def views(size: int) -> torch.Tensor:
        images = [cv2.resize(read_image(p), (size, size), interpolation=cv2.INTER_AREA) for p in paths]
        return torch.stack([build_eval_transform(size)(image=im)["image"] for im in images])

    per_fold = []
    with torch.no_grad():
        for m in ensemble.models:
            e = sum(m.model.embed(x) + m.model.embed(x.flip(-1)) for x in (views(32), views(48)))
            per_fold.append(torch.nn.functional.normalize(e, dim=1).numpy())
    # each fold's part is its own (unit) embedding scaled by 1/sqrt(2) ...
    np.testing.assert_allclose(got[:, :64] * np.sqrt(2), per_fold[0], atol=1e-5)
    np.testing.assert_allclose(got[:, 64:] * np.sqrt(2), per_fold[1], atol=1e-5)
    # ... so the similarity of two images is the mean of the two folds' cosines
    np.testing.assert_allclose(got @ got.T, (per_fold[0] @ per_fold[0].T + per_fold[1] @ per_fold[1].T) / 2, atol=1e-5)
    assert not np.allclose(got[:, :64] * np.sqrt(2), oof["embeddings"][:40], atol=1e-3)  # TTA did change them


class _Rotated(torch.nn.Module):
    """A fold model followed by an orthogonal matrix: the same embedding in another basis, as a fold model trained
    from another seed would give at best."""

    def __init__(self, inner: torch.nn.Module, rotation: torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("rotation", rotation)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.embed(x) @ self.rotation  # (B, D), unit norm


def _model_and_rotated_copy(trained, glyphs_input):
    from arcfold.inference.ensemble import FoldModel

    cfg, oof = _cfg(trained, glyphs_input, "folds=[0]")
    ensemble = load_ensemble(cfg, torch.device("cpu"))
    fold0 = ensemble.models[0]
    dim = oof["embeddings"].shape[1]
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(0)))  # orthogonal
    ensemble.models.append(FoldModel(EXP, 1, _Rotated(fold0.model, rotation), fold0.image_size))
    return ensemble, oof


def test_fold_ensemble_of_a_model_and_its_rotated_copy_scores_exactly_like_the_model(trained, glyphs_input) -> None:
    """The two folds hold the same information in two bases; averaging the vectors (the old fold ensemble) mixed
    unrelated coordinates and lost it (R@1 0.79 instead of 0.97 with five rotated copies in issue 15)."""
    from arcfold.retrieval.metrics import retrieval_metrics

    ensemble, oof = _model_and_rotated_copy(trained, glyphs_input)
    single = oof["embeddings"]  # (N, 64): fold 0's model alone, as the train stage wrote it
    got = embed_images(ensemble, _paths(oof, glyphs_input), tta=TTAConfig(), progress=False)
    np.testing.assert_allclose(got @ got.T, single @ single.T, atol=2e-5)
    assert got.shape == (len(single), 2 * single.shape[1])
    sims, idx = search(got, got, 10, exclude_self=True)
    want_sims, want_idx = search(single, single, 10, exclude_self=True)
    np.testing.assert_allclose(sims, want_sims, atol=2e-5)
    assert np.mean(idx == want_idx) > 0.99  # the same neighbours, up to exact ties broken by float noise
    scores, want = retrieval_metrics(got, oof["labels"]), retrieval_metrics(single, oof["labels"])
    for metric in ("recall@1", "recall@5", "map@r"):
        assert scores[metric] == pytest.approx(want[metric], abs=2e-3), metric


def test_fold_pca_on_the_gallery_keeps_the_similarities_of_a_model_and_its_rotated_copy(trained, glyphs_input) -> None:
    from arcfold.inference.ensemble import combine_experiments, embed_experiments, reduce_fold_ensembles

    ensemble, oof = _model_and_rotated_copy(trained, glyphs_input)
    paths = _paths(oof, glyphs_input)
    single_q, single_g = oof["embeddings"][:300], oof["embeddings"][300:]
    q = embed_experiments(ensemble, paths[:300], tta=TTAConfig(), progress=False)
    g = embed_experiments(ensemble, paths[300:], tta=TTAConfig(), progress=False)
    # back to one fold's 64 dims: the pair spans 64 dims only, so an uncentred projection fitted on the gallery keeps
    # every inner product, the queries' too (a centred PCA would measure them from the gallery's mean instead)
    q_red, g_red = reduce_fold_ensembles(ensemble, q, g)
    q_red, g_red = combine_experiments(ensemble, q_red), combine_experiments(ensemble, g_red)
    assert q_red.shape == (300, 64) and g_red.shape == (len(single_g), 64)
    np.testing.assert_allclose(q_red @ g_red.T, single_q @ single_g.T, atol=1e-4)
    q16, g16 = reduce_fold_ensembles(ensemble, q, g, dim=16)
    assert q16[0].shape == (300, 16) and g16[0].shape == (len(single_g), 16)
    np.testing.assert_allclose(np.linalg.norm(q16[0], axis=1), 1.0, atol=1e-5)
    with pytest.raises(ConfigError, match="fold_pca_dim must be >= 1"):
        _cfg(trained, glyphs_input, "fold_pca=true", "fold_pca_dim=0")


def test_uint8_views_normalised_on_the_device_equal_the_eval_transform(glyphs_input, tmp_path) -> None:
    import cv2

    from arcfold.data.dataset import read_image
    from arcfold.data.transforms import BatchNormalise as _Normalise
    from arcfold.inference.ensemble import _collate_views, _MultiSizeDataset

    paths = sorted(str(p) for p in (glyphs_input / "glyphs").rglob("*.png"))[:6]
    colour = np.random.default_rng(0).integers(0, 256, size=(40, 57, 3), dtype=np.uint8)  # not square, all levels
    cv2.imwrite(str(tmp_path / "colour.png"), colour)
    paths.append(str(tmp_path / "colour.png"))
    dataset = _MultiSizeDataset(paths, [32, 48, 32])
    batch = _collate_views([dataset[i] for i in range(len(paths))])  # {size: (B, 3, s, s) uint8}
    normalise = _Normalise(torch.device("cpu"))
    assert sorted(batch) == [32, 48] and batch[32].dtype == torch.uint8 and normalise.exact_affine
    for size in (32, 48):
        # what the loader did before: resize the decoded image (INTER_AREA) and run the eval transform on it
        want = torch.stack(
            [
                build_eval_transform(size)(image=cv2.resize(read_image(p), (size, size), interpolation=cv2.INTER_AREA))[
                    "image"
                ]
                for p in paths
            ]
        )
        assert torch.equal(normalise(batch[size]), want)  # numpy, as the loader does it on the CPU
        x = batch[size].to(torch.float32, copy=True).sub_(normalise.mean).mul_(normalise.scale)  # torch, as on CUDA
        assert torch.equal(x, want)
        normalise.exact_affine = False  # the table lookup, used when the affine form would not be exact
        assert torch.equal(normalise(batch[size]), want)
        normalise.exact_affine = True
    collated = _collate_views([dataset[i] for i in range(len(paths))], normalise)
    assert collated[48].dtype == torch.float32 and torch.equal(collated[48], normalise(batch[48]))


def test_prefetch_thread_hands_over_errors_and_stops_with_its_consumer() -> None:
    import threading

    from arcfold.inference.ensemble import _prefetch

    def failing():
        yield 1
        yield 2
        raise ValueError("boom")

    items = _prefetch(failing())
    assert next(items) == 1 and next(items) == 2
    with pytest.raises(ValueError, match="boom"):
        next(items)
    produced = []

    def counting():
        for i in range(1000):
            produced.append(i)
            yield i

    items = _prefetch(counting(), depth=2)
    assert next(items) == 0
    items.close()  # the consumer stops early: the producer stops too instead of decoding everything
    assert len(produced) <= 4
    assert not any(t.name == "arcfold-prefetch" and t.is_alive() for t in threading.enumerate())


def test_num_workers_auto_is_a_thread_on_the_cpu_and_processes_on_cuda(monkeypatch) -> None:
    import arcfold.inference.ensemble
    from arcfold.inference.ensemble import resolve_num_workers

    monkeypatch.setattr(arcfold.inference.ensemble.os, "cpu_count", lambda: 16)
    assert resolve_num_workers(None, torch.device("cpu")) == 0
    assert resolve_num_workers(None, torch.device("cuda")) == 4
    monkeypatch.setattr(arcfold.inference.ensemble.os, "cpu_count", lambda: 2)
    assert resolve_num_workers(None, torch.device("cuda")) == 1
    assert resolve_num_workers(3, torch.device("cpu")) == 3
    base = ["experiment=x", "query.csv=q.csv", "gallery.csv=g.csv"]
    assert load_inference_config(None, base).num_workers is None
    assert load_inference_config(REPO / "configs" / "inference" / "kaggle.yaml").num_workers is None
    with pytest.raises(ConfigError, match="num_workers must be >= 0"):
        load_inference_config(None, [*base, "num_workers=-1"])


def test_prefetch_thread_and_worker_processes_give_the_same_embeddings(trained, glyphs_input) -> None:
    cfg, oof = _cfg(trained, glyphs_input, "folds=[0]")
    ensemble = load_ensemble(cfg, torch.device("cpu"))
    paths = _paths(oof, glyphs_input)[:70]
    tta = TTAConfig(hflip=True, scales=[1.0, 1.5])
    runs = [
        embed_images(ensemble, paths, tta=tta, batch_size=16, progress=False, **kw)
        for kw in ({}, {"prefetch": True}, {"num_workers": 1})
    ]
    np.testing.assert_array_equal(runs[0], runs[1])
    np.testing.assert_array_equal(runs[0], runs[2])


def test_blend_of_two_copies_has_the_single_experiments_similarities(trained, glyphs_input, tmp_path) -> None:
    models = tmp_path / "models"
    shutil.copytree(trained / "models" / EXP, models / EXP)
    shutil.copytree(trained / "models" / EXP, models / "copy")
    spec = {"format": "arcfold.blend/1", "name": "pair", "experiments": [EXP, "copy"], "weights": [0.7, 0.3],
            "normalisation": "l2_weighted_concat"}  # fmt: skip
    save_json(tmp_path / "pair.json", spec)
    cfg, oof = _cfg(trained, glyphs_input, "experiment=null", f"blend={tmp_path / 'pair.json'}", "folds=[0]",
                    f"models_dir={models}")  # fmt: skip
    ensemble = load_ensemble(cfg, torch.device("cpu"))
    assert [m.experiment for m in ensemble.models] == [EXP, "copy"]
    got = embed_images(ensemble, _paths(oof, glyphs_input)[:30], tta=cfg.tta, progress=False)
    assert got.shape == (30, 2 * oof["embeddings"].shape[1])
    single = oof["embeddings"][:30]
    np.testing.assert_allclose(got @ got.T, single @ single.T, atol=1e-5)


def _recognition_spec(path: Path, threshold: float) -> Path:
    """A rerank spec of the recognition task as the rerank stage writes it: plain search, a label vote."""
    spec = {"format": "arcfold.rerank/1", "name": EXP, "task": "recognition", "enabled": "none", "steps": [],
            "vote": {"k": 5, "mode": "max", "threshold": threshold, "new_label": "new_individual"}}  # fmt: skip
    save_json(path, spec)
    return path


def _holdout_cfg(trained, glyphs_input, tmp_path, *overrides: str):
    from arcfold.experiments.holdout import make_holdout

    holdout = tmp_path / "holdout"
    if not holdout.exists():
        make_holdout(trained / "oof", EXP, 0, holdout, new_fraction=0.2, new_label="new_individual", seed=0)
    cfg, _ = _cfg(trained, glyphs_input, "folds=[0]", f"query.csv={holdout / 'query.csv'}",
                  f"gallery.csv={holdout / 'gallery.csv'}", "gallery.label_column=label", "submission.format=top5",
                  f"out_dir={tmp_path / 'out'}", *overrides)  # fmt: skip
    return cfg, holdout


def test_top5_without_a_recognition_spec_is_an_error_naming_the_command(trained, glyphs_input, tmp_path) -> None:
    # rerank=auto (the default) and no oof/<exp>/rerank-recognition.json: no silent plain vote
    cfg, _ = _holdout_cfg(trained, glyphs_input, tmp_path, f"oof_dir={tmp_path / 'no_spec'}")
    for fmt in ("top5", "recognition"):
        cfg.submission.format = fmt
        with pytest.raises(FileNotFoundError) as err:
            run_inference(cfg)
        message = str(err.value)
        assert f"python -m arcfold rerank --experiment {EXP} --task recognition" in message
        assert "rerank-recognition.json" in message and "rerank=none" in message and "\n" not in message
    # the retrieval task's spec has no vote: refused too
    retrieval = {"format": "arcfold.rerank/1", "name": EXP, "task": "retrieval", "enabled": "none", "steps": [],
                 "vote": None}  # fmt: skip
    save_json(tmp_path / "rerank-retrieval.json", retrieval)
    cfg, _ = _holdout_cfg(trained, glyphs_input, tmp_path, f"rerank={tmp_path / 'rerank-retrieval.json'}")
    with pytest.raises(ConfigError, match="is for the retrieval task and has no label vote"):
        run_inference(cfg)
    assert not (tmp_path / "out").exists()  # nothing written


def test_top5_lists_five_labels_and_predicts_the_new_label(trained, glyphs_input, tmp_path, caplog) -> None:
    from arcfold.experiments.holdout import score_holdout

    # rerank=none, vote.threshold null: allowed, with a warning; still 5 labels a row (no new label)
    cfg, holdout = _holdout_cfg(
        trained, glyphs_input, tmp_path, "rerank=none", "submission.name=plain", "save_embeddings=true"
    )
    with caplog.at_level("WARNING", logger="arcfold.inference.run"):
        run_inference(cfg)
    assert "new_individual is never predicted" in caplog.text
    plain = pd.read_csv(tmp_path / "out" / "plain.csv", dtype=str)["predictions"].str.split()
    assert (plain.map(len) == 5).all() and (plain.map(lambda row: len(set(row))) == 5).all()
    assert not plain.map(lambda row: "new_individual" in row).any()

    # rerank=auto finds the recognition spec. Its threshold (here the median best similarity, max vote) puts the
    # new label first in the rows whose best vote is below it, and not first in the others; 5 labels every row.
    embeddings = load_npz(tmp_path / "out" / "plain.npz")
    best = (embeddings["query"] @ embeddings["gallery"].T).max(axis=1)  # (Q,) the vote's best score
    threshold = round(float(np.median(best)), 4)
    spec = _recognition_spec(tmp_path / "oof" / EXP / "rerank-recognition.json", threshold=threshold)
    cfg, _ = _holdout_cfg(trained, glyphs_input, tmp_path, f"oof_dir={tmp_path / 'oof'}", "submission.name=spec")
    summary = run_inference(cfg)
    assert summary["rerank"]["spec"] == str(spec)
    rows = pd.read_csv(tmp_path / "out" / "spec.csv", dtype=str)["predictions"].str.split()
    assert (rows.map(len) == 5).all() and (rows.map(lambda row: len(set(row))) == 5).all()
    first_is_new = (rows.map(lambda row: row[0]) == "new_individual").to_numpy()
    clear = np.abs(best - threshold) > 1e-4  # away from float noise at the threshold
    np.testing.assert_array_equal(first_is_new[clear], (best < threshold)[clear])
    assert 0 < first_is_new.sum() < len(rows)
    assert score_holdout(tmp_path / "out" / "spec.csv", holdout, "top5")["map@5"] > 0


def test_top5_searches_deeper_until_every_row_has_five_labels() -> None:
    """60 gallery images of class A around one direction, 4 classes of 2 elsewhere: the first 50 neighbours of a
    query near A are all A, so the labels after it come from a deeper search."""
    from arcfold.inference.predict import predict_labels

    rng = np.random.default_rng(0)
    a = np.eye(8)[0] + 0.01 * rng.normal(size=(60, 8))
    others = np.repeat(np.eye(8)[1:5], 2, axis=0) + 0.01 * rng.normal(size=(8, 8))
    gallery = np.concatenate([a, others]).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    labels = ["A"] * 60 + ["B", "B", "C", "C", "D", "D", "E", "E"]
    query = np.float32([[1, 0.3, 0.2, 0.1, 0.05, 0, 0, 0]])
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    vote = {"k": 5, "mode": "max", "threshold": None}
    predictions, confidences = predict_labels(query, gallery, labels, [], vote, fmt="top5", new_label="new")
    assert predictions == [["A", "B", "C", "D", "E"]]  # the fill in vote order: B, C, D, E by similarity
    assert confidences[0] == pytest.approx(float((query @ gallery[:60].T).max()), abs=1e-6)
    # with a threshold above A's vote the new label comes first, then A, then the fill
    vote["threshold"] = 0.99
    predictions, _ = predict_labels(query, gallery, labels, [], vote, fmt="top5", new_label="new")
    assert predictions == [["new", "A", "B", "C", "D"]]
    # recognition: one label, from the first k neighbours only
    predictions, _ = predict_labels(query, gallery, labels, [], vote, fmt="recognition", new_label="new")
    assert predictions[0][0] == "A"


def test_a_missing_fold_is_an_error_that_names_it(trained, glyphs_input) -> None:
    cfg, _ = _cfg(trained, glyphs_input)
    with pytest.raises(FileNotFoundError, match=r"missing fold2\.pt, fold3\.pt, fold4\.pt .*has 5 folds"):
        load_ensemble(cfg, torch.device("cpu"))
    cfg, _ = _cfg(trained, glyphs_input, "allow_missing_folds=true")
    assert [m.fold for m in load_ensemble(cfg, torch.device("cpu")).models] == [0, 1]
    cfg, _ = _cfg(trained, glyphs_input, "folds=[0,3]")
    with pytest.raises(FileNotFoundError, match=r"missing fold3\.pt"):
        load_ensemble(cfg, torch.device("cpu"))


def test_config_errors_are_named(trained, glyphs_input) -> None:
    with pytest.raises(ConfigError, match="unknown config key 'tta.flip'"):
        _cfg(trained, glyphs_input, "tta.flip=true")
    with pytest.raises(ConfigError, match="set exactly one of 'experiment' and 'blend'"):
        _cfg(trained, glyphs_input, "blend=x.json")
    with pytest.raises(ConfigError, match="needs gallery labels: set gallery.label_column"):
        _cfg(trained, glyphs_input, "submission.format=top5")
    with pytest.raises(ConfigError, match="search.index must be one of"):
        _cfg(trained, glyphs_input, "search.index=lsh")


def test_query_csv_problems_name_row_and_column(trained, glyphs_input, tmp_path) -> None:
    from arcfold.errors import DataValidationError

    bad = tmp_path / "q.csv"
    bad.write_text("id,image\na,x/missing.png\na,\n")
    cfg, _ = _cfg(trained, glyphs_input, f"query.csv={bad}", "folds=[0]")
    with pytest.raises(DataValidationError) as err:
        run_inference(cfg)
    message = str(err.value)
    assert "row 1 (line 3), column 'image': empty value" in message
    assert "row 1 (line 3), column 'id': duplicate id 'a'" in message
    assert "row 0 (line 2), column 'image': image not found" in message


def test_retrieval_and_recognition_submissions_match_an_exact_search(trained, glyphs_input) -> None:
    from arcfold.retrieval.metrics import knn
    from arcfold.retrieval.submission import read_submission

    cfg, oof = _cfg(trained, glyphs_input, "folds=[0]", "submission.top_k=5", "submission.name=ret", "rerank=none")
    run_inference(cfg)
    sub = read_submission(trained / "submissions" / "ret.csv")
    assert list(sub.columns) == ["id", "images"] and sub["id"].tolist() == oof["ids"].tolist()
    _, expected = knn(oof["embeddings"], oof["embeddings"], 5)
    got = [row.split() for row in sub["images"]]
    agree = np.mean([g == oof["ids"][e].tolist() for g, e in zip(got, expected, strict=True)])
    assert agree >= 0.95  # exact up to float noise on near-ties between two computations

    cfg, _ = _cfg(trained, glyphs_input, "folds=[0]", "submission.format=recognition", "gallery.label_column=label",
                  "vote.k=1", "submission.name=rec", "rerank=none")  # fmt: skip
    run_inference(cfg)
    rec = read_submission(trained / "submissions" / "rec.csv")
    # each query is its own nearest gallery item (query == gallery): label = its own, confidence ~1
    labels = [cell.split()[0] for cell in rec["landmarks"]]
    assert labels == oof["labels"].tolist()
    assert all(abs(float(cell.split()[1]) - 1.0) < 1e-4 for cell in rec["landmarks"])


def test_an_approximate_index_reports_its_knob(trained, glyphs_input, caplog) -> None:
    """search.index=hnsw: efSearch chosen for search.target_recall at recall@5 (top_k 5), logged and in the summary;
    an explicit search.ef_search wins."""
    common = ["folds=[0]", "submission.top_k=5", "rerank=none", "search.index=hnsw", "search.device=cpu"]
    cfg, oof = _cfg(trained, glyphs_input, *common, "submission.name=hnsw", "search.target_recall=0.9")
    with caplog.at_level("INFO", logger="arcfold.retrieval.index_tuning"):
        summary = run_inference(cfg)
    (t,) = summary["search"]["indexes"]
    assert summary["search"]["index"] == "hnsw"
    assert (t["knob"], t["source"], t["target_recall"], t["k"]) == ("efSearch", "target_recall", 0.9, 5)
    assert t["reached"] is True
    assert t["n_queries"] == len(oof["ids"]) // 10 and t["recall_lower"] >= 0.9
    assert f"hnsw index: efSearch={t['value']} reaches target_recall 0.9: recall@5 {t['recall']:.3f}" in caplog.text
    cfg, _ = _cfg(trained, glyphs_input, *common, "submission.name=hnsw64", "search.ef_search=64")
    (t,) = run_inference(cfg)["search"]["indexes"]
    assert (t["value"], t["source"], t["tried"]) == (64, "explicit", [])


def _offline_env(tmp_path: Path) -> dict[str, str]:
    """A Python that cannot open a network connection (a sitecustomize patches socket) and has no PYTHONPATH."""
    site = tmp_path / "offline_site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import socket\n"
        "def _offline(*args, **kwargs):\n"
        "    raise OSError('network access attempted in an offline test')\n"
        "socket.socket.connect = _offline\n"
        "socket.create_connection = _offline\n"
        "socket.getaddrinfo = _offline\n"
    )
    return {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "0"}


def _code_copy(tmp_path: Path) -> Path:
    """The code as a Kaggle 'code' data set: inference.py, src/ and configs/ only (no install)."""
    code = tmp_path / "arcfold-code"
    code.mkdir()
    shutil.copy(REPO / "inference.py", code / "inference.py")
    shutil.copytree(REPO / "src", code / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(REPO / "configs", code / "configs")
    return code


def _read_only_models(trained: Path, tmp_path: Path, rerank_threshold: float | None = None) -> tuple[Path, dict]:
    """The weights as a read-only Kaggle data set; with ``rerank_threshold``, a recognition spec copied beside them."""
    models = tmp_path / "arcfold-models"
    shutil.copytree(trained / "models" / EXP, models / EXP, ignore=shutil.ignore_patterns("fold[0-9]"))
    if rerank_threshold is not None:
        _recognition_spec(models / EXP / "rerank-recognition.json", rerank_threshold)
    for p in [models, *models.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)

    def snapshot():  # as root, chmod cannot stop writes: compare the folder before and after as well
        return {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(models.rglob("*")) if p.is_file()}

    return models, snapshot


def test_inference_py_offline_from_another_directory_with_read_only_weights(trained, glyphs_input, tmp_path) -> None:
    """The acceptance path: holdout CSVs from fold 0, inference.py run from elsewhere, validated and scored."""
    from arcfold.experiments.holdout import make_holdout, score_holdout
    from arcfold.inference.predict import predict_labels

    env = _offline_env(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('pypi.org', 443))"],
                           env=env, capture_output=True, text=True)  # fmt: skip
    assert probe.returncode != 0 and "offline test" in probe.stderr  # the network really is cut

    holdout = tmp_path / "holdout"
    info = make_holdout(trained / "oof", EXP, 0, holdout, new_fraction=0.2, new_label="new_individual", seed=0)
    assert info["n_new_queries"] > 0
    code, (models, snapshot) = _code_copy(tmp_path), _read_only_models(trained, tmp_path)
    before = snapshot()
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    command = [
        sys.executable, str(code / "inference.py"), "-c", str(code / "configs" / "inference" / "glyphs.yaml"),
        f"experiment={EXP}", f"models_dir={models}", "folds=[0]", "rerank=none",
        f"query.csv={holdout / 'query.csv'}", f"gallery.csv={holdout / 'gallery.csv'}",
        f"query.image_root={glyphs_input / 'glyphs'}", f"gallery.image_root={glyphs_input / 'glyphs'}",
        f"out_dir={workdir / 'out'}", "progress=false",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"arcfold from {code / 'src' / 'arcfold'}" in result.stderr  # the copy's code, not the installed one
    assert snapshot() == before
    scores = score_holdout(workdir / "out" / f"{EXP}.csv", holdout, "top5")
    # the same answer straight from the OOF embeddings the train stage wrote, and from random embeddings
    oof = load_npz(trained / "oof" / EXP / "fold0.npz")
    row = {i: n for n, i in enumerate(oof["ids"])}
    query, gallery = pd.read_csv(holdout / "query.csv", dtype=str), pd.read_csv(holdout / "gallery.csv", dtype=str)
    truth = pd.read_csv(holdout / "truth.csv", dtype=str)["label"].tolist()

    def map5(emb: np.ndarray) -> float:
        q, g = emb[[row[i] for i in query["id"]]], emb[[row[i] for i in gallery["id"]]]
        vote = {"k": 5, "mode": "max", "threshold": None}
        labels, _ = predict_labels(q, g, gallery["label"].tolist(), [], vote, fmt="top5", new_label="new_individual")
        return map_at_k(labels, truth)

    direct = map5(oof["embeddings"])
    chance = map5(np.random.default_rng(0).normal(size=oof["embeddings"].shape).astype(np.float32))
    assert scores["map@5"] == pytest.approx(direct, abs=0.01)
    assert scores["map@5"] > 2 * chance, (scores, chance)  # 1 epoch of a tiny model: weak, but far from chance

    # a model folder missing a fold fails with the fold named, exit code 2, nothing written
    result = subprocess.run([*command[:-2], f"out_dir={workdir / 'out2'}", "folds=null"], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 2 and "is missing fold2.pt, fold3.pt, fold4.pt" in result.stderr
    assert not (workdir / "out2").exists()


def test_kaggle_notebook_runs_headless(trained, glyphs_input, tmp_path) -> None:
    nbclient = pytest.importorskip("nbclient")
    import nbformat

    from arcfold.experiments.holdout import make_holdout

    holdout = tmp_path / "holdout"
    make_holdout(trained / "oof", EXP, 0, holdout, new_fraction=0.2, new_label="new_individual", seed=0)
    # a threshold above any cosine: the new label first in every row, whatever the tiny model's similarities
    code, (models, snapshot) = _code_copy(tmp_path), _read_only_models(trained, tmp_path, rerank_threshold=1.01)
    before = snapshot()
    out = tmp_path / "working"
    overrides = [
        f"experiment={EXP}", f"models_dir={models}", "folds=[0]",
        f"query.csv={holdout / 'query.csv'}", f"gallery.csv={holdout / 'gallery.csv'}",
        f"query.image_root={glyphs_input / 'glyphs'}", f"gallery.image_root={glyphs_input / 'glyphs'}",
        "gallery.label_column=label", "num_workers=0", "tta.hflip=false", "progress=false",
    ]  # fmt: skip
    env = {
        "ARCFOLD_CODE_DIR": str(code),
        "ARCFOLD_OUT_DIR": str(out),
        "ARCFOLD_OVERRIDES": " ".join(overrides),
    }
    notebook = nbformat.read(REPO / "notebooks" / "kaggle_inference.ipynb", as_version=4)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits the environment
    try:
        client = nbclient.NotebookClient(
            notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        )
        client.execute()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert snapshot() == before
    submission = pd.read_csv(out / "submission.csv", dtype=str, keep_default_na=False)
    truth = pd.read_csv(holdout / "truth.csv", dtype=str)
    assert list(submission.columns) == ["image", "predictions"] and submission["image"].tolist() == truth["id"].tolist()
    # kaggle.yaml's rerank=auto found the spec beside the weights: its threshold puts the new label in every row
    rows = submission["predictions"].str.split()
    assert (rows.map(len) == 5).all() and (rows.map(lambda row: row[0]) == "new_individual").all()
    printed = "".join(o.get("text", "") for o in notebook.cells[-1]["outputs"] if o["output_type"] == "stream")
    assert f"{len(truth)} rows" in printed


_FAKE_INFERENCE = """import sys, time
from pathlib import Path
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
print("first line, then a wait")  # stdout, a pipe: shown before the exit only when the child is unbuffered
marker, deadline = Path(args["marker"]), time.time() + 20
while not marker.exists() and time.time() < deadline:
    time.sleep(0.05)
print("seen live" if marker.exists() else "not shown while running", file=sys.stderr)
sys.exit(int(args["exit"]))
"""


@pytest.mark.parametrize("exit_code", [0, 3])
def test_kaggle_notebook_streams_the_log_live_and_fails_on_an_error(tmp_path, exit_code: int) -> None:
    """The notebook's run cell shows inference.py's output while it runs (a stand-in inference.py waits until the
    notebook has shown its first line, which the test's client marks), and a non-zero exit stops it naming the code."""
    nbclient = pytest.importorskip("nbclient")
    import nbformat

    code, marker = tmp_path / "code", tmp_path / "first-line-shown"
    code.mkdir()
    (code / "inference.py").write_text(_FAKE_INFERENCE)

    class MarkingClient(nbclient.NotebookClient):
        def output(self, outs, msg, display_id, cell_index):
            if msg["msg_type"] == "stream" and "first line" in msg["content"]["text"]:
                marker.touch()
            return super().output(outs, msg, display_id, cell_index)

    notebook = nbformat.read(REPO / "notebooks" / "kaggle_inference.ipynb", as_version=4)
    notebook.cells = notebook.cells[:3]  # up to the run cell (no submission to read)
    env = {
        "ARCFOLD_CODE_DIR": str(code),
        "ARCFOLD_OUT_DIR": str(tmp_path / "out"),
        "ARCFOLD_OVERRIDES": f"marker={marker} exit={exit_code}",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits the environment
    try:
        client = MarkingClient(notebook, timeout=120, kernel_name="python3")
        if exit_code:
            with pytest.raises(nbclient.exceptions.CellExecutionError, match="exit code 3"):
                client.execute()
        else:
            client.execute()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    printed = "".join(o.get("text", "") for o in notebook.cells[2]["outputs"] if o["output_type"] == "stream")
    assert "first line, then a wait" in printed and "seen live" in printed, printed


def test_an_undecodable_image_is_named(trained, glyphs_input, tmp_path) -> None:
    from arcfold.errors import DataValidationError

    (tmp_path / "bad.png").write_text("not an image")
    table = tmp_path / "q.csv"
    table.write_text("id,image\nq0,bad.png\n")
    cfg, _ = _cfg(trained, glyphs_input, f"query.csv={table}", "query.image_root=null", "folds=[0]")
    with pytest.raises(DataValidationError, match=r"row 0 \(line 2\): cannot decode image .*bad\.png \(corrupt"):
        run_inference(cfg)
