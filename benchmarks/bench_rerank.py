"""Re-ranking post-processors: time and peak memory of α-QE, DBA, k-reciprocal and label voting.

Queries and gallery: ``N`` each, L2-normalised clustered float32 vectors at D=128 drawn around the same class
centres (``_bench_common.clustered_embeddings``). First stage: ``arcfold.retrieval.search.search(q, g, K=50)`` (faiss
exact), computed once per size in its own process before the measurements, which load it from a temporary file.
Each post-processor runs at its defaults with the default (exact faiss) search:

* ``qe``: ``query_expansion(q, g)`` (k=2, α=3; includes its own search of the gallery).
* ``dba``: ``database_augmentation(g)`` (k=2, α=3; includes the gallery-vs-gallery search).
* ``kr``: ``k_reciprocal(q, g, sims, idx)`` (k1=20, k2=6, λ=0.3, ``original_scale="row_max"``; includes the
  ``(Q+N)``-item k-NN graph and row-max pass, ``self_topk``).
* ``vote``: ``vote_labels(idx, sims, gallery_labels)`` (mode="max", top=5).

Where k-reciprocal's time goes (``--steps kr,kr_knn,kr_gemm``): ``kr_knn`` is its k-NN pass alone
(``self_topk(U, k1 + 1, row_min=True)`` on the union U of queries and gallery), ``kr_gemm`` the similarity work of that
pass alone: the same (1024, 1024) tiles of the upper triangle of ``U U^T``, torch matmul and nothing else (the floor of
any exact pass that computes each pair once in float32).

Every measurement is a fresh subprocess; peak = ``ru_maxrss``, ``extra`` = peak minus the peak after the inputs and
the first stage were built. k-reciprocal is also measured at intermediate sizes to show that its memory grows
linearly with |U|·(k1+1) (|U| = Q + N), never as |U|^2. Run from the project root::

    python benchmarks/bench_rerank.py [--sizes 10000,100000] [--kr-sizes 10000,30000,100000]

``--kr-baseline COMMIT`` also times ``k_reciprocal`` as it was at COMMIT (the whole ``arcfold`` package of that commit,
``git archive`` into a temporary folder put first on the worker's ``sys.path``: its k-NN pass, set algebra and search
alike) at every k-reciprocal size, in the same run, each baseline cell just before the current one; the two results
must agree (same ranking, scores to 1e-5).

Writes ``benchmarks/results/bench_rerank.json`` and its section of ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bench_common import (  # noqa: E402
    NO_GPU,
    RESULTS,
    clustered_embeddings,
    cuda_available,
    gemm_floor,
    machine,
    machine_line,
    parse_or_work,
    peak_rss_mib,
    run_worker,
    write_results,
)

NAME = "bench_rerank"
D = 128
K_FIRST = 50
K1 = 20
STEPS = ("qe", "dba", "kr", "vote")
PARTS = ("kr_knn", "kr_gemm")  # k-reciprocal's k-NN pass and its GEMM alone (module docstring)


def worker(args: dict) -> dict:
    n, step = args["n"], args["step"]
    if step.startswith("kr@"):  # the whole arcfold package of another commit (--kr-baseline), before any import
        sys.path.insert(0, str(baseline_package(step[3:])))
    import numpy as np

    from arcfold.retrieval.postprocess import database_augmentation, k_reciprocal, query_expansion
    from arcfold.retrieval.search import faiss_available, search
    from arcfold.retrieval.self_knn import self_topk
    from arcfold.retrieval.voting import vote_labels

    kw = {"backend": args["backend"]}
    x, labels = clustered_embeddings(2 * n, D, seed=2)
    q, g, g_labels = x[:n], x[n:], labels[n:]
    # The first stage is the same for every step of a size: computed once, kept in a temporary file (before the clock)
    cache = Path(tempfile.gettempdir()) / f"arcfold_bench_rerank_first_stage_{n}_{args['backend']}.npz"
    if cache.exists():
        with np.load(cache) as f:
            sims, idx = f["sims"], f["idx"]
    else:
        sims, idx = search(q, g, K_FIRST, **kw)  # (Q, K) each
        np.savez(cache, sims=sims, idx=idx)
    if step == "first":  # only the cache (its own process, so that no measured cell's base includes this search)
        return dict(args)
    if faiss_available():
        import faiss  # noqa: F401  (loaded before the clock: k_reciprocal's k-NN pass uses its heaps)
    union = np.concatenate([q, g]) if step in PARTS else None  # (Q + N, D): k-reciprocal's U
    flops = 0
    base = peak_rss_mib()
    t0 = time.perf_counter()
    if step == "kr_knn":
        self_topk(union, K1 + 1, row_min=True)
    elif step == "kr_gemm":
        flops = gemm_floor(union)
    elif step == "qe":
        query_expansion(q, g, **kw)
    elif step == "dba":
        database_augmentation(g, **kw)
    elif step == "kr" or step.startswith("kr@"):  # kr@: the import above resolved to the baseline's package
        new_sims, new_idx = k_reciprocal(q, g, sims, idx, **kw)
    else:
        vote_labels(idx, sims, g_labels)
    seconds = time.perf_counter() - t0
    peak = peak_rss_mib()
    out = {**args, "seconds": seconds, "base_mib": base, "peak_mib": peak, "extra_mib": peak - base}
    if flops:
        out["gflops_per_s"] = flops / seconds / 1e9
    if step == "kr" or step.startswith("kr@"):  # kept for the comparison of the two k-reciprocal cells
        np.savez(Path(tempfile.gettempdir()) / f"arcfold_bench_rerank_{step}_{n}.npz", sims=new_sims, idx=new_idx)
    return out


def baseline_package(commit: str) -> Path:
    """The ``src`` folder of ``commit`` (``git archive``), extracted once into a temporary folder; its ``arcfold``
    imports before the installed one when put first on ``sys.path``: every module as at that commit."""
    import io
    import subprocess
    import tarfile

    root = Path(tempfile.gettempdir()) / f"arcfold_bench_rerank_baseline_{commit}"
    if not (root / "src" / "arcfold").is_dir():
        archive = subprocess.run(["git", "archive", commit, "src/arcfold"], capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(root, filter="data")
    return root / "src"


def agreement(n: int, baseline: str) -> dict:
    """Whether the current and the baseline k-reciprocal cells of size n ranked alike (their saved outputs)."""
    import numpy as np

    files = [Path(tempfile.gettempdir()) / f"arcfold_bench_rerank_{step}_{n}.npz" for step in ("kr", f"kr@{baseline}")]
    if not all(f.exists() for f in files):
        return {}
    with np.load(files[0]) as cur, np.load(files[1]) as base:
        return {
            "same_idx_fraction": float((cur["idx"] == base["idx"]).mean()),
            "max_abs_score_diff": float(np.abs(cur["sims"] - base["sims"]).max()),
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,100000", help="N queries = N gallery items, every post-processor")
    p.add_argument("--kr-sizes", default="10000,30000,100000", help="sizes for the k-reciprocal memory scan")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "faiss", "torch"),
        help="search backend inside every post-processor (exact either way)",
    )
    p.add_argument("--steps", default=",".join(STEPS), help="post-processors to run at --sizes (comma-separated)")
    p.add_argument("--keep-previous", action="store_true", help="keep other cells' rows from the last results")
    p.add_argument("--kr-baseline", default="", help="also time k_reciprocal of this git commit, same sizes")
    a = parse_or_work(p, worker)
    if a is None:
        return

    cuda_available(NAME)
    sizes = [int(s) for s in a.sizes.split(",")]
    kr_sizes = [int(s) for s in a.kr_sizes.split(",") if s]
    steps = [s for s in a.steps.split(",") if s]
    jobs = list(dict.fromkeys([(n, s) for n in sizes for s in steps] + [(n, "kr") for n in kr_sizes]))
    jobs.sort(key=lambda j: j[0])
    if a.kr_baseline:  # each baseline cell just before the current one of its size
        jobs = [j for n, s in jobs for j in ([(n, f"kr@{a.kr_baseline}")] if s == "kr" else []) + [(n, s)]]
    for pattern in ("arcfold_bench_rerank_first_stage_*.npz", "arcfold_bench_rerank_kr*.npz"):
        for cache in Path(tempfile.gettempdir()).glob(pattern):
            cache.unlink()  # never reuse a first stage or an output from an earlier (possibly different) run
    for n in dict.fromkeys(n for n, _ in jobs):
        run_worker(__file__, {"n": n, "step": "first", "backend": a.backend}, timeout=a.timeout)
    rows = []
    for n, step in jobs:
        res = run_worker(__file__, {"n": n, "step": step, "backend": a.backend}, timeout=a.timeout)
        if step == "kr" and a.kr_baseline:
            res.update(agreement(n, a.kr_baseline))
        print(json.dumps(res), flush=True)
        rows.append(res)
    for pattern in ("arcfold_bench_rerank_first_stage_*.npz", "arcfold_bench_rerank_kr*.npz"):
        for cache in Path(tempfile.gettempdir()).glob(pattern):
            cache.unlink()  # the first stages and k-reciprocal outputs shared by this run's workers
    command = (
        f"python benchmarks/bench_rerank.py --sizes {a.sizes} --kr-sizes {a.kr_sizes} --backend {a.backend}"
        + (f" --steps {a.steps}" if steps != list(STEPS) else "")
        + (" --keep-previous" if a.keep_previous else "")
        + (f" --kr-baseline {a.kr_baseline}" if a.kr_baseline else "")
    )
    for r in rows:
        r["command"] = command
    previous = RESULTS / f"{NAME}.json"
    if a.keep_previous and previous.exists():
        done = {(r["n"], r["step"]) for r in rows}
        rows = [r for r in json.loads(previous.read_text())["rows"] if (r["n"], r["step"]) not in done] + rows
        sizes = sorted({*sizes, *(r["n"] for r in rows if r["step"] in STEPS and r["step"] != "kr")})
    kr = [r for r in rows if r["step"] == "kr" and "error" not in r]
    for r in kr:
        r["union_items"] = 2 * r["n"]
        r["extra_bytes_per_union_item_k1"] = r["extra_mib"] * 2**20 / (r["union_items"] * (K1 + 1))
        r["dense_union_matrix_mib"] = (r["union_items"] ** 2) * 4 / 2**20
    m = machine()
    write_results(NAME, {"machine": m, "rows": rows}, markdown(rows, sizes, m, a))


def markdown(rows: list[dict], sizes: list[int], m: dict, a: argparse.Namespace) -> str:
    by = {(r["n"], r["step"]): r for r in rows}
    first = f"python benchmarks/bench_rerank.py --sizes 10000,30000 --kr-sizes 10000,20000,30000 --backend {a.backend}"
    commands = list(dict.fromkeys(r.get("command", first) for r in rows))
    lines = [
        "## Re-ranking post-processors: time and peak memory",
        "",
        "Commands: " + "; ".join(f"`{c}`" for c in commands) + "  ",
        f"Machine: {machine_line(m)}  ",
        f"GPU: {NO_GPU}.",
        "",
        f"N queries and N gallery items (clustered unit vectors, D={D}); first stage `search(q, g, {K_FIRST})` built",
        "before the clock starts. Defaults: qe/dba k=2 α=3, kr k1=20 k2=6 λ=0.3 row_max, vote max/top 5; exact",
        f"search inside (backend={a.backend}). One fresh subprocess per cell; extra = peak RSS minus the peak after",
        "inputs + first stage.",
        "Time is quadratic in N by construction: each post-processor runs an exact search inside (qe: the Q queries",
        "against the N gallery items, dba: N x N, kr: one pass over the upper triangle of the (Q+N) x (Q+N)",
        "similarities), so 10x the items is ~100x the similarity work; memory is not (chunked searches, sparse kr).",
        "Shared noisy 2-core VM: absolute seconds drift 10-20% (and more under other engineers' load).",
        "",
        "| N | " + " | ".join(f"{s} s | {s} extra MiB" for s in STEPS) + " |",
        "|---|" + "---|---|" * len(STEPS),
    ]
    for n in [n for n in sizes if any((n, s) in by for s in STEPS)]:
        cells = []
        for s in STEPS:
            r = by.get((n, s), {"error": "not run"})
            cells += [r["error"][:40], ""] if "error" in r else [f"{r['seconds']:.2f}", f"{r['extra_mib']:.0f}"]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "k-reciprocal memory against |U| = Q + N (dense |U|x|U| float32 shown for scale; never allocated):",
        "",
        "| N | \\|U\\| | seconds | extra MiB | bytes per \\|U\\|·(k1+1) | dense \\|U\\|² float32 MiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted((r for r in rows if r["step"] == "kr" and "error" not in r), key=lambda r: r["n"]):
        lines.append(
            f"| {r['n']} | {r['union_items']} | {r['seconds']:.1f} | {r['extra_mib']:.0f} | "
            f"{r['extra_bytes_per_union_item_k1']:.0f} | {r['dense_union_matrix_mib']:.0f} |"
        )
    parts = sorted({r["n"] for r in rows if r["step"] in PARTS and "error" not in r})
    if parts:
        lines += [
            "",
            "Where k-reciprocal's time goes (`--steps kr,kr_knn,kr_gemm`, same run): its k-NN pass alone, and the",
            "GEMM of that pass alone (the same tiles, nothing else: the floor of an exact float32 pass over each pair",
            "once):",
            "",
            "| N | \\|U\\| | kr s | k-NN pass s | its GEMM s (GFLOP/s) | set algebra, Jaccard s (kr - k-NN pass) |",
            "|---|---|---|---|---|---|",
        ]
        for n in parts:
            kr_s, knn_s, gemm = (by.get((n, s), {}).get("seconds", float("nan")) for s in ("kr", "kr_knn", "kr_gemm"))
            rate = by.get((n, "kr_gemm"), {}).get("gflops_per_s", float("nan"))
            lines.append(f"| {n} | {2 * n} | {kr_s:.1f} | {knn_s:.1f} | {gemm:.1f} ({rate:.0f}) | {kr_s - knn_s:.1f} |")
    baselines = sorted((r for r in rows if r["step"].startswith("kr@")), key=lambda r: (r["step"], r["n"]))
    if baselines:
        lines += [
            "",
            "k-reciprocal against an earlier commit's code (same run; each baseline cell just before the current one):",
            "",
            "| N | commit | its s | its extra MiB | now s | now extra MiB | speed-up | same ranking | max score diff |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for b in baselines:
            r = by.get((b["n"], "kr"), {"error": "not run"})
            if "error" in b or "error" in r:
                lines.append(f"| {b['n']} | {b['step'][3:]} | {(b.get('error') or r.get('error'))[:40]} |||||||")
                continue
            lines.append(
                f"| {b['n']} | {b['step'][3:]} | {b['seconds']:.1f} | {b['extra_mib']:.0f} | {r['seconds']:.1f} | "
                f"{r['extra_mib']:.0f} | {b['seconds'] / r['seconds']:.1f}x | "
                f"{r.get('same_idx_fraction', float('nan')):.4f} | {r.get('max_abs_score_diff', float('nan')):.1e} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
