"""Omniglot study: which margin head, which neck? One command, same backbone and budget for every run.

Every run trains fold 0 of the 4 alphabet-grouped Omniglot folds (validation: 2 alphabets never
seen in training) with ``configs/omniglot_arcface.yaml``: timm resnet18 from random init, 64 px,
GeM, batch 64, AdamW lr 1e-3 (head 1e-2), warm-up + cosine, ``--epochs`` epochs (default 6), seed 42,
and keeps its best epoch by Recall@1, as ``train_fold.sh`` does. Only the studied component changes:

* heads (neck ``linear_bn_prelu``, 512-d): ``softmax`` (linear classifier + CE), ``cosface``
  (s 30, m 0.25 cosine units) and ``arcface`` (s 30, m 0.3 rad, the config's defaults).
* necks (head ``arcface``): ``gp``, ``gp_bn``, ``dp_gp``, ``bn_gp``, ``bn_dp_gp_bn`` (dropout 0.2),
  ``linear_bn``, ``linear_bn_prelu``; resnet18 has 512 channels, so every embedding is 512-d.

Each run is a real experiment (``oof/study_<variant>/``, ``models/study_<variant>/``), trained by the
real CLI in its own process; finished runs are reused (``train.resume=true``), so an interrupted study
continues where it stopped. Scores are recomputed from the saved OOF embeddings by
``arcfold.retrieval.metrics.retrieval_metrics`` (leave-one-out over the held-out fold) at K = 1, 3, 5, 10.

Run from the project root (needs ``../shared/data/omniglot``)::

    python benchmarks/omniglot_study.py [--epochs 6] [--only heads|necks]

Writes ``benchmarks/results/omniglot_study.json`` and ``benchmarks/results/omniglot_study.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from arcfold.config import load_config
from arcfold.io import load_npz, save_json, save_text
from arcfold.retrieval.metrics import retrieval_metrics

log = logging.getLogger("study")
RESULTS = Path("benchmarks/results")
CONFIG = "configs/omniglot_arcface.yaml"
KS = (1, 3, 5, 10)

HEADS = {
    "softmax": ["head.name=softmax"],
    "cosface": ["head.name=cosface", "head.scale=30", "head.margin=0.25"],
    "arcface": ["head.name=arcface", "head.scale=30", "head.margin=0.3"],
}
NECKS = {
    "gp": ["model.neck=gp"],
    "gp_bn": ["model.neck=gp_bn"],
    "dp_gp": ["model.neck=dp_gp", "model.drop_rate=0.2"],
    "bn_gp": ["model.neck=bn_gp"],
    "bn_dp_gp_bn": ["model.neck=bn_dp_gp_bn", "model.drop_rate=0.2"],
    "linear_bn": ["model.neck=linear_bn"],
    "linear_bn_prelu": ["model.neck=linear_bn_prelu"],  # the same run as the arcface head
}


def run_name(study: str, variant: str) -> str:
    if (study, variant) == ("necks", "linear_bn_prelu"):
        return "study_head_arcface"  # identical settings: trained once
    return f"study_{study[:-1]}_{variant}"


def train(name: str, overrides: list[str], epochs: int, fold: int) -> float:
    """Train (or reuse) one run in its own process; returns the seconds spent."""
    command = [
        sys.executable, "-m", "arcfold", "train", "--config", CONFIG, "--fold", str(fold),
        f"name={name}", f"train.epochs={epochs}", "train.resume=true", "train.progress=false", *overrides,
    ]  # fmt: skip
    log.info("%s: %s", name, " ".join(command[3:]))
    started = time.time()
    subprocess.run(command, check=True)
    return time.time() - started


def score(name: str, fold: int) -> dict[str, float]:
    cfg = load_config(CONFIG, [f"name={name}"])
    oof = load_npz(cfg.oof_dir / f"fold{fold}.npz")
    metrics = retrieval_metrics(oof["embeddings"], oof["labels"], ks=KS)
    return {k: round(float(v), 4) for k, v in metrics.items() if k.startswith(("recall@", "map@"))}


def table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| variant | " + " | ".join(columns) + " | best epoch | train min |", "|---" * (len(columns) + 3) + "|"]
    for row in rows:
        values = " | ".join(f"{row['metrics'][c]:.4f}" for c in columns)
        lines.append(f"| {row['variant']} | {values} | {row['best_epoch']} | {row['minutes']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--only", choices=("heads", "necks"), default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    studies = {"heads": HEADS, "necks": NECKS}
    if args.only:
        studies = {args.only: studies[args.only]}
    results: dict[str, list[dict]] = {}
    for study, variants in studies.items():
        results[study] = []
        for variant, overrides in variants.items():
            name = run_name(study, variant)
            seconds = train(name, overrides, args.epochs, args.fold)
            fold_json = load_config(CONFIG, [f"name={name}"]).oof_dir / f"fold{args.fold}.json"
            saved = json.loads(fold_json.read_text())
            results[study].append(
                {
                    "variant": variant,
                    "experiment": name,
                    "overrides": overrides,
                    "metrics": score(name, args.fold),
                    "best_epoch": saved["best_epoch"],
                    # the run's own time, not this call's (a reused run costs nothing here)
                    "minutes": round(saved.get("seconds", seconds) / 60, 1),
                }
            )

    command = "python " + " ".join(["benchmarks/omniglot_study.py", *(argv if argv is not None else sys.argv[1:])])
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    payload = {"benchmark": "omniglot_study", "command": command, "machine": machine, "epochs": args.epochs}
    payload.update(fold=args.fold, config=CONFIG, ks=list(KS), results=results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    save_json(RESULTS / "omniglot_study.json", payload)

    md = [
        f"# Omniglot study: heads and necks (fold {args.fold}, {args.epochs} epochs, resnet18 64 px, random init)",
        "",
        f"`{command}` on {machine}. Validation: 2 alphabets never trained on; leave-one-out retrieval.",
    ]
    if "heads" in results:
        md += [
            "",
            "## Margin heads (neck linear_bn_prelu, 512-d)",
            "",
            table(results["heads"], [f"recall@{k}" for k in KS]),
        ]
    if "necks" in results:
        md += ["", "## Necks (ArcFace head, 512-d)", "", table(results["necks"], ["recall@5", "recall@1", "map@r"])]
    best = {study: max(rows, key=lambda r: r["metrics"]["recall@1"])["variant"] for study, rows in results.items()}
    md += ["", "Best by Recall@1: " + ", ".join(f"{s}: {v}" for s, v in best.items())]
    md += [
        "",
        "One fold and one seed per variant: differences below ~0.02 Recall@1 are within run-to-run noise. "
        "`train min` is each run's wall time as recorded in its fold JSON (runs may have shared the machine "
        "with other jobs, and a resumed run counts only its last process): not a speed comparison.",
        "",
    ]
    save_text(RESULTS / "omniglot_study.md", "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
