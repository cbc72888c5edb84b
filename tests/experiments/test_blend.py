"""Blend: the maths of the weighted concatenation, a blend that must help, honest nested weights, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from arcfold.__main__ import main as arcfold_main
from arcfold.errors import ArtifactExistsError, BlendError
from arcfold.experiments.blend import blend_experiments, coordinate_ascent, load_blend_folds
from arcfold.experiments.leaderboard import build_leaderboard
from arcfold.io import load_npz, save_npz
from arcfold.retrieval.ensemble import blend_embeddings, load_blend_spec
from arcfold.retrieval.metrics import retrieval_metrics

from .test_leaderboard import SHA_B, fold_rows, write_experiment

FOLDS = (0, 1, 2, 3)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def half_signal_experiments(root, seed: int = 0, noise: float = 1.2) -> dict:
    """Two experiments that each see half of the class signal.

    Class centres live in 32 dimensions; experiment ``a`` sees dimensions 0-15 of the centre plus
    noise, ``b`` dimensions 16-31 plus independent noise. Concatenated, the blend sees the whole
    centre with noise of the same per-dimension size, so its classes are twice as separated (in
    squared distance) as either member's: it must retrieve better than both.
    """
    rng = np.random.default_rng(seed)
    rows = {k: fold_rows(k, n_classes=20, per_class=4) for k in FOLDS}
    emb_a, emb_b = {}, {}
    for k in FOLDS:
        codes = np.unique(rows[k]["labels"], return_inverse=True)[1]
        centres = rng.normal(size=(codes.max() + 1, 32))[codes]  # (N, 32)
        emb_a[k] = _unit(centres[:, :16] + noise * rng.normal(size=(len(codes), 16)))
        emb_b[k] = _unit(centres[:, 16:] + noise * rng.normal(size=(len(codes), 16)))
    write_experiment(root, "a", emb_a, rows, n_splits=4, overrides=("model.embedding_size=16",))
    write_experiment(root, "b", emb_b, rows, n_splits=4, overrides=("model.embedding_size=16",))
    return rows


def noise_experiments(root, n_members: int = 4, seed: int = 0) -> list[str]:
    """Members of pure noise on tiny folds (10 classes x 2 images): any weight that "helps" is luck."""
    rng = np.random.default_rng(seed)
    rows = {k: fold_rows(k, n_classes=10, per_class=2) for k in FOLDS}
    names = [f"noise{m}" for m in range(n_members)]
    for name in names:
        write_experiment(root, name, {k: _unit(rng.normal(size=(20, 8))) for k in FOLDS}, rows, n_splits=4)
    return names


# --------------------------------------------------------------------------------------------
# the blend itself


def test_blend_inner_product_is_the_weighted_sum_of_cosines():
    rng = np.random.default_rng(0)
    a, b, c = rng.normal(size=(50, 8)), rng.normal(size=(50, 4)), rng.normal(size=(50, 16))
    x = blend_embeddings([a, b, c], [2.0, 1.0, 1.0])  # rescaled to 0.5, 0.25, 0.25
    expected = 0.5 * _unit(a) @ _unit(a).T + 0.25 * _unit(b) @ _unit(b).T + 0.25 * _unit(c) @ _unit(c).T
    np.testing.assert_allclose(x @ x.T, expected, atol=1e-5)
    assert x.shape == (50, 28) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-6)
    # weight 0 removes a member: same similarities as the blend without it
    y = blend_embeddings([a, b, c], [1.0, 0.0, 1.0])
    z = blend_embeddings([a, c], [1.0, 1.0])
    np.testing.assert_allclose(y @ y.T, z @ z.T, atol=1e-5)
    with pytest.raises(BlendError, match="not all 0"):
        blend_embeddings([a, b], [0.0, 0.0])
    with pytest.raises(BlendError, match="2 members need 2 weights"):
        blend_embeddings([a, b], [1.0])


def test_coordinate_ascent_finds_the_grid_optimum_of_a_concave_objective():
    target = np.array([0.5, 0.3, 0.2])
    weights, value = coordinate_ascent(lambda w: -np.sum((w / w.sum() - target) ** 2), 3, grid=(0, 1, 1.5, 2, 2.5))
    np.testing.assert_allclose(weights, target, atol=1e-9)  # 2.5 : 1.5 : 1 is on the grid
    assert value == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------------------------
# on synthetic experiments


def test_blend_of_two_halves_beats_both_members(tmp_path):
    half_signal_experiments(tmp_path)
    spec = blend_experiments(tmp_path / "oof", ["a", "b"], "ab")
    scores = spec["scores"]
    members = {e: scores["members"][e]["mean"]["recall@1"] for e in ("a", "b")}
    nested = scores["nested"]["mean"]["recall@1"]
    assert nested > max(members.values()) + 0.15, (members, nested)
    for k in map(str, FOLDS):  # on every fold, not only on average
        best_member = max(scores["members"][e]["per_fold"][k]["recall@1"] for e in ("a", "b"))
        assert scores["nested"]["per_fold"][k]["recall@1"] > best_member
    # members are symmetric: neither is dropped
    assert all(0.25 <= w <= 0.75 for w in spec["weights"]) and sum(spec["weights"]) == pytest.approx(1.0)

    # the stored member scores are the scores of the experiments' own OOF, and the in-sample blend
    # scores are retrieval_metrics of blend_embeddings with the spec's weights
    for k in FOLDS:
        a, b = (load_npz(tmp_path / "oof" / e / f"fold{k}.npz") for e in ("a", "b"))
        stored = json.loads((tmp_path / "oof" / "a" / f"fold{k}.json").read_text())
        assert scores["members"]["a"]["per_fold"][str(k)]["map@r"] == pytest.approx(stored["map@r"], abs=1e-9)
        blended = retrieval_metrics(blend_embeddings([a["embeddings"], b["embeddings"]], spec["weights"]), a["labels"])
        assert scores["in_sample"]["per_fold"][str(k)]["recall@5"] == pytest.approx(blended["recall@5"], abs=1e-9)

    written = load_blend_spec(tmp_path / "oof" / "blends" / "ab.json")
    assert written["experiments"] == ["a", "b"] and written["embedding_size"] == 32
    assert written["folds"] == list(FOLDS) and written["n_splits"] == 4 and len(written["folds_sha256"]) == 64
    with pytest.raises(ArtifactExistsError, match="--force"):
        blend_experiments(tmp_path / "oof", ["a", "b"], "ab")

    # the leaderboard shows the blend with its nested scores, ranked above both members
    board = build_leaderboard(tmp_path / "oof").set_index("experiment")
    assert board.loc["blend:ab", "recall@1_mean"] == pytest.approx(nested)
    assert board.loc["blend:ab", "rank"] == 1 and "nested" in board.loc["blend:ab", "notes"]


def test_nested_estimate_is_below_in_sample_when_the_search_can_only_overfit(tmp_path):
    names = noise_experiments(tmp_path)
    spec = blend_experiments(tmp_path / "oof", names, "noise")
    in_sample = spec["scores"]["in_sample"]["mean"]["recall@1"]
    nested = spec["scores"]["nested"]["mean"]["recall@1"]
    # pure noise: the in-sample search finds weights that fit the noise of these folds; held out, they do not
    # help. (1/19 is the chance Recall@1 of a query with one relevant item among 19.)
    assert in_sample - nested >= 0.03, (in_sample, nested)
    assert in_sample > 1.5 / 19
    # the nested weights differ from fold to fold: each was searched on other data
    assert len({tuple(w) for w in spec["scores"]["nested"]["weights"].values()}) > 1


def test_nested_weights_of_a_fold_never_see_that_fold(tmp_path):
    names = noise_experiments(tmp_path, n_members=3, seed=1)
    before = blend_experiments(tmp_path / "oof", names, "x")["scores"]["nested"]["weights"]
    # replace fold 0 of one member by other random numbers: only fold 0's score may change, never its weights
    path = tmp_path / "oof" / names[1] / "fold0.npz"
    arrays = load_npz(path)
    arrays["embeddings"] = _unit(np.random.default_rng(99).normal(size=arrays["embeddings"].shape)).astype(np.float32)
    save_npz(path, **arrays)
    after = blend_experiments(tmp_path / "oof", names, "x", force=True)["scores"]["nested"]["weights"]
    assert after["0"] == before["0"]
    assert any(after[k] != before[k] for k in ("1", "2", "3"))  # the change did reach the other folds' searches


def test_fixed_weights_have_no_nested_score(tmp_path):
    half_signal_experiments(tmp_path)
    spec = blend_experiments(tmp_path / "oof", ["a", "b"], "fixed", weights=[3, 1])
    assert spec["weights"] == [0.75, 0.25] and spec["search"]["method"] == "fixed"
    assert spec["scores"]["nested"] is None


def test_rows_are_aligned_by_id_not_by_position(tmp_path):
    rows = half_signal_experiments(tmp_path)
    reference = blend_experiments(tmp_path / "oof", ["a", "b"], "ref", weights=[1, 1])
    # shuffle the rows of b's fold 1: same images, other order
    path = tmp_path / "oof" / "b" / "fold1.npz"
    arrays = load_npz(path)
    order = np.random.default_rng(0).permutation(len(rows[1]["ids"]))
    save_npz(path, **{key: value[order] for key, value in arrays.items()})
    shuffled = blend_experiments(tmp_path / "oof", ["a", "b"], "shuffled", weights=[1, 1])
    assert shuffled["scores"]["in_sample"] == reference["scores"]["in_sample"]
    folds, _ = load_blend_folds(tmp_path / "oof", ["a", "b"])
    assert folds[1].ids.tolist() == rows[1]["ids"].tolist()


# --------------------------------------------------------------------------------------------
# refusals


def test_refuses_experiments_on_different_fold_files(tmp_path, caplog):
    rows = {k: fold_rows(k) for k in FOLDS}
    rng = np.random.default_rng(0)
    write_experiment(tmp_path, "a", {k: _unit(rng.normal(size=(32, 8))) for k in FOLDS}, rows, n_splits=4)
    write_experiment(
        tmp_path, "b", {k: _unit(rng.normal(size=(32, 8))) for k in FOLDS}, rows, n_splits=4, folds_sha256=SHA_B
    )
    with pytest.raises(BlendError, match="different fold files"):
        load_blend_folds(tmp_path / "oof", ["a", "b"])
    # through the CLI: exit status 2, one clear line, no spec written
    with pytest.raises(SystemExit) as exit_info:
        arcfold_main(["blend", "--oof-dir", str(tmp_path / "oof"), "--experiments", "a", "b", "--name", "x"])
    assert exit_info.value.code == 2
    assert "different fold files" in caplog.text
    assert not (tmp_path / "oof" / "blends" / "x.json").exists()


def test_refuses_a_missing_fold_and_offers_the_common_ones(tmp_path):
    rows = {k: fold_rows(k) for k in FOLDS}
    rng = np.random.default_rng(0)
    write_experiment(tmp_path, "a", {k: _unit(rng.normal(size=(32, 8))) for k in FOLDS}, rows, n_splits=4)
    write_experiment(tmp_path, "b", {k: _unit(rng.normal(size=(32, 8))) for k in (0, 1, 3)}, rows, n_splits=4)
    with pytest.raises(BlendError, match=r"different finished folds .*--folds 0 1 3"):
        load_blend_folds(tmp_path / "oof", ["a", "b"])
    with pytest.raises(BlendError, match="fold 2 of experiment 'b' is missing"):
        load_blend_folds(tmp_path / "oof", ["a", "b"], folds=[0, 2])
    folds, info = load_blend_folds(tmp_path / "oof", ["a", "b"], folds=[0, 1, 3])
    assert [f.fold for f in folds] == [0, 1, 3] and info["n_splits"] == 4


def test_refuses_different_ids_or_labels(tmp_path):
    rows = {k: fold_rows(k) for k in FOLDS}
    rng = np.random.default_rng(0)
    emb = {k: _unit(rng.normal(size=(32, 8))) for k in FOLDS}
    write_experiment(tmp_path, "a", emb, rows, n_splits=4)
    other_ids = {k: dict(r) for k, r in rows.items()}
    other_ids[2]["ids"] = np.array([f"x{i}" if i < 3 else v for i, v in enumerate(rows[2]["ids"])])
    write_experiment(tmp_path, "b", emb, other_ids, n_splits=4)
    with pytest.raises(BlendError, match=r"fold 2: .* hold different images \(3 ids only in 'a'"):
        load_blend_folds(tmp_path / "oof", ["a", "b"])
    other_labels = {k: dict(r) for k, r in rows.items()}
    other_labels[1]["labels"] = np.roll(rows[1]["labels"], 1)
    write_experiment(tmp_path, "c", emb, other_labels, n_splits=4)
    with pytest.raises(BlendError, match="fold 1: .* label the same ids differently"):
        load_blend_folds(tmp_path / "oof", ["a", "c"])
    with pytest.raises(BlendError, match="no finished fold"):
        load_blend_folds(tmp_path / "oof", ["a", "nope"])
