"""Tests for arcfold.retrieval.index_tuning: the IVF / HNSW knob chosen for target_recall on held-out gallery rows
(reached on new queries, the smallest on its grid), an explicit knob wins, index files keep it, bad targets."""

from __future__ import annotations

import doctest
import json
import logging
import re

import numpy as np
import pytest

import arcfold.retrieval.index_tuning
import arcfold.retrieval.search
from arcfold.errors import CorruptFileError
from arcfold.retrieval.index_tuning import check_target_recall, hnsw_params, load_index, save_index
from arcfold.retrieval.search import build_index, faiss_available, search

pytestmark = pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")

TARGET = 0.95
KNOB = {"ivf": "nprobe", "hnsw": "efSearch", "ivfpq": "nprobe"}


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def clustered() -> tuple[np.ndarray, np.ndarray]:
    """10k x 32 gallery and 2000 new queries: classes of 1-15 items, noise of norm 1.2 around unit centres."""
    rng = np.random.default_rng(0)
    n = 12_000
    labels = np.repeat(np.arange(n), rng.integers(1, 16, size=n))[:n]
    centres = _unit(rng.normal(size=(labels.max() + 1, 32)))
    x = _unit(centres[labels] + 1.2 / np.sqrt(32) * rng.normal(size=(n, 32)))[rng.permutation(n)]
    return x[10_000:], x[:10_000]


@pytest.fixture(scope="module")
def exact(clustered) -> np.ndarray:
    queries, gallery = clustered
    return search(queries, gallery, 10, backend="faiss", device="cpu")[1]  # (2000, 10)


def _per_query_recall(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return np.array([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)])


@pytest.mark.parametrize("index", ["ivf", "hnsw", "ivfpq"])
def test_the_chosen_knob_reaches_the_target_on_new_queries_and_is_the_smallest_tried(clustered, exact, index) -> None:
    import faiss

    queries, gallery = clustered
    report: list[dict] = []
    faiss_index = build_index(gallery, index=index, target_recall=TARGET, report=report)
    (t,) = report
    assert (t["index"], t["knob"], t["source"], t["reached"]) == (index, KNOB[index], "target_recall", True)
    assert t["n_queries"] == 1000 and t["k"] == 10  # a tenth of the gallery held out; k = min(search k, 10)
    assert t["recall_lower"] >= TARGET and t["recall"] > t["recall_lower"]
    # The smallest value of its grid: every smaller value tried missed, and the nearest is within an eighth of it.
    missed = [v for v, _, lower in t["tried"] if v < t["value"]]
    assert all(lower < TARGET for v, _, lower in t["tried"] if v < t["value"])
    assert t["value"] - max(missed) <= max(1, t["value"] // 8)
    # New queries (never in the gallery) reach the target at the chosen value (the sample's margin of two standard
    # errors covers their own sampling error), without overshooting it far.
    _, found = faiss_index.search(queries, 10)
    recall = _per_query_recall(found, exact).mean()
    assert TARGET <= recall < TARGET + 0.02, recall
    # Every gallery row is in the index once, under its own id (the held-out rows were added after the sweep).
    assert faiss_index.ntotal == 10_000
    if index in ("ivf", "ivfpq"):  # ivfpq: an IndexIDMap around the refined IVF-PQ
        faiss.extract_index_ivf(faiss_index).nprobe = 256  # exhaustive: each row finds itself first
        np.testing.assert_array_equal(faiss_index.search(gallery, 1)[1][:, 0], np.arange(10_000))
    else:  # an IndexIDMap: the stored vectors, in insertion order, against the gallery rows of their ids
        ids = faiss.vector_to_array(faiss_index.id_map)  # (N,)
        np.testing.assert_array_equal(np.sort(ids), np.arange(10_000))
        np.testing.assert_array_equal(faiss.downcast_index(faiss_index.index).reconstruct_n(0, 10_000), gallery[ids])


def test_the_held_out_estimate_is_honest_where_self_queries_are_not(clustered, exact) -> None:
    """At efSearch=16 the held-out rows' recall is that of new queries; gallery rows searched in an index that holds
    them (themselves excluded from the results) start in their own neighbourhood of the graph: 0.99 against 0.88."""
    queries, gallery = clustered
    report: list[dict] = []
    faiss_index = build_index(gallery, index="hnsw", report=report)
    first_value, held_out_recall, _ = report[0]["tried"][0]
    assert first_value == 16
    hnsw_params(faiss_index).efSearch = 16
    new_recall = _per_query_recall(faiss_index.search(queries, 10)[1], exact).mean()
    rows = np.arange(2000)
    found = faiss_index.search(gallery[rows], 11)[1]  # (2000, 11): itself and 10 others, normally
    found = np.array([[j for j in row if j != i][:10] for i, row in zip(rows, found, strict=True)])
    self_recall = _per_query_recall(found, search(gallery, gallery, 10, exclude_self=True)[1][rows]).mean()
    assert abs(held_out_recall - new_recall) < 0.01 and new_recall < 0.9
    assert self_recall > new_recall + 0.05


def test_a_deep_ivf_search_sweeps_from_the_lists_that_hold_2k_items(caplog) -> None:
    """Well-separated clusters: one list would reach recall@10, but a top-100 search needs ~100 / 39 lists."""
    rng = np.random.default_rng(5)
    x = _unit(_unit(rng.normal(size=(300, 32)))[rng.integers(0, 300, 10_200)] + 0.02 * rng.normal(size=(10_200, 32)))
    queries, gallery = x[10_000:], x[:10_000]
    report: list[dict] = []

    def n_short(**kwargs) -> int:  # queries the index returned fewer than 100 neighbours for (searched exactly)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="arcfold.retrieval.search"):
            search(queries, gallery, 100, index="ivf", device="cpu", report=report, **kwargs)
        found = re.search(r"fewer than 100 neighbours for (\d+) queries", caplog.text)
        return int(found.group(1)) if found else 0

    assert n_short() <= 2
    assert report[0]["tried"][0][0] == report[0]["value"] == 6  # ceil(2 * 100 * 230 lists / 9000 rows), reached
    assert n_short(nprobe=1) > 150  # an explicit knob wins, even this one: most rows fall back to exact search


def test_search_reports_the_knob_it_searched_with(clustered, exact) -> None:
    queries, gallery = clustered
    report: list[dict] = []
    _, idx = search(queries, gallery, 10, index="hnsw", device="cpu", report=report)
    reference = build_index(gallery, index="hnsw", ef_search=report[0]["value"])  # the same knob, given
    assert report[0]["source"] == "target_recall" and report[0]["value"] >= 16
    recall = _per_query_recall(idx, exact).mean()
    assert recall >= TARGET and abs(recall - _per_query_recall(reference.search(queries, 10)[1], exact).mean()) < 0.01
    report.clear()
    search(queries, gallery, 10, index="exact", report=report)
    assert report == []  # nothing to tune


@pytest.mark.parametrize(
    ("index", "kwargs", "value"),
    [("ivf", {"nprobe": 7}, 7), ("hnsw", {"ef_search": 77}, 77), ("ivfpq", {"nprobe": 7}, 7)],
)
def test_an_explicit_knob_wins_and_skips_the_sweep(clustered, index, kwargs, value) -> None:
    import faiss

    _, gallery = clustered
    report: list[dict] = []
    faiss_index = build_index(gallery, index=index, target_recall=0.99, report=report, **kwargs)
    assert report == [
        {"index": index, "knob": KNOB[index], "value": value, "source": "explicit", "target_recall": 0.99,
         "recall": None, "recall_lower": None, "reached": None, "k": None, "n_queries": 0, "tried": [], "seconds": 0.0}
    ]  # fmt: skip
    if index == "ivf":
        assert faiss_index.nprobe == 7
    elif index == "ivfpq":  # no held-out rows: the refined IVF-PQ itself, ids in gallery order
        assert isinstance(faiss_index, faiss.IndexRefineFlat) and faiss.extract_index_ivf(faiss_index).nprobe == 7
    else:  # no held-out rows: the plain HNSW index, ids in gallery order
        assert isinstance(faiss_index, faiss.IndexHNSWFlat) and faiss_index.hnsw.efSearch == 77


def test_without_a_target_the_former_defaults_apply(clustered) -> None:
    _, gallery = clustered
    report: list[dict] = []
    ivf = build_index(gallery, index="ivf", target_recall=None, report=report)
    hnsw = build_index(gallery, index="hnsw", target_recall=None, report=report)
    assert ivf.nlist == 256 and ivf.nprobe == 64 and hnsw.hnsw.efSearch == 128  # nlist / 4; 128
    assert [(t["value"], t["source"]) for t in report] == [(64, "default"), (128, "default")]


def test_a_gallery_too_small_to_sample_is_searched_exhaustively() -> None:
    gallery = _unit(np.random.default_rng(1).normal(size=(9, 4)))
    report: list[dict] = []
    build_index(gallery, index="ivf", nlist=2, report=report)
    build_index(gallery, index="hnsw", report=report)
    assert [(t["value"], t["source"]) for t in report] == [(2, "small gallery"), (128, "small gallery")]


def test_an_unreachable_target_uses_the_largest_value_tried_and_warns_once(clustered, monkeypatch, caplog) -> None:
    _, gallery = clustered
    monkeypatch.setattr(arcfold.retrieval.search, "MAX_EF_SEARCH", 32)  # the sweep stops at 16, 32
    report: list[dict] = []
    with caplog.at_level(logging.WARNING, logger="arcfold.retrieval.index_tuning"):
        faiss_index = build_index(gallery, index="hnsw", target_recall=0.999, report=report)
    (t,) = report
    assert (t["value"], t["reached"], [v for v, *_ in t["tried"]]) == (32, False, [16, 32])
    assert hnsw_params(faiss_index).efSearch == 32
    (record,) = caplog.records
    message = record.getMessage()
    assert "\n" not in message
    want = "hnsw index: target_recall 0.999 not reached: efSearch=32, the largest tried, gives recall@10"
    assert message.startswith(f"{want} {t['recall']:.3f}")


# --------------------------------------------------------------------------------------------------------------------
# index files


@pytest.mark.parametrize("index", ["ivf", "hnsw", "ivfpq"])
def test_a_saved_index_loads_with_its_knob_and_searches_the_same(clustered, tmp_path, index) -> None:
    queries, gallery = clustered
    report: list[dict] = []
    faiss_index = build_index(gallery, index=index, report=report)
    path = tmp_path / f"gallery.{index}"
    save_index(faiss_index, path, report[0])
    assert json.loads((tmp_path / f"gallery.{index}.json").read_text()) == {
        "format": "arcfold.index/1", "ntotal": 10_000, "d": 32, "tuning": report[0]
    }  # fmt: skip
    loaded, tuning = load_index(path)
    assert tuning is not None and tuning.value == report[0]["value"] and tuning.tried == report[0]["tried"]
    import faiss

    knob = hnsw_params(loaded).efSearch if index == "hnsw" else faiss.extract_index_ivf(loaded).nprobe
    assert knob == report[0]["value"]
    want_sims, want_idx = faiss_index.search(queries, 10)
    got_sims, got_idx = loaded.search(queries, 10)
    np.testing.assert_array_equal(got_idx, want_idx)
    np.testing.assert_array_equal(got_sims, want_sims)


def test_index_files_that_do_not_belong_together_are_refused(clustered, tmp_path) -> None:
    _, gallery = clustered
    small = build_index(gallery[:500], index="ivf", nprobe=3)
    save_index(small, tmp_path / "a.ivf")
    save_index(build_index(gallery[:600], index="ivf", nprobe=3), tmp_path / "b.ivf")
    (tmp_path / "a.ivf.json").write_text((tmp_path / "b.ivf.json").read_text())
    with pytest.raises(CorruptFileError, match=r"a.ivf holds 500 vectors of D=32 but .*a.ivf.json records 600"):
        load_index(tmp_path / "a.ivf")
    (tmp_path / "a.ivf.json").write_text(
        json.dumps({"format": "arcfold.index/1", "ntotal": 500, "d": 32, "tuning": {"x": 1}})
    )
    with pytest.raises(CorruptFileError, match=r"a.ivf.json: its \"tuning\" record is not one save_index writes"):
        load_index(tmp_path / "a.ivf")
    (tmp_path / "a.ivf.json").write_text("{}")
    with pytest.raises(CorruptFileError, match="not an arcfold index record"):
        load_index(tmp_path / "a.ivf")
    (tmp_path / "a.ivf.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"a.ivf.json not found"):
        load_index(tmp_path / "a.ivf")


# --------------------------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.01, 2, float("nan"), True, "0.9"])
def test_a_target_outside_0_1_is_an_error(bad) -> None:
    with pytest.raises(ValueError, match=r"target_recall must be a number in \(0, 1\] or None, got"):
        check_target_recall(bad)
    gallery = _unit(np.random.default_rng(1).normal(size=(100, 4)))
    with pytest.raises(ValueError, match="target_recall must be a number in"):
        build_index(gallery, index="hnsw", target_recall=bad)


def test_valid_targets() -> None:
    assert check_target_recall(1) == 1.0 and check_target_recall(0.5) == 0.5 and check_target_recall(None) is None


def test_doctests() -> None:
    result = doctest.testmod(arcfold.retrieval.index_tuning, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
