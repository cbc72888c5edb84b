"""Leave-one-out Recall@1 / MAP@R: arcfold's ``retrieval_metrics`` against pytorch-metric-learning 2.9.0.

Both score the same L2-normalised, random-but-clustered float32 embeddings (``_bench_common.clustered_embeddings``:
classes of 1..15 items, so some singletons) with the same leave-one-out protocol:

* arcfold: ``retrieval_metrics(x, labels, ks=(1, 10))`` (chunked exact torch matmul + top-k; memory bounded by a
  ~256 MiB (chunk, N) block).
* PML: ``AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count")``
  ``.get_accuracy(x, labels, reference=x, reference_labels=labels, ref_includes_query=True)`` with its default
  ``FaissKNN`` given ``index_init_fn=faiss.IndexFlatIP``, so both rank by the same inner product (PML's default
  ``IndexFlatL2`` gives the same order on unit vectors up to float rounding, which flips a few near-ties and moves
  MAP@R by ~5e-7 at 20k x 512), on the CPU.

Definitions compared: PML's ``precision_at_1`` is Recall@1 (top-1 hit rate); its ``mean_average_precision_at_r``
is MAP@R. PML has no hit-rate Recall@K for K > 1 (its ``mean_average_precision`` is MAP@k and ``r_precision`` is
R-precision), so only Recall@1 and MAP@R are compared; ours also reports Recall@10. Singletons: both drop a query
whose label has no other member ("lone" queries in PML) and keep it in the gallery as a distractor.

``--queries Q`` scores a seeded random sample of Q item indices as queries against the whole set (the gallery is
still all N items; singletons in the sample are not queries, in both): arcfold through
``retrieval_metrics(..., query_subset=sample)``, PML through ``get_accuracy(x[sample], y[sample], reference=x,
reference_labels=y, ref_includes_query=True)`` with the reference reordered so that the sample comes first (PML's
requirement; leave-one-out metrics do not depend on the gallery's order, ties apart). Each query's Recall@K / AP@R is
exactly what the full run gives it,
and the work is linear in the number of queries, so the full run's time is projected as seconds x (all queries /
sampled queries); memory is measured, not projected (it does not grow with the queries). This is how 1M x 128
(10^12 pairs in full) is measured here.

Every measurement runs in a fresh subprocess (peak RSS via ``ru_maxrss``); implementations alternate within a size
so machine drift (10-20% on these VMs, and a second engineer's tests) hits both alike. Run from the project root::

    python benchmarks/bench_metrics.py [--sizes 100000x512,200000x128] [--rounds 1] [--queries 10000]

Writes ``benchmarks/results/bench_metrics.json`` and its section of ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bench_common import (  # noqa: E402
    NO_GPU,
    RESULTS,
    clustered_embeddings,
    cuda_available,
    machine,
    machine_line,
    peak_rss_mib,
    run_worker,
    write_results,
)

NAME = "bench_metrics"
TOL = 1e-6
FIRST_RUN_SIZES = "100000x512,50000x128"


def noise_for(d: int) -> float:
    """Noise norm that keeps the metrics well below 1 at dimension ``d`` (higher d separates random centres more)."""
    return 1.6 * (d / 128) ** 0.25


def worker(args: dict) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    import numpy as np

    x, y = clustered_embeddings(args["n"], args["d"], seed=0, noise=noise_for(args["d"]))
    sample = None
    if args.get("queries"):
        sample = np.sort(np.random.default_rng(1).choice(args["n"], size=args["queries"], replace=False))
    ref, ref_y = x, y
    if sample is not None and args["impl"] == "pml":
        # PML wants the queries first in the reference: the same items, reordered (before the clock)
        order = np.concatenate([sample, np.setdiff1d(np.arange(len(y)), sample)])
        ref, ref_y = x[order], y[order]
        del x
    base = peak_rss_mib()
    t0 = time.perf_counter()
    if args["impl"] == "arcfold":
        from arcfold.retrieval.metrics import retrieval_metrics

        r = retrieval_metrics(x, y, ks=(1, 10), query_subset=sample)
        out = {"recall@1": r["recall@1"], "recall@10": r["recall@10"], "map@r": r["map@r"], "n_queries": r["n_queries"]}
    else:
        import faiss
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
        from pytorch_metric_learning.utils.inference import FaissKNN

        calc = AccuracyCalculator(
            include=("precision_at_1", "mean_average_precision_at_r"),
            k="max_bin_count",
            device=torch.device("cpu"),
            knn_func=FaissKNN(index_init_fn=faiss.IndexFlatIP),
        )
        q, qy = (ref, ref_y) if sample is None else (ref[: len(sample)], ref_y[: len(sample)])
        r = calc.get_accuracy(q, qy, reference=ref, reference_labels=ref_y, ref_includes_query=True)
        out = {"recall@1": float(r["precision_at_1"]), "map@r": float(r["mean_average_precision_at_r"])}
    seconds = time.perf_counter() - t0
    peak = peak_rss_mib()
    if sample is not None:  # queries of the full run vs of the sample, for the linear projection
        class_size = np.bincount(y)[y]
        out["all_queries"] = int((class_size > 1).sum())
        out["sampled_queries"] = int((class_size[sample] > 1).sum())
    return {**args, **out, "seconds": seconds, "base_mib": base, "peak_mib": peak, "extra_mib": peak - base}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100000x512,200000x128", help="comma-separated NxD")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds per size")
    p.add_argument("--timeout", type=float, default=900, help="seconds per measurement")
    p.add_argument("--impls", default="arcfold,pml", help="which implementations to run (comma-separated)")
    p.add_argument(
        "--keep-previous",
        action="store_true",
        help="keep the rows of other sizes from an earlier benchmarks/results/bench_metrics.json",
    )
    p.add_argument("--queries", type=int, default=0, help="score a random sample of this many items as queries")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return

    cuda_available(NAME)
    sizes = [tuple(int(v) for v in s.split("x")) for s in a.sizes.split(",")]
    rows = []
    impls = a.impls.split(",")
    for i, (n, d) in enumerate(sizes):
        order = [m for m in (["arcfold", "pml"] if i % 2 == 0 else ["pml", "arcfold"]) if m in impls]
        runs: dict[str, list[dict]] = {"arcfold": [], "pml": []}
        for r in range(a.rounds):
            for impl in order if r % 2 == 0 else order[::-1]:
                args = {"impl": impl, "n": n, "d": d, **({"queries": a.queries} if a.queries else {})}
                res = run_worker(__file__, args, timeout=a.timeout)
                print(json.dumps(res), flush=True)
                runs[impl].append(res)
        rows.append(summarise(n, d, runs, a.queries or None))

    m = machine()
    commands = [f"python benchmarks/bench_metrics.py --sizes {a.sizes} --rounds {a.rounds} --impls {a.impls}"]
    if a.queries:
        commands[0] += f" --queries {a.queries}"
    if a.keep_previous:
        commands[0] += " --keep-previous"
    previous = RESULTS / f"{NAME}.json"
    if a.keep_previous and previous.exists():
        old = json.loads(previous.read_text())
        done = {(r["n"], r["d"], r.get("queries")) for r in rows}
        rows = [r for r in old["sizes"] if (r["n"], r["d"], r.get("queries")) not in done] + rows
        # results written before --impls existed carry no "commands": that run used both implementations
        earlier = old.get("commands", [f"python benchmarks/bench_metrics.py --sizes {FIRST_RUN_SIZES} --rounds 1"])
        commands = [*(c for c in earlier if c not in commands), *commands]
    write_results(NAME, {"machine": m, "commands": commands, "sizes": rows}, markdown(rows, m, commands))


def summarise(n: int, d: int, runs: dict[str, list[dict]], queries: int | None = None) -> dict:
    import numpy as np

    row: dict = {"n": n, "d": d, "runs": runs, **({"queries": queries} if queries else {})}
    ok = {k: [r for r in v if "error" not in r] for k, v in runs.items()}
    for impl, rs in ok.items():
        if rs:
            row[impl] = {
                "median_seconds": float(np.median([r["seconds"] for r in rs])),
                "max_extra_mib": float(max(r["extra_mib"] for r in rs)),
                "max_peak_mib": float(max(r["peak_mib"] for r in rs)),
                **{k: rs[0][k] for k in ("recall@1", "map@r") if k in rs[0]},
            }
            if "recall@10" in rs[0]:
                row[impl]["recall@10"] = rs[0]["recall@10"]
            if "sampled_queries" in rs[0]:
                scale = rs[0]["all_queries"] / rs[0]["sampled_queries"]
                row[impl]["sampled_queries"], row[impl]["all_queries"] = rs[0]["sampled_queries"], rs[0]["all_queries"]
                row[impl]["projected_full_seconds"] = row[impl]["median_seconds"] * scale
        else:
            row[impl] = {"error": runs[impl][0].get("error") if runs[impl] else "not run at this size"}
    if ok["arcfold"] and ok["pml"]:
        a, b = row["arcfold"], row["pml"]
        row["max_abs_diff"] = max(abs(a[k] - b[k]) for k in ("recall@1", "map@r"))
        row["same_to_1e-6"] = row["max_abs_diff"] <= TOL
        row["time_ratio_pml_over_arcfold"] = b["median_seconds"] / a["median_seconds"]
        assert row["same_to_1e-6"], f"arcfold and PML disagree at {n}x{d}: {a} vs {b}"
    return row


def markdown(rows: list[dict], m: dict, commands: list[str]) -> str:
    lines = [
        "## Retrieval metrics: `retrieval_metrics` vs pytorch-metric-learning `AccuracyCalculator`",
        "",
        "Commands: " + "; ".join(f"`{c}`" for c in commands) + "  ",
        f"Machine: {machine_line(m)}  ",
        f"GPU: {NO_GPU}." if not m["cuda"] else "GPU: present (CUDA rows not implemented for this benchmark).",
        "",
        "Leave-one-out over one set, L2-normalised clustered float32 embeddings (classes of 1-15 items; singletons are",
        "distractors, not queries, in both). PML: `include=('precision_at_1', 'mean_average_precision_at_r')`,",
        "`k='max_bin_count'`, `reference=x, ref_includes_query=True`, ",
        "`FaissKNN(index_init_fn=faiss.IndexFlatIP)` on the CPU (same inner product as ours; its default IndexFlatL2",
        "flips float near-ties, ~5e-7 on MAP@R).",
        "PML's `precision_at_1` is Recall@1; it has no hit-rate Recall@K for K>1, so Recall@1 and MAP@R are compared.",
        "Each figure is one fresh subprocess; peak = `ru_maxrss`, extra = peak minus the peak after building the",
        "inputs. Implementations alternate; times are noisy (shared 2-core VM), compare the ratio.",
        "Rows marked *sample of Q* score a seeded random sample of Q items as queries against all N (`--queries`):",
        "their metrics are the sample's, and the full run's time is a **projection**, seconds x (all queries / sampled",
        "queries), valid because each query's work and result do not depend on the other queries.",
        "",
        "| N x D | impl | seconds | extra MiB | peak MiB | Recall@1 | MAP@R | max abs diff | PML time / ours |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for impl in ("arcfold", "pml"):
            r = row[impl]
            size = f"{row['n']} x {row['d']}"
            if row.get("queries"):
                size += f", sample of {row['queries']}"
            if "error" in r:
                last = r["error"].strip().splitlines()[-1]  # the exception's message, e.g. an allocation failure
                lines.append(f"| {size} | {impl} | failed: {last[:160]} | | | | | | |")
                continue
            diff = f"{row['max_abs_diff']:.1e}" if "max_abs_diff" in row and impl == "arcfold" else ""
            ratio = f"{row['time_ratio_pml_over_arcfold']:.2f}" if "max_abs_diff" in row and impl == "arcfold" else ""
            seconds = f"{r['median_seconds']:.1f}"
            if "projected_full_seconds" in r:
                seconds += (
                    f" ({r['sampled_queries']} queries; projected {r['projected_full_seconds']:.0f} s "
                    f"for all {r['all_queries']})"
                )
            lines.append(
                f"| {size} | {impl} | {seconds} | {r['max_extra_mib']:.0f} | "
                f"{r['max_peak_mib']:.0f} | {r['recall@1']:.6f} | {r['map@r']:.6f} | {diff} | {ratio} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
