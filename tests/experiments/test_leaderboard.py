"""Leaderboard: sections per fold file, incomplete experiments marked, mean ± std over folds.

Also home of :func:`write_experiment`, the helper the blend, tune and plots tests use to make
synthetic experiments: it writes exactly the files the train stage writes for a finished fold.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from arcfold.__main__ import main as arcfold_main
from arcfold.config import config_to_yaml, load_config
from arcfold.experiments.leaderboard import build_leaderboard, read_experiment
from arcfold.io import save_json, save_npz, save_text
from arcfold.retrieval.metrics import DEFAULT_KS, retrieval_metrics

from ..conftest import tmp_path_overrides

SHA_A = "a" * 64
SHA_B = "b" * 64


# --------------------------------------------------------------------------------------------
# synthetic experiments (shared with the other tests of this issue)


def fold_rows(fold: int, n_classes: int = 8, per_class: int = 4) -> dict[str, np.ndarray]:
    """Ids, image paths, labels and groups of one held-out fold; classes never repeat across folds."""
    labels = np.repeat([f"c{fold}_{c}" for c in range(n_classes)], per_class)
    ids = np.array([f"f{fold}_{i:04d}" for i in range(len(labels))])
    return {
        "ids": ids,
        "images": np.array([f"images/{i}.png" for i in ids]),
        "labels": labels,
        "groups": np.array([f"g{fold}_{c % 2}" for c in range(n_classes) for _ in range(per_class)]),
    }


def clustered_embeddings(labels: np.ndarray, dim: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Class centre + isotropic noise, L2-normalised; lower noise = better retrieval."""
    classes, codes = np.unique(labels, return_inverse=True)
    centres = rng.normal(size=(len(classes), dim))
    x = centres[codes] + noise * rng.normal(size=(len(labels), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_experiment(
    root: Path,
    name: str,
    embeddings: dict[int, np.ndarray],
    rows: dict[int, dict[str, np.ndarray]],
    *,
    n_splits: int,
    folds_sha256: str | dict[int, str] = SHA_A,
    overrides: tuple[str, ...] = (),
    git_commit: str | None = None,
    epochs: int = 3,
    keep: str | None = "last",
) -> Path:
    """Write what ``train_fold`` writes for each given fold under ``root`` (oof/ and models/); returns oof/<name>.

    ``oof/<name>/fold<K>.npz`` (ids, images, labels, groups, embeddings), ``fold<K>.json`` (scores of
    those embeddings, keep, kept/last/best_epoch, epochs, folds_sha256, finished_at, ...), ``fold<K>.config.yaml``
    and ``models/<name>/fold<K>/history.csv`` (one row per epoch, the last one the best). ``keep=None`` writes a
    fold JSON as the train stage did before ``train.keep`` existed (no keep, kept_epoch, last_epoch, last).
    """
    cfg = load_config(
        None,
        [*tmp_path_overrides(root), f"name={name}", f"folds.n_splits={n_splits}", f"train.epochs={epochs}", *overrides],
    )
    for k, emb in embeddings.items():
        r = rows[k]
        metrics = retrieval_metrics(emb, r["labels"], ks=DEFAULT_KS)
        sha = folds_sha256[k] if isinstance(folds_sha256, dict) else folds_sha256
        scores = {
            "experiment": name,
            "fold": k,
            **({"keep": keep, "kept_epoch": epochs - 1} if keep else {}),
            "best_epoch": epochs - 1,
            **({"last_epoch": epochs - 1} if keep else {}),
            "epochs": epochs,
            **metrics,
            **({"last": {m: v for m, v in metrics.items() if m.startswith(("recall@", "map@"))}} if keep else {}),
            "seconds": 1.0,
            "folds_path": str(root / "folds" / "fake.csv"),
            "folds_sha256": sha,
            "finished_at": f"2026-01-0{k + 1}T10:00:00+00:00",
        }
        if git_commit:
            scores["git_commit"] = git_commit
        history = pd.DataFrame(
            {
                "epoch": range(epochs),
                "train_loss": np.linspace(20, 10, epochs),
                "lr": np.linspace(1e-3, 1e-5, epochs),
                "recall@1": np.linspace(0.1, metrics["recall@1"], epochs),
                "map@r": np.linspace(0.01, metrics["map@r"], epochs),
            }
        )
        save_text(cfg.models_dir / f"fold{k}" / "history.csv", history.to_csv(index=False))
        save_text(cfg.oof_dir / f"fold{k}.config.yaml", config_to_yaml(cfg))
        save_json(cfg.oof_dir / f"fold{k}.json", scores)
        save_npz(
            cfg.oof_dir / f"fold{k}.npz",
            **{key: r[key] for key in ("ids", "images", "labels", "groups")},
            embeddings=emb.astype(np.float32),
        )
    return cfg.oof_dir


def write_images(data_root: Path, rows: dict[int, dict[str, np.ndarray]], size: int = 40) -> None:
    """A small PNG per row: a flat colour per class (so a picture shows which neighbours match)."""
    for r in rows.values():
        classes = {c: i for i, c in enumerate(np.unique(r["labels"]))}
        for path, label in zip(r["images"], r["labels"], strict=True):
            hue = classes[label] * 37 % 256
            img = Image.new("RGB", (size, size), (hue, 255 - hue, (hue * 3) % 256))
            (data_root / path).parent.mkdir(parents=True, exist_ok=True)
            img.save(data_root / path)


def simple_experiment(root, name, folds, n_splits, noise, seed=0, **kwargs) -> Path:
    rng = np.random.default_rng(seed)
    rows = {k: fold_rows(k) for k in folds}
    embeddings = {k: clustered_embeddings(rows[k]["labels"], 16, noise, rng) for k in folds}
    return write_experiment(root, name, embeddings, rows, n_splits=n_splits, **kwargs)


# --------------------------------------------------------------------------------------------
# tests


@pytest.fixture
def three_experiments(tmp_path) -> Path:
    """good (4/4 folds), partial (fold 2 missing, better scores), other_folds (another fold file, best scores)."""
    simple_experiment(tmp_path, "good", [0, 1, 2, 3], 4, noise=1.5, git_commit="0123456789abcdef" * 2 + "01234567")
    simple_experiment(
        tmp_path, "partial", [0, 1, 3], 4, noise=1.0, overrides=("model.backbone=resnet50", "head.loss=focal")
    )
    simple_experiment(tmp_path, "other_folds", [0, 1, 2, 3], 4, noise=0.5, folds_sha256=SHA_B)
    simple_experiment(tmp_path, "worse", [0, 1, 2, 3], 4, noise=3.0)
    return tmp_path / "oof"


def test_row_is_mean_and_std_over_the_fold_jsons(three_experiments):
    row = read_experiment(three_experiments / "good")
    r1 = [json.loads((three_experiments / "good" / f"fold{k}.json").read_text())["recall@1"] for k in range(4)]
    assert row["recall@1_mean"] == pytest.approx(np.mean(r1))
    assert row["recall@1_std"] == pytest.approx(np.std(r1))
    assert np.std(r1) > 0  # the check above can tell mean from std
    assert (row["n_folds"], row["n_splits"], row["complete"]) == (4, 4, True)
    assert row["backbone"] == "resnet18" and row["embedding_size"] == 512 and row["epochs"] == 3
    assert row["git_commit"] == "0123456789" and row["date"] == "2026-01-04 10:00"
    assert read_experiment(three_experiments / "partial")["git_commit"] == "-"  # an older run without one
    write_experiment(
        three_experiments.parent,
        "described",
        {0: np.eye(4, dtype=np.float32)},
        {0: fold_rows(0, 2, 2)},
        n_splits=2,
        git_commit="3bd3470-dirty",
    )
    assert read_experiment(three_experiments / "described")["git_commit"] == "3bd3470-dirty"  # git describe, whole


def test_missing_fold_is_marked_and_ranked_after_complete_ones(three_experiments):
    table = build_leaderboard(three_experiments)
    main = table[table["section"] == SHA_A].set_index("experiment")
    # partial has the best R@1 of its fold file, but it lacks fold 2: listed, marked, after the complete ones
    assert main.loc["partial", "recall@1_mean"] > main.loc["good", "recall@1_mean"] > main.loc["worse", "recall@1_mean"]
    assert not main.loc["partial", "complete"] and "missing fold 2" in main.loc["partial", "notes"]
    assert main["rank"].to_dict() == {"good": 1, "worse": 2, "partial": 3}
    assert main.loc["partial", "n_folds"] == 3 and main.loc["partial", "backbone"] == "resnet50"
    assert main.loc["good", "head"] == "arcface (s=30, m=0.3)" and main.loc["partial", "head"].endswith("focal)")


def test_other_fold_file_gets_its_own_section_and_a_warning(three_experiments, capsys):
    table = build_leaderboard(three_experiments)
    other = table[table["experiment"] == "other_folds"].iloc[0]
    # best scores of all, but never ranked against the others: its own section, rank 1 there
    assert other["recall@1_mean"] > table.loc[table["experiment"] != "other_folds", "recall@1_mean"].max()
    assert other["section"] == SHA_B and other["section_index"] == 2 and other["rank"] == 1
    assert table.iloc[0]["experiment"] == "good"  # the fold file most experiments used comes first

    assert arcfold_main(["leaderboard", "--oof-dir", str(three_experiments)]) == 0
    out = capsys.readouterr().out
    assert "WARNING: experiments were validated on 2 different fold files" in out
    assert out.index("Fold file aaaaaaaaaaaa") < out.index("good") < out.index("Fold file bbbbbbbbbbbb")
    assert out.index("Fold file bbbbbbbbbbbb") < out.index("other_folds")
    assert "3/4 !" in out  # the incomplete experiment is marked in the printed table

    csv = pd.read_csv(three_experiments / "leaderboard.csv")
    assert csv["experiment"].tolist() == ["good", "worse", "partial", "other_folds"]
    md = (three_experiments / "leaderboard.md").read_text()
    assert md.count("## Fold file") == 2 and "| 1 | good |" in md and "| 1 | other_folds |" in md


def test_experiment_mixing_fold_files_is_not_ranked(tmp_path):
    simple_experiment(tmp_path, "good", [0, 1], 2, noise=1.0)
    simple_experiment(tmp_path, "mixed", [0, 1], 2, noise=0.1, folds_sha256={0: SHA_A, 1: SHA_B})
    table = build_leaderboard(tmp_path / "oof").set_index("experiment")
    assert table.loc["mixed", "section"] == "mixed" and table.loc["mixed", "rank"] == 0
    assert "2 different fold files" in table.loc["mixed", "notes"]
    assert table.loc["good", "rank"] == 1


def test_sort_by_another_metric_and_std_of_one_fold(tmp_path):
    simple_experiment(tmp_path, "one_fold", [0], 2, noise=0.5)
    simple_experiment(tmp_path, "two_folds", [0, 1], 2, noise=0.8)
    table = build_leaderboard(tmp_path / "oof", sort="map@r").set_index("experiment")
    assert math.isnan(table.loc["one_fold", "map@r_std"])  # no spread from a single fold
    assert table.loc["two_folds", "rank"] == 1  # complete first, even though one_fold scores higher
    assert table.loc["one_fold", "map@r_mean"] > table.loc["two_folds", "map@r_mean"]
    with pytest.raises(ValueError, match="unknown sort metric 'recall@3'"):
        build_leaderboard(tmp_path / "oof", sort="recall@3")


def test_unfinished_fold_and_non_experiment_folders_are_ignored(tmp_path):
    oof = simple_experiment(tmp_path, "exp", [0, 1], 2, noise=1.0)
    (oof / "fold1.npz").unlink()  # json without npz: the train stage crashed between the two writes
    (tmp_path / "oof" / "tune").mkdir()
    (tmp_path / "oof" / "tune" / "study.db").write_bytes(b"")
    table = build_leaderboard(tmp_path / "oof")
    assert table["experiment"].tolist() == ["exp"] and table.iloc[0]["n_folds"] == 1
    assert arcfold_main(["leaderboard", "--oof-dir", str(tmp_path / "nothing_here")]) == 2


def test_experiments_that_kept_their_best_validation_epoch_are_flagged(tmp_path, capsys):
    """train.keep=best (and fold files from before train.keep, which kept the best epoch) chose the epoch on the
    fold it is scored on: the leaderboard says so in its kept column, with a legend line; a blend of such a member
    inherits the flag."""
    from arcfold.stages.blend import main as blend_main

    simple_experiment(tmp_path, "honest", [0, 1], 2, noise=1.0)
    simple_experiment(tmp_path, "chosen", [0, 1], 2, noise=1.0, seed=1, keep="best")
    simple_experiment(tmp_path, "older", [0, 1], 2, noise=1.0, seed=2, keep=None)
    oof = tmp_path / "oof"
    blend_main(["--oof-dir", str(oof), "--experiments", "honest", "chosen", "--weights", "0.5", "0.5", "--name", "hc"])
    table = build_leaderboard(oof).set_index("experiment")
    assert table["keep"].to_dict() == {"honest": "last", "chosen": "best", "older": "best", "blend:hc": "best"}

    assert arcfold_main(["leaderboard", "--oof-dir", str(oof)]) == 0
    out = capsys.readouterr().out
    assert "kept best* = epoch chosen on the validation fold (train.keep=best)" in out
    md = (oof / "leaderboard.md").read_text()
    assert "kept best* = epoch chosen on the validation fold" in md
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("| ")]
    kept = rows[0].index("kept")
    assert {row[1]: row[kept] for row in rows[1:]} == {
        "honest": "last", "chosen": "best*", "older": "best*", "blend:hc": "best*"
    }  # fmt: skip
    assert pd.read_csv(oof / "leaderboard.csv").set_index("experiment").loc["chosen", "keep"] == "best"

    simple_experiment(tmp_path / "clean", "honest", [0, 1], 2, noise=1.0)
    assert arcfold_main(["leaderboard", "--oof-dir", str(tmp_path / "clean" / "oof")]) == 0
    assert "best*" not in capsys.readouterr().out  # no legend when nothing is flagged


def _test_json(oof: Path, folds: list[int], concatenated_r1: float, separate_r1: list[float]) -> None:
    """What the test stage writes (the keys the leaderboard reads), with chosen numbers."""
    separate = {str(k): {"recall@1": r, "map@r": r / 2} for k, r in zip(folds, separate_r1, strict=True)}
    save_json(
        oof / "test.json",
        {
            "format": "arcfold.test/1",
            "folds": folds,
            "concatenated": {"recall@1": concatenated_r1, "map@r": concatenated_r1 / 2},
            "separate": {
                "per_fold": separate,
                "mean": {"recall@1": float(np.mean(separate_r1))},
                "std": {"recall@1": float(np.std(separate_r1))},
            },
        },
    )


def test_test_split_columns_beside_the_oof_ones_and_sortable(tmp_path, capsys):
    simple_experiment(tmp_path, "plain", [0, 1], 2, noise=0.5)
    assert "test_recall@1" not in build_leaderboard(tmp_path / "oof")  # no test.json anywhere: no test columns
    _test_json(simple_experiment(tmp_path, "tested", [0, 1], 2, noise=1.0), [0, 1], 0.9, [0.7, 0.8])
    _test_json(simple_experiment(tmp_path, "stale", [0, 1], 2, noise=1.5), [0], 0.95, [0.6])
    table = build_leaderboard(tmp_path / "oof", sort="test_recall@1").set_index("experiment")
    assert table.index.tolist() == ["stale", "tested", "plain"]  # by the test figure; none last
    assert (table.loc["tested", "test_recall@1"], table.loc["tested", "test_map@r"]) == (0.9, 0.45)
    assert table.loc["tested", "test_separate_recall@1_mean"] == pytest.approx(0.75)
    assert table.loc["tested", "test_separate_recall@1_std"] == pytest.approx(0.05)
    assert math.isnan(table.loc["plain", "test_recall@1"])
    assert "test scored folds 0: rerun" in table.loc["stale", "notes"]  # fold 1 finished after the test ran
    by_oof = build_leaderboard(tmp_path / "oof").set_index("experiment")
    assert by_oof.index.tolist() == ["plain", "tested", "stale"]  # noise 0.5 < 1.0 < 1.5
    by_separate = build_leaderboard(tmp_path / "oof", sort="test_separate_recall@1")
    assert by_separate["experiment"].tolist() == ["tested", "stale", "plain"]
    assert arcfold_main(["leaderboard", "--oof-dir", str(tmp_path / "oof")]) == 0
    out = capsys.readouterr().out
    assert "test R@1" in out and "test MAP@R" in out and "0.7500 ± 0.0500" in out
