"""Where the Omniglot test split's errors are: arcfold's defaults against the reference, per alphabet and per pair.

Reads what ``benchmarks/omniglot.py`` left (no training): for seed 0 and each replicate ``--seed S`` it ran, arcfold's
``oof/bench_arcfold[_seed<S>]/test.npz`` (the 3 fold models' test embeddings, from ``python -m arcfold test``) and the
reference's ``oof/bench_reference[_seed<S>]/fold<k>.npz``. Each side's 3 fold models are combined as the benchmark
combines them (L2-normalised, concatenated), and every test image is a leave-one-out query against the other 959:
its nearest neighbour (:func:`arcfold.retrieval.self_knn.self_topk`, the evaluator's exact search) is right or
wrong. Reported per seed: the errors of each side in each alphabet of the test split (Recall@1 of that alphabet's
queries, the gallery the whole split, as the benchmark scores it), the queries only one side gets wrong, a 95 %
bootstrap interval of the Recall@1 difference over the characters (seeded), and the confused pairs of characters
with the most errors; with replicates, every seed together (the mean difference and its interval over the
characters). The totals are checked against :func:`arcfold.retrieval.metrics.retrieval_metrics` (the
benchmark's evaluator).

    python benchmarks/omniglot_errors.py [--config configs/omniglot_arcface.yaml] [--top 6]

Writes ``benchmarks/results/omniglot_errors.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from arcfold.config import load_config  # noqa: E402
from arcfold.data.folds import TEST_FOLD, load_folds  # noqa: E402
from arcfold.data.table import FOLD, GROUP, ID, LABEL  # noqa: E402
from arcfold.io import load_npz, save_json, save_text  # noqa: E402
from arcfold.retrieval.ensemble import blend_embeddings  # noqa: E402
from arcfold.retrieval.metrics import retrieval_metrics  # noqa: E402
from arcfold.retrieval.self_knn import self_topk  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SIDES = ("arcfold", "reference")


def side(members: list[np.ndarray], labels: np.ndarray) -> dict:
    """One side's ensemble: per query, whether its nearest neighbour is of its class, and that neighbour's label."""
    emb = blend_embeddings(members, [1.0] * len(members))
    nn = self_topk(emb, 1, exclude_self=True).idx[:, 0]  # the evaluator's exact search, ties and all
    wrong = labels[nn] != labels
    check = 1.0 - float(retrieval_metrics(emb, labels)["recall@1"])
    if abs(wrong.mean() - check) > 1e-9:
        raise AssertionError(f"error rate {wrong.mean()} differs from the evaluator's {check}")
    return {"wrong": wrong, "neighbour": labels[nn]}


def per_character(wrong_a: np.ndarray, wrong_b: np.ndarray, labels: np.ndarray) -> dict[str, list[int]]:
    """Per character: [queries, errors of b - errors of a] (a's Recall@1 gain over b, in queries)."""
    chars, inverse = np.unique(labels, return_inverse=True)
    n = np.bincount(inverse, minlength=len(chars))
    gain = np.bincount(inverse, weights=wrong_b.astype(float) - wrong_a.astype(float), minlength=len(chars))
    return {str(c): [int(k), int(g)] for c, k, g in zip(chars, n, gain, strict=True)}


def bootstrap_difference(characters: dict[str, list[int]], draws: int = 10_000) -> list:
    """95 % interval of Recall@1(a) - Recall@1(b) over the characters (:func:`per_character`; summed over seeds,
    the interval of the seeds' mean difference): the characters drawn with replacement, their queries' right/wrong
    kept, as the test split's errors cluster in pairs of characters, not in images."""
    n, gain = np.array(list(characters.values()), dtype=float).T
    picks = np.random.default_rng(0).integers(0, len(n), size=(draws, len(n)))
    diff = gain[picks].sum(axis=1) / n[picks].sum(axis=1)
    return [float(v) for v in np.percentile(diff, [2.5, 97.5])]


def pooled(seeds: dict[str, dict]) -> dict:
    """Every seed together: each side's mean Recall@1, their mean difference and its 95 % interval over the
    characters (each character's queries and gains summed over the seeds, so a character weighs the same at every
    seed)."""
    chars: dict[str, list[int]] = {}
    for r in seeds.values():
        for c, (k, g) in r["characters"].items():
            total = chars.setdefault(c, [0, 0])
            total[0] += k
            total[1] += g
    recall = {side: [1 - r["errors"][side] / r["n"] for r in seeds.values()] for side in SIDES}
    difference = np.subtract(recall["arcfold"], recall["reference"])
    return {
        "seeds": list(seeds),
        "recall@1": {side: float(np.mean(values)) for side, values in recall.items()},
        "difference": float(difference.mean()),
        "difference_sd": float(difference.std(ddof=1)) if len(difference) > 1 else 0.0,
        "difference_ci95": bootstrap_difference(chars),
    }


def analyse(arcfold: Path, reference: Path, labels: np.ndarray, groups: np.ndarray, ids: np.ndarray, top: int) -> dict:
    a = load_npz(arcfold / "test.npz")
    if not np.array_equal(a["ids"].astype(str), ids):
        raise ValueError(f"{arcfold / 'test.npz'}: its ids are not the fold file's test rows in order")
    k = sorted(int(key[4:]) for key in a if key.startswith("fold"))
    sides = {
        "arcfold": side([a[f"fold{i}"] for i in k], labels),
        "reference": side([load_npz(reference / f"fold{i}.npz")["test"] for i in k], labels),
    }
    per_group = {
        g: {name: int(s["wrong"][groups == g].sum()) for name, s in sides.items()} | {"n": int((groups == g).sum())}
        for g in np.unique(groups)
    }
    pairs = {
        name: Counter(tuple(sorted(p)) for p in zip(labels[s["wrong"]], s["neighbour"][s["wrong"]], strict=True))
        for name, s in sides.items()
    }
    worst = sorted(
        set(pairs["arcfold"]) | set(pairs["reference"]),
        key=lambda p: (-(pairs["arcfold"][p] + pairs["reference"][p]), p),
    )
    wa, wr = sides["arcfold"]["wrong"], sides["reference"]["wrong"]
    characters = per_character(wa, wr, labels)
    return {
        "experiments": [arcfold.name, reference.name],
        "n": len(labels),
        "errors": {
            "arcfold": int(wa.sum()),
            "reference": int(wr.sum()),
            "both": int((wa & wr).sum()),
            "only_arcfold": int((wa & ~wr).sum()),
            "only_reference": int((~wa & wr).sum()),
        },
        "difference_ci95": bootstrap_difference(characters),
        "characters": characters,
        "per_group": per_group,
        "pairs": [
            {"pair": list(p), "arcfold": pairs["arcfold"][p], "reference": pairs["reference"][p]} for p in worst[:top]
        ],
    }


def render(result: dict) -> str:
    lines = [
        "# Omniglot test split: where the errors are (arcfold's defaults against the reference)",
        "",
        f"`{result['command']}`: no training, reads what `benchmarks/omniglot.py` left. Each side's 3 fold models "
        "concatenated (as the benchmark scores the test split), every image a leave-one-out query; an error is a "
        "nearest neighbour of another character. Recall@1 = 1 - errors / images.",
        "",
        "| seed | alphabet | images | arcfold errors | reference errors | arcfold R@1 | reference R@1 | difference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for seed, r in result["seeds"].items():
        rows = [*r["per_group"].items(), ("all", {"n": r["n"], **r["errors"]})]
        for g, c in rows:
            ra, rr = 1 - c["arcfold"] / c["n"], 1 - c["reference"] / c["n"]
            lines.append(
                f"| {seed} | {g} | {c['n']} | {c['arcfold']} | {c['reference']} "
                f"| {ra:.4f} | {rr:.4f} | {ra - rr:+.4f} |"
            )
    lines += [
        "",
        "| seed | both wrong | only arcfold wrong | only the reference wrong | R@1 difference, 95 % interval over "
        "characters (bootstrap) |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {s} | {r['errors']['both']} | {r['errors']['only_arcfold']} | {r['errors']['only_reference']} "
        f"| {r['difference_ci95'][0]:+.4f} .. {r['difference_ci95'][1]:+.4f} |"
        for s, r in result["seeds"].items()
    ]
    lines += [
        "",
        "The confused pairs with the most errors (both directions, both sides):",
        "",
        "| seed | pair | arcfold errors | reference errors |",
        "|---|---|---|---|",
    ]
    for seed, r in result["seeds"].items():
        lines += [
            f"| {seed} | `{p['pair'][0]}` / `{p['pair'][1]}` | {p['arcfold']} | {p['reference']} |" for p in r["pairs"]
        ]
    if "pooled" in result:
        p = result["pooled"]
        lines += [
            "",
            f"Seeds {', '.join(p['seeds'])} together: mean R@1 arcfold {p['recall@1']['arcfold']:.4f}, reference "
            f"{p['recall@1']['reference']:.4f}, difference **{p['difference']:+.4f}** (sd over seeds "
            f"{p['difference_sd']:.4f}); 95 % interval of the seeds' mean difference over the characters (bootstrap, "
            f"each character's queries and errors summed over the seeds) {p['difference_ci95'][0]:+.4f} .. "
            f"{p['difference_ci95'][1]:+.4f}.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/omniglot_arcface.yaml")
    parser.add_argument("--top", type=int, default=6, help="confused pairs listed per seed")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, [])
    df = load_folds(cfg.folds_path)
    test = df[df[FOLD] == TEST_FOLD]
    labels, groups = test[LABEL].to_numpy().astype(str), test[GROUP].to_numpy().astype(str)
    ids = test[ID].to_numpy().astype(str)
    oof = ROOT / cfg.paths.oof_dir
    seeds = {}
    for arc in oof.glob("bench_arcfold*/test.npz"):
        found = re.fullmatch(r"bench_arcfold(_seed(\d+))?", arc.parent.name)  # omniglot.py's names: _seed<S>, S > 0
        ref = oof / arc.parent.name.replace("bench_arcfold", "bench_reference")
        if found and (ref / "fold0.npz").exists():
            seeds[found[2] or "0"] = analyse(arc.parent, ref, labels, groups, ids, args.top)
    seeds = dict(sorted(seeds.items(), key=lambda item: int(item[0])))  # seed 0, then the replicates
    if not seeds:
        sys.exit("no oof/bench_arcfold*/test.npz with its oof/bench_reference*: run benchmarks/omniglot.py first")
    result = {
        "command": " ".join(["python benchmarks/omniglot_errors.py", *(argv if argv is not None else sys.argv[1:])]),
        "seeds": seeds,
    }
    if len(seeds) > 1:
        result["pooled"] = pooled(seeds)
    save_json(RESULTS / "omniglot_errors.json", result)
    save_text(RESULTS / "omniglot_errors.md", render(result))
    print(render(result))


if __name__ == "__main__":
    main()
