"""Omniglot end to end with an MLRC test split: OOF per fold, the test split, and inference on it.

What a Kaggle user's numbers look like when nothing is selected on what it is scored on. Runs, through the real
command lines and in this order (each step is skipped when its output exists, so a stopped run continues):

1. ``python -m arcfold folds -c CONFIG``: 2 of the 8 alphabets held out as the test split (``folds.test_fraction``),
   the other 6 in 3 alphabet-grouped folds;
2. ``bash train_fold.sh 0..K-1 CONFIG name=NAME``: every fold (resnet18, 64 px, 10 epochs, random init, the
   config's ``train.keep``, ``last`` by default);
3. ``python -m arcfold test -c CONFIG name=NAME``: the test split embedded by every fold model, scored leave-one-out
   for each fold model alone (``separate``), for the fold ensemble inference submits (``concatenated``) and for the
   old mean of the folds' vectors (``mean_of_folds``, for comparison);
4. ``python -m arcfold holdout make --experiment NAME --split test`` (a query/gallery split of the test rows),
   ``inference.py`` with all folds (``submission.format=retrieval``, no re-ranking, embeddings saved) and
   ``python -m arcfold holdout score``: the submitted ensemble scored on the test split;
5. the same query/gallery score recomputed from the ``test`` stage's own embeddings (``test.npz``, concatenated):
   inference and the test stage must agree.

Per fold the table gives the kept epoch's OOF scores and the last epoch's, and (from ``history.csv``) the epoch
with the best validation Recall@1: the optimistic figure a selection on the validation fold would report.

Run from the project root (needs ``../shared/data/omniglot``; about 15 minutes on an idle 2-core CPU)::

    python benchmarks/omniglot_test_split.py [--config configs/omniglot_arcface.yaml] [--name NAME] [--force]

Writes ``benchmarks/results/omniglot_test_split.json`` and ``.md`` (with the load average before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from arcfold.config import load_config  # noqa: E402
from arcfold.experiments.holdout import score_holdout  # noqa: E402
from arcfold.io import load_npz, save_json, save_text  # noqa: E402
from arcfold.retrieval.ensemble import blend_embeddings  # noqa: E402
from arcfold.retrieval.search import search  # noqa: E402
from arcfold.retrieval.submission import retrieval_scores  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
METRICS = ("recall@1", "recall@5", "recall@10", "map@r")


def run(cmd: list[str], log: list[dict]) -> None:
    """Run one command of the pipeline from the project root; stop the benchmark if it fails."""
    line = " ".join(shlex.quote(c) for c in cmd)
    print(f"\n$ {line}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, check=False)
    log.append({"command": line, "seconds": round(time.time() - t0, 1), "exit": proc.returncode})
    if proc.returncode != 0:
        raise SystemExit(f"benchmark stopped: `{line}` exited {proc.returncode}")


def fold_rows(cfg) -> list[dict]:
    """Per fold: the kept epoch's OOF scores, the last epoch's, and the best validation epoch's (history.csv)."""
    rows = []
    for k in range(cfg.folds.n_splits):
        record = json.loads((cfg.oof_dir / f"fold{k}.json").read_text())
        history = pd.read_csv(cfg.models_dir / f"fold{k}" / "history.csv")
        best = history.loc[history["recall@1"].idxmax()]
        rows.append(
            {
                "fold": k,
                "keep": record.get("keep", "best"),
                "kept_epoch": int(record.get("kept_epoch", record["best_epoch"])),
                "kept": {m: float(record[m]) for m in METRICS},
                "last_epoch": int(record.get("last_epoch", history["epoch"].iloc[-1])),
                "last": {m: float(history[m].iloc[-1]) for m in METRICS},
                "best_on_validation_epoch": int(best["epoch"]),
                "best_on_validation": {m: float(best[m]) for m in METRICS},
                "n_queries": int(record["n_queries"]),
                "seconds": float(record["seconds"]),
            }
        )
    return rows


def ensemble_of_test_stage(test_npz: Path) -> tuple[np.ndarray, dict[str, int]]:
    """The test stage's fold embeddings concatenated as inference combines them, (N, sum D), and each id's row."""
    arrays = load_npz(test_npz)
    folds = sorted(k for k in arrays if k.startswith("fold"))
    emb = blend_embeddings([arrays[k] for k in folds], [1.0] * len(folds))  # (N, sum D)
    return emb, {i: r for r, i in enumerate(arrays["ids"].astype(str))}


def holdout_from_test_embeddings(
    emb: np.ndarray, row_of: dict[str, int], holdout: Path, top_k: int
) -> dict[str, float]:
    """The holdout's retrieval score from the test stage's concatenated fold embeddings (same search, same scorer)."""
    query = pd.read_csv(holdout / "query.csv", dtype=str)
    gallery = pd.read_csv(holdout / "gallery.csv", dtype=str)
    truth = pd.read_csv(holdout / "truth.csv", dtype=str).set_index("id").loc[query["id"]]
    q = emb[[row_of[i] for i in query["id"]]]
    g = emb[[row_of[i] for i in gallery["id"]]]
    _, idx = search(q, g, k=min(top_k, len(g)))
    g_labels = gallery["label"].to_numpy()
    counts = gallery["label"].value_counts()
    n_relevant = truth["label"].map(counts).fillna(0).astype(int).to_numpy()
    keep = n_relevant > 0
    rows = [list(g_labels[r]) for r in idx[keep]]
    scores = retrieval_scores(rows, truth["label"].to_numpy()[keep].tolist(), n_relevant[keep], ks=(1, 5, 10))
    return {"n_queries": float(len(query)), **scores}


def render(result: dict) -> str:
    lines = [
        f"# Omniglot with an MLRC test split ({result['experiment']})",
        "",
        f"`{result['command']}`; load average before {result['loadavg_before']}, after {result['loadavg_after']} "
        f"({result['cpus']} CPUs); {result['minutes']:.1f} min.",
        "",
        f"{result['n_splits']} folds grouped by alphabet on 6 alphabets, test split = {result['test_groups']} "
        f"({result['test']['n_images']} images, never trained, validated or selected on); "
        f"{result['backbone']}, {result['image_size']} px, {result['epochs']} epochs, random init, "
        f"`train.keep={result['folds'][0]['keep']}`.",
        "",
        "**OOF, per fold** (leave-one-out on the held-out fold; the last column is the epoch a selection on the "
        "validation fold would pick, optimistic by construction):",
        "",
        "| fold | kept epoch | R@1 | MAP@R | last epoch | R@1 | MAP@R | best-on-validation epoch | R@1 | MAP@R |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["folds"]:
        lines.append(
            f"| {r['fold']} | {r['kept_epoch']} | {r['kept']['recall@1']:.4f} | {r['kept']['map@r']:.4f} "
            f"| {r['last_epoch']} | {r['last']['recall@1']:.4f} | {r['last']['map@r']:.4f} "
            f"| {r['best_on_validation_epoch']} | {r['best_on_validation']['recall@1']:.4f} "
            f"| {r['best_on_validation']['map@r']:.4f} |"
        )
    oof = result["oof_mean"]
    lines += [
        f"| mean | | {oof['kept']['recall@1']:.4f} | {oof['kept']['map@r']:.4f} | | {oof['last']['recall@1']:.4f} "
        f"| {oof['last']['map@r']:.4f} | | {oof['best_on_validation']['recall@1']:.4f} "
        f"| {oof['best_on_validation']['map@r']:.4f} |",
        "",
        f"**Test split** (leave-one-out over {result['test']['n_images']} images, "
        f"{result['test']['n_queries']} queries; `python -m arcfold test`):",
        "",
        "| fold models | R@1 | R@5 | MAP@R |",
        "|---|---|---|---|",
    ]
    sep = result["test"]["separate"]
    lines.append(
        f"| separate (each fold model alone, mean ± std over {result['n_splits']}) "
        + "".join(f"| {sep['mean'][m]:.4f} ± {sep['std'][m]:.4f} " for m in ("recall@1", "recall@5", "map@r"))
        + "|"
    )
    for key, label in (
        ("concatenated", "concatenated (the ensemble inference submits)"),
        ("mean_of_folds", "mean of the folds' vectors (the old inference, for comparison)"),
    ):
        s = result["test"][key]
        lines.append(f"| {label} | {s['recall@1']:.4f} | {s['recall@5']:.4f} | {s['map@r']:.4f} |")
    inf, rec = result["inference"]["holdout_score"], result["inference"]["from_test_stage"]
    lines += [
        "",
        f"**inference.py on the test split** (all {result['n_splits']} fold models; a query/gallery split of the test "
        f"rows by `holdout make --split test`: {result['inference']['n_query']} queries, "
        f"{result['inference']['n_gallery']} gallery images, {result['inference']['n_new']} queries of classes "
        "absent from the gallery, which retrieval scoring skips; no re-ranking):",
        "",
        "| scored by | R@1 | R@5 | R@10 | mAP@5 |",
        "|---|---|---|---|---|",
        f"| `holdout score` of the submission | {inf['recall@1']:.4f} | {inf['recall@5']:.4f} | "
        f"{inf['recall@10']:.4f} | {inf['map@5']:.4f} |",
        f"| the same split from the test stage's concatenated embeddings | {rec['recall@1']:.4f} | "
        f"{rec['recall@5']:.4f} | {rec['recall@10']:.4f} | {rec['map@5']:.4f} |",
        "",
        f"Largest difference between inference's and the test stage's embeddings: "
        f"{result['inference']['max_abs_embedding_difference']:.2e}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/omniglot_arcface.yaml")
    parser.add_argument("--name", default="bench_omniglot_test")
    parser.add_argument("--force", action="store_true", help="train every fold and run every step again")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for the folds")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    started, load_before = time.time(), [round(x, 2) for x in os.getloadavg()]
    py = sys.executable
    overrides = [f"name={args.name}", "train.progress=false", *args.overrides]
    cfg = load_config(args.config, overrides)
    k = cfg.folds.n_splits
    steps: list[dict] = []
    force = ["train.force=true"] if args.force else ["train.resume=true"]  # resume: finished folds are kept
    run([py, "-m", "arcfold", "folds", "-c", args.config, *args.overrides], steps)
    run(["bash", "train_fold.sh", f"0..{k - 1}", args.config, *overrides, *force], steps)
    if args.force or not (cfg.oof_dir / "test.json").exists():
        run([py, "-m", "arcfold", "test", "-c", args.config, *overrides, *(["--force"] if args.force else [])], steps)
    test = json.loads((cfg.oof_dir / "test.json").read_text())

    holdout = Path("input") / f"{args.name}_test_holdout"
    run([py, "-m", "arcfold", "holdout", "make", "--experiment", args.name, "--split", "test", "--out", str(holdout)],
        steps)  # fmt: skip
    info = json.loads((holdout / "holdout.json").read_text())
    submission = Path("submissions") / f"{args.name}_test.csv"
    run(
        [
            py, "inference.py", "-c", "configs/inference/glyphs.yaml", f"experiment={args.name}",
            f"query.csv={holdout / 'query.csv'}", f"query.image_root={info['image_root']}",
            f"gallery.csv={holdout / 'gallery.csv'}", f"gallery.image_root={info['image_root']}",
            "submission.format=retrieval", "rerank=none", f"submission.name={submission.stem}",
            "save_embeddings=true", "submission.top_k=100",
        ],
        steps,
    )  # fmt: skip
    holdout_scores = score_holdout(submission, holdout, "retrieval")
    ref, row_of = ensemble_of_test_stage(cfg.oof_dir / "test.npz")
    recomputed = holdout_from_test_embeddings(ref, row_of, holdout, top_k=100)

    # inference's saved embeddings against the test stage's, row by row
    saved = load_npz(submission.with_suffix(".npz"))
    diffs = []
    for role in ("query", "gallery"):
        ids, emb = saved[f"{role}_ids"].astype(str), saved[role]
        diffs.append(float(np.abs(emb - ref[[row_of[i] for i in ids]]).max()))

    rows = fold_rows(cfg)
    mean = {
        part: {m: float(np.mean([r[part][m] for r in rows])) for m in METRICS}
        for part in ("kept", "last", "best_on_validation")
    }
    result = {
        "benchmark": "omniglot_test_split",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "experiment": args.name,
        "cpus": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "minutes": (time.time() - started) / 60,
        "n_splits": k,
        "backbone": cfg.model.backbone,
        "image_size": cfg.data.image_size,
        "epochs": cfg.train.epochs,
        "test_groups": test.get("test_groups"),
        "folds": rows,
        "oof_mean": mean,
        "test": test,
        "inference": {
            "n_query": info["n_query"],
            "n_gallery": info["n_gallery"],
            "n_new": info["n_new_queries"],
            "holdout_score": holdout_scores,
            "from_test_stage": recomputed,
            "max_abs_embedding_difference": max(diffs),
        },
        "steps": steps,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    save_json(RESULTS / "omniglot_test_split.json", result)
    text = render(result)
    save_text(RESULTS / "omniglot_test_split.md", text)
    print("\n" + text)


if __name__ == "__main__":
    main()
