"""Exact leave-one-out Recall@K / MAP@R at scale: ``retrieval_metrics``' symmetric path against its chunked path.

Both score every query of the same L2-normalised clustered float32 embeddings (``_bench_common.clustered_embeddings``,
classes of 1..15 items, so k = max(10, 14) = 14 neighbours per row), ``ks=(1, 10)``, on the CPU:

* ``symmetric``: ``retrieval_metrics(x, y, ks=(1, 10), method="symmetric")``: one ``self_topk`` pass (GEMM on
  (1024, 1024) tiles of the upper triangle, faiss heaps), then the label gathers and AP@R;
* ``chunked``: ``method="chunked"``, the code before issue 19 (chunks of queries x all N, torch top-k);
* ``gemm``: the floor for the symmetric path: the same upper-triangle tile products and nothing else (no
  selection, no labels), so ``symmetric - gemm`` is the selection and scoring.

Every measurement is a fresh subprocess (peak RSS via ``ru_maxrss``; the inputs are built before the clock);
implementations alternate within a size. The script asserts that symmetric and chunked give the same numbers to the
last digit (``==`` on every metric). Run from the project root (all queries, no sampling)::

    python benchmarks/bench_metrics_loo.py --sizes 50000x128,200000x128 --impls symmetric,chunked,gemm --rounds 2
    python benchmarks/bench_metrics_loo.py --sizes 1000000x128 --impls symmetric --rounds 1 --timeout 5400

Writes ``benchmarks/results/bench_metrics_loo.json`` and its section of ``BENCHMARKS.md`` (``--keep-previous``
keeps the rows of other sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bench_common import (  # noqa: E402
    RESULTS,
    clustered_embeddings,
    gemm_floor,
    machine,
    machine_line,
    parse_or_work,
    peak_rss_mib,
    run_worker,
    write_results,
)

NAME = "bench_metrics_loo"
KS = (1, 10)


def worker(args: dict) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    x, y = clustered_embeddings(args["n"], args["d"], seed=0, noise=1.6)
    base = peak_rss_mib()
    t0 = time.perf_counter()
    if args["impl"] == "gemm":
        gemm_floor(x)
        out: dict = {}
    else:
        from arcfold.retrieval.metrics import retrieval_metrics

        out = retrieval_metrics(x, y, ks=KS, method=args["impl"])
    seconds = time.perf_counter() - t0
    peak = peak_rss_mib()
    k = int(max(max(KS), np.bincount(y).max() - 1))
    return {**args, **out, "k": k, "seconds": seconds, "base_mib": base, "peak_mib": peak, "extra_mib": peak - base}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="50000x128,200000x128", help="comma-separated NxD")
    p.add_argument("--impls", default="symmetric,chunked,gemm", help="comma-separated: symmetric, chunked, gemm")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds per size")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per measurement")
    p.add_argument("--keep-previous", action="store_true", help="keep other sizes' rows from an earlier run")
    a = parse_or_work(p, worker)
    if a is None:
        return

    impls = a.impls.split(",")
    rows = []
    for n, d in (tuple(int(v) for v in s.split("x")) for s in a.sizes.split(",")):
        runs: dict[str, list[dict]] = {m: [] for m in impls}
        for r in range(a.rounds):
            for impl in impls if r % 2 == 0 else impls[::-1]:
                res = run_worker(__file__, {"impl": impl, "n": n, "d": d}, timeout=a.timeout)
                res["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
                print(json.dumps(res), flush=True)
                runs[impl].append(res)
        rows.append(summarise(n, d, runs))

    command = f"python benchmarks/bench_metrics_loo.py --sizes {a.sizes} --impls {a.impls} --rounds {a.rounds}"
    previous = RESULTS / f"{NAME}.json"
    if a.keep_previous and previous.exists():
        done = {(r["n"], r["d"]) for r in rows}
        rows = [r for r in json.loads(previous.read_text())["sizes"] if (r["n"], r["d"]) not in done] + rows
    m = machine()
    write_results(NAME, {"machine": m, "command": command, "sizes": rows}, markdown(rows, m, command))


def summarise(n: int, d: int, runs: dict[str, list[dict]]) -> dict:
    import numpy as np

    row: dict = {"n": n, "d": d, "runs": runs}
    for impl, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            row[impl] = {"error": rs[0]["error"] if rs else "not run"}
            continue
        row[impl] = {
            "seconds": [round(r["seconds"], 2) for r in ok],
            "median_seconds": float(np.median([r["seconds"] for r in ok])),
            "max_peak_mib": float(max(r["peak_mib"] for r in ok)),
            "max_extra_mib": float(max(r["extra_mib"] for r in ok)),
            **{k: ok[0][k] for k in ("recall@1", "recall@10", "map@r", "n_queries", "k") if k in ok[0]},
        }
    scored = [impl for impl in ("symmetric", "chunked") if "map@r" in row.get(impl, {})]
    if len(scored) == 2:
        keys = ("recall@1", "recall@10", "map@r", "n_queries")
        row["identical"] = all(row["symmetric"][k] == row["chunked"][k] for k in keys)
        row["speedup"] = row["chunked"]["median_seconds"] / row["symmetric"]["median_seconds"]
        assert row["identical"], f"symmetric and chunked differ at {n}x{d}: {row['symmetric']} vs {row['chunked']}"
    return row


def markdown(rows: list[dict], m: dict, command: str) -> str:
    lines = [
        "## Exact leave-one-out metrics at scale: symmetric (`self_topk`) vs chunked path",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_line(m)}  ",
        "",
        "Every query scored (no sampling), `ks=(1, 10)`, k = 14 neighbours per row; `gemm` = the upper-triangle tile",
        "products alone (the symmetric path's floor). Each time is one fresh subprocess; implementations alternate.",
        "Peak = `ru_maxrss` (inputs included), extra = peak minus the peak after building the inputs.",
        "",
        "| N x D | impl | seconds (runs) | median s | extra MiB | peak MiB | Recall@1 | Recall@10 | MAP@R | same |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for impl in [i for i in ("symmetric", "chunked", "gemm") if i in row]:
            r = row[impl]
            size = f"{row['n']} x {row['d']}"
            if "error" in r:
                lines.append(f"| {size} | {impl} | failed: {r['error'].strip().splitlines()[-1][:160]} | | | | | | | |")
                continue
            metrics = " | ".join(f"{r[k]:.6f}" if k in r else "" for k in ("recall@1", "recall@10", "map@r"))
            same = ("yes" if row["identical"] else "NO") if "identical" in row and impl == "symmetric" else ""
            runs = ", ".join(f"{s:.1f}" for s in r["seconds"])
            lines.append(
                f"| {size} | {impl} | {runs} | {r['median_seconds']:.1f} | {r['max_extra_mib']:.0f} | "
                f"{r['max_peak_mib']:.0f} | {metrics} | {same} |"
            )
        if "speedup" in row:
            lines.append(f"| | chunked / symmetric | | **{row['speedup']:.2f}x** | | | | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
