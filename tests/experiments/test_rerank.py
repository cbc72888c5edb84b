"""Rerank stage: the recognition split, the nested choice of post-processing, the spec file and its CLI."""

from __future__ import annotations

import numpy as np
import pytest

from arcfold.errors import ArtifactExistsError, RerankError
from arcfold.experiments.rerank import FoldData, recognition_split, rerank_search
from arcfold.retrieval.postprocess import RERANK_FORMAT, load_rerank_spec
from arcfold.stages.rerank import main

from .test_leaderboard import write_experiment

SMALL = {
    "dba": {"k": [1, 3], "alpha": [0.0, 3.0]},
    "qe": {"k": [1, 3], "alpha": [0.0, 3.0]},
    "kr": {"k1": [10], "k2": [3], "lambda": [0.3]},
}


def clustered_fold(fold: int, n_classes: int = 24, per_class: int = 6, dim: int = 16, noise: float = 1.0):
    """Unit vectors around random class centres; noise picked so Recall@1 is well below 1 (room to re-rank)."""
    rng = np.random.default_rng(100 + fold)
    centres = rng.normal(size=(n_classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(n_classes), per_class)
    x = centres[labels] + noise * rng.normal(size=(len(labels), dim)) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return FoldData(fold=fold, embeddings=x.astype(np.float32), labels=np.array([f"f{fold}c{c}" for c in labels]))


def test_recognition_split_partitions_the_fold_and_hides_new_classes() -> None:
    labels = np.repeat(np.array([f"c{i}" for i in range(10)]), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    q, g, is_new = recognition_split(labels, new_fraction=0.2, seed=3)
    assert sorted([*q, *g]) == list(range(len(labels)))  # every image once
    new_classes = set(labels[q][is_new])
    assert len(new_classes) == 2 and not new_classes & set(labels[g])  # new classes: queries only
    for c in set(labels) - new_classes:
        n = (labels == c).sum()
        assert (labels[q] == c).sum() == n // 2 and (labels[g] == c).sum() == n - n // 2
    again = recognition_split(labels, new_fraction=0.2, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((q, g, is_new), again, strict=True))


def test_query_expansion_and_dba_are_chosen_where_they_help() -> None:
    folds = [clustered_fold(k) for k in range(3)]
    spec = rerank_search(folds, methods=["dba", "qe", "dba+qe"], grids=SMALL)
    base = spec["methods"]["none"]["nested"]
    assert 0.3 < base["recall@1"] < 0.95  # the synthetic set leaves room for re-ranking
    assert spec["enabled"] != "none" and spec["gain"] > 0.01
    chosen = spec["methods"][spec["enabled"]]
    assert spec["steps"] == chosen["steps"] and spec["steps"][0]["name"] in ("dba", "qe")
    assert chosen["nested"]["map@r"] == pytest.approx(base["map@r"] + spec["gain"])
    # the gain is the best of 4 nested scores (none, dba, qe, dba+qe): a maximum, so slightly optimistic
    assert spec["gain"] == max(m["nested"]["map@r"] for m in spec["methods"].values()) - base["map@r"]
    assert spec["n_compared"] == 4 == len(spec["methods"])
    assert spec["gain_note"] == "best of 4 nested scores (4 methods compared): slightly optimistic"
    # nested per fold: the settings were chosen without the fold they are scored on
    assert set(chosen["nested_per_fold"]) == {"0", "1", "2"}


def test_nothing_is_switched_on_when_nothing_gains() -> None:
    # perfectly separated classes: plain search is already perfect, no method can beat it strictly
    folds = [clustered_fold(k, noise=0.0) for k in range(2)]
    spec = rerank_search(folds, methods=["qe"], grids=SMALL)
    assert spec["methods"]["none"]["nested"]["map@r"] == pytest.approx(1.0)
    assert spec["enabled"] == "none" and spec["steps"] == [] and spec["gain"] == 0.0


def test_one_fold_is_nested_over_class_halves() -> None:
    spec = rerank_search([clustered_fold(0, n_classes=30)], methods=["qe"], grids=SMALL)
    assert spec["nesting"] == "class_halves" and spec["folds"] == [0, 1]


def test_recognition_chooses_a_vote_and_scores_map5_and_gap() -> None:
    folds = [clustered_fold(k, per_class=8) for k in range(2)]
    spec = rerank_search(folds, task="recognition", methods=["qe"], grids=SMALL, new_fraction=0.25)
    assert spec["metric"] == "map@5"
    vote = spec["vote"]
    assert vote["new_label"] == "new_individual" and vote["mode"] in ("max", "sum") and vote["k"] >= 1
    nested = spec["methods"]["none"]["nested"]
    # 1/4 of queries are new, ~18 known labels: chance MAP@5 is far below this
    assert 0.4 < nested["map@5"] <= 1.0 and 0.0 < nested["gap"] <= 1.0


def test_bad_requests_are_refused() -> None:
    folds = [clustered_fold(0)]
    with pytest.raises(RerankError, match="metric 'map@5' is not available for task retrieval"):
        rerank_search(folds, metric="map@5")
    with pytest.raises(RerankError, match="unknown method"):
        rerank_search(folds, methods=["pca"])


def test_cli_writes_the_spec_and_refuses_to_overwrite(tmp_path) -> None:
    folds = {k: clustered_fold(k) for k in range(2)}
    rows = {}
    for k, f in folds.items():
        ids = np.array([f"{k}_{i}" for i in range(len(f.labels))])
        rows[k] = {"ids": ids, "images": np.char.add(ids, ".png"), "labels": f.labels, "groups": f.labels}
    write_experiment(tmp_path, "exp", {k: f.embeddings for k, f in folds.items()}, rows, n_splits=2)
    argv = ["--experiment", "exp", "--oof-dir", str(tmp_path / "oof"), "--methods", "qe"]
    main(argv)
    spec = load_rerank_spec(tmp_path / "oof" / "exp" / "rerank-retrieval.json")
    assert spec["format"] == RERANK_FORMAT and spec["source"] == {"experiment": "exp"}
    table = (tmp_path / "oof" / "exp" / "rerank-retrieval.md").read_text()
    assert "| none |" in table and "| qe |" in table
    assert spec["n_compared"] == 2 and f"(gain {spec['gain']:+.4f}, the best of 2 nested scores" in table
    assert "chosen as the best of these 2 nested scores" in table and "slightly optimistic" in table
    with pytest.raises(ArtifactExistsError, match="--force"):
        main(argv)
    main([*argv, "--force"])


def test_a_truncated_spec_is_reported(tmp_path) -> None:
    path = tmp_path / "rerank.json"
    path.write_text('{"format": "arcfold.rerank/1", "steps": [')
    with pytest.raises(RerankError, match="not valid JSON"):
        load_rerank_spec(path)
    path.write_text('{"format": "other"}')
    with pytest.raises(RerankError, match="not a rerank spec"):
        load_rerank_spec(path)


def test_map5_for_all_thresholds_equals_rerunning_the_vote() -> None:
    from arcfold.experiments.rerank import map5_by_threshold
    from arcfold.retrieval.submission import map_at_k
    from arcfold.retrieval.voting import vote_labels

    rng = np.random.default_rng(7)
    n_q, n_g = 300, 200
    gallery_labels = rng.integers(0, 30, n_g).astype(str).astype(object)
    sims = np.sort(rng.uniform(-0.2, 1.0, size=(n_q, 8)).round(2), axis=1)[:, ::-1].astype(np.float32)  # ties too
    idx = rng.integers(0, n_g, size=(n_q, 8))
    truth = rng.integers(0, 36, n_q).astype(str)  # labels 30..35 are in no gallery
    is_new = rng.random(n_q) < 0.25
    thresholds = np.round(np.arange(-0.2, 1.0001, 0.05), 2)
    labels, scores = vote_labels(idx, sims, gallery_labels, k=8, mode="sum", top=5)
    curve = map5_by_threshold(labels, scores, truth, is_new, thresholds)
    truth_with_new = np.where(is_new, "new", truth)
    for t, value in zip(thresholds, curve, strict=True):
        direct, _ = vote_labels(idx, sims, gallery_labels, k=8, mode="sum", new_label="new", threshold=t, top=5)
        assert value == pytest.approx(map_at_k([list(r) for r in direct], truth_with_new.tolist(), k=5)), t
