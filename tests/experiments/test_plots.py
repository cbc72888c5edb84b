"""Plots: PNGs of the documented sizes, borders that follow the labels, per-query tables that agree with the metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from arcfold.__main__ import main as arcfold_main
from arcfold.experiments.plots import MATCH_RGB, MISS_RGB, QUERY_RGB, embedding_map, query_table, retrieval_grid
from arcfold.retrieval.metrics import retrieval_metrics

from .test_leaderboard import clustered_embeddings, fold_rows, write_experiment, write_images


def _experiment(tmp_path, noise: float, folds=(0, 1), seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = {k: fold_rows(k, n_classes=8, per_class=4) for k in folds}
    emb = {k: clustered_embeddings(rows[k]["labels"], 32, noise, rng) for k in folds}
    write_experiment(tmp_path, "exp", emb, rows, n_splits=2, overrides=("data.dataset=fake",))
    write_images(tmp_path / "input" / "fake", rows)
    return rows, emb


def _count(png, rgb) -> int:
    arr = np.asarray(Image.open(png).convert("RGB"))
    return int((arr == np.array(rgb, dtype=np.uint8)).all(axis=2).sum())


def test_plots_stage_writes_the_listed_pngs_at_their_sizes(tmp_path, capsys):
    _experiment(tmp_path, noise=1.0)
    oof = tmp_path / "oof"
    assert arcfold_main(["plots", "--experiment", "exp", "--oof-dir", str(oof), "--fold", "1", "--queries", "4"]) == 0
    listing = json.loads((oof / "exp" / "plots.json").read_text())
    assert listing["fold"] == 1
    expected = {  # figure inches x 100 dpi
        "embedding_map": (900, 800),
        "retrieval_random": (900, 770),  # 6 cells of 1.5 in; 4 rows of 1.5 + 0.3 in, + 0.5 in of title
        "retrieval_worst": (900, 770),
        "training_curves": (1500, 450),
    }
    assert set(listing["plots"]) == set(expected)
    for name, size in expected.items():
        path = oof / "exp" / listing["plots"][name]
        assert path.parent == oof / "exp" / "plots" and path.stat().st_size > 5000
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size == size, name
    assert listing["plots"]["embedding_map"] == "plots/fold1_embedding_map.png"
    assert str(oof / "exp" / "plots" / "training_curves.png") in capsys.readouterr().out


def test_borders_are_green_for_matches_and_red_for_misses(tmp_path):
    rows, emb = _experiment(tmp_path, noise=0.01, folds=(0,))  # near-perfect clusters: every neighbour matches
    labels = rows[0]["labels"]
    paths = [tmp_path / "input" / "fake" / p for p in rows[0]["images"]]
    table = query_table(emb[0], labels, k=3)
    assert all(m.all() for m in table["matches"])
    perfect = retrieval_grid(paths, labels, table.head(4), tmp_path / "perfect.png", "perfect")
    assert _count(perfect, MISS_RGB) == 0 and _count(perfect, MATCH_RGB) > 0 and _count(perfect, QUERY_RGB) > 0

    rng = np.random.default_rng(1)
    noise = rng.normal(size=emb[0].shape)  # random embeddings: most neighbours are of other classes
    table = query_table(noise, labels, k=3)
    worst = table.sort_values("ap").head(4)
    assert not any(m.any() for m in worst["matches"])  # the worst queries miss in their whole top 3
    bad = retrieval_grid(paths, labels, worst, tmp_path / "bad.png", "worst")
    assert _count(bad, MATCH_RGB) == 0 and _count(bad, MISS_RGB) > 0
    # the same number of bordered cells, so the same border area, whatever the colour
    assert _count(bad, MISS_RGB) == _count(perfect, MATCH_RGB)


def test_query_table_agrees_with_the_metrics():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(30), rng.integers(1, 6, size=30)).astype(str)  # singletons included
    emb = clustered_embeddings(labels, 16, 1.5, rng)
    table = query_table(emb, labels, k=5)
    metrics = retrieval_metrics(emb, labels)
    assert len(table) == metrics["n_queries"]
    assert table["ap"].mean() == pytest.approx(metrics["map@r"], abs=1e-12)
    assert (table["first_hit"] == 1).mean() == pytest.approx(metrics["recall@1"], abs=1e-12)
    assert (table["first_hit"] <= 5).mean() == pytest.approx(metrics["recall@5"], abs=1e-12)
    assert all(row not in nbr for row, nbr in zip(table["row"], table["neighbours"], strict=True))  # leave-one-out


def test_embedding_map_subsamples_but_keeps_the_highlighted_classes_whole(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat([f"c{i}" for i in range(40)], 10)
    groups = np.repeat([f"g{i % 4}" for i in range(40)], 10)
    emb = clustered_embeddings(labels, 64, 0.5, rng)
    result = embedding_map(emb, labels, groups, tmp_path / "map.png", max_points=150, n_highlight=4)
    rows = result["rows"]
    assert len(rows) == 150 and len(set(rows)) == 150 and result["xy"].shape == (150, 2)
    for c in result["highlighted"]:
        assert (labels[rows] == c).sum() == 10  # drawn whole
    assert len({groups[labels == c][0] for c in result["highlighted"]}) == 4  # one per group
    assert Image.open(tmp_path / "map.png").size == (900, 800)


def test_missing_images_and_history_do_not_stop_the_pictures(tmp_path, caplog):
    _experiment(tmp_path, noise=1.0, folds=(0,))
    (tmp_path / "input" / "fake" / "images" / "f0_0000.png").unlink()
    for history in (tmp_path / "models" / "exp").glob("fold*/history.csv"):
        history.unlink()
    assert arcfold_main(["plots", "-e", "exp", "--oof-dir", str(tmp_path / "oof"), "--queries", "2"]) == 0
    listing = json.loads((tmp_path / "oof" / "exp" / "plots.json").read_text())
    assert "training_curves" not in listing["plots"] and len(listing["plots"]) == 3
    assert "1 of 32 images not found" in caplog.text and "no history.csv" in caplog.text
    assert arcfold_main(["plots", "-e", "exp", "--oof-dir", str(tmp_path / "oof"), "--fold", "1"]) == 2
