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

from arcfold.config import ConfigError, load_config
from arcfold.data.transforms import build_eval_transform
from arcfold.infer import TTAConfig, embed_images, load_ensemble, load_inference_config, run_inference
from arcfold.io import load_npz, save_json
from arcfold.postprocess import vote_labels
from arcfold.search import search
from arcfold.submission import map_at_k

from .conftest import REPO, TINY, tmp_path_overrides

pytestmark = pytest.mark.slow

EXP = "tiny_infer"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, glyphs_input) -> Path:
    """Folds 0 and 1 of a tiny glyph experiment (1 epoch each), out of 5: root with oof/, models/, folds/."""
    from arcfold.train import train_fold

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
    from arcfold.train import train_fold

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


def test_tta_and_fold_ensemble_are_means_of_normalised_views(trained, glyphs_input) -> None:
    cfg, oof = _cfg(trained, glyphs_input, "folds=[0,1]")
    ensemble = load_ensemble(cfg, torch.device("cpu"))
    paths = _paths(oof, glyphs_input)[:40]
    tta = TTAConfig(hflip=True, scales=[1.0, 1.5])
    got = embed_images(ensemble, paths, tta=tta, batch_size=16, progress=False)

    # by hand: for each model, each scale (32 and 48 px) and flip, embed; average per model, then over folds
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
    expected = np.mean(per_fold, axis=0)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert not np.allclose(got, oof["embeddings"][:40], atol=1e-3)  # TTA and the second fold did change them


def test_uint8_views_normalised_on_the_device_equal_the_eval_transform(glyphs_input, tmp_path) -> None:
    import cv2

    from arcfold.data.dataset import read_image
    from arcfold.infer import _collate_views, _MultiSizeDataset, _Normalise

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

    from arcfold.infer import _prefetch

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
    import arcfold.infer
    from arcfold.infer import resolve_num_workers

    monkeypatch.setattr(arcfold.infer.os, "cpu_count", lambda: 16)
    assert resolve_num_workers(None, torch.device("cpu")) == 0
    assert resolve_num_workers(None, torch.device("cuda")) == 4
    monkeypatch.setattr(arcfold.infer.os, "cpu_count", lambda: 2)
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
    from arcfold.data.table import DataValidationError

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
    from arcfold.metrics import knn
    from arcfold.submission import read_submission

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


def _read_only_models(trained: Path, tmp_path: Path) -> tuple[Path, dict]:
    models = tmp_path / "arcfold-models"
    shutil.copytree(trained / "models" / EXP, models / EXP, ignore=shutil.ignore_patterns("fold[0-9]"))
    for p in [models, *models.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)

    def snapshot():  # as root, chmod cannot stop writes: compare the folder before and after as well
        return {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(models.rglob("*")) if p.is_file()}

    return models, snapshot


def test_inference_py_offline_from_another_directory_with_read_only_weights(trained, glyphs_input, tmp_path) -> None:
    """The acceptance path: holdout CSVs from fold 0, inference.py run from elsewhere, validated and scored."""
    from arcfold.holdout import make_holdout, score_holdout

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
        sims, idx = search(q, g, 5)
        labels, _ = vote_labels(idx, sims, gallery["label"].to_numpy(object), k=5, mode="max", top=5)
        return map_at_k([[x for x in r if x] for r in labels], truth)

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

    from arcfold.holdout import make_holdout

    holdout = tmp_path / "holdout"
    make_holdout(trained / "oof", EXP, 0, holdout, new_fraction=0.2, new_label="new_individual", seed=0)
    code, (models, snapshot) = _code_copy(tmp_path), _read_only_models(trained, tmp_path)
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
    printed = "".join(o.get("text", "") for o in notebook.cells[-1]["outputs"] if o["output_type"] == "stream")
    assert f"{len(truth)} rows" in printed


def test_an_undecodable_image_is_named(trained, glyphs_input, tmp_path) -> None:
    from arcfold.data.table import DataValidationError

    (tmp_path / "bad.png").write_text("not an image")
    table = tmp_path / "q.csv"
    table.write_text("id,image\nq0,bad.png\n")
    cfg, _ = _cfg(trained, glyphs_input, f"query.csv={table}", "query.image_root=null", "folds=[0]")
    with pytest.raises(DataValidationError, match=r"row 0 \(line 2\): cannot decode image .*bad\.png \(corrupt"):
        run_inference(cfg)
