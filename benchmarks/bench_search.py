"""Neighbour search: time per 1k queries of faiss exact / IVF / HNSW (``arcfold.retrieval.search`` defaults) and torch.

Gallery: ``N`` L2-normalised clustered float32 vectors at D=128 (``_bench_common.clustered_embeddings``); queries:
1000 further vectors drawn around the same class centres (so they have true neighbours in the gallery), k=10.

* faiss exact / ivf / hnsw: ``arcfold.retrieval.search.build_index`` with search.py's defaults (IVF:
  ``nlist = 4 sqrt(N)`` capped so each list has >= 39 points, ``nprobe = nlist / 4`` (``default_nprobe``; 16
  before), trained on <= 256 points per list; HNSW: ``M=32``, ``efSearch=128``). Build time is reported
  separately; the search time is ``index.search`` of the 1000 queries.
* torch: ``arcfold.retrieval.search.search(..., backend="torch")`` (exact chunked matmul + top-k with the exact
  tie rule).
* recall@10 vs exact: mean over queries of |approx top-10 ∩ faiss exact top-10| / 10 (target >= 0.95).

Search methods alternate within each of ``--rounds`` rounds, and the median is reported, so machine drift (shared
2-core VM) hits them alike. HNSW is skipped at a size whose build is projected (from the previous size, x N ratio x
1.2) to exceed ``--max-build`` seconds; the projection is recorded. Run from the project root::

    python benchmarks/bench_search.py [--sizes 10000,100000,1000000] [--rounds 3] [--keep-previous]

``--keep-previous`` keeps the rows of other sizes from the last ``benchmarks/results/bench_search.json`` (their
command is listed too), so one size can be re-measured alone.

Writes ``benchmarks/results/bench_search.json`` and its section of ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bench_common import (  # noqa: E402
    NO_GPU,
    RESULTS,
    clustered_embeddings,
    cuda_available,
    machine,
    machine_line,
    write_results,
)

NAME = "bench_search"
N_QUERIES = 1000
K = 10
D = 128
NPROBE_SWEEP = (16, 32, 64, 128, 256)
EF_SWEEP = (128, 256, 512)


def recall_vs_exact(approx: np.ndarray, exact: np.ndarray) -> float:
    hits = [len(np.intersect1d(a, e)) for a, e in zip(approx, exact, strict=True)]
    return float(np.mean(hits)) / exact.shape[1]


def bench_size(
    n: int, rounds: int, hnsw_projection: float | None, max_build: float, noise: float, approx_max_n: int
) -> dict:
    from arcfold.retrieval.search import build_index, default_nlist, default_nprobe, search

    x, _ = clustered_embeddings(n + N_QUERIES, D, seed=1, noise=noise)
    gallery, queries = x[:n], x[n:]  # (N, D), (1000, D)
    row: dict = {"n_gallery": n, "d": D, "noise": noise, "n_queries": N_QUERIES, "k": K, "nlist": default_nlist(n)}
    row["nprobe"] = default_nprobe(row["nlist"])

    indexes, build_s = {}, {}
    for kind in ("exact", "ivf", "hnsw"):
        if kind != "exact" and n > approx_max_n:
            row[f"{kind}_skipped"] = f"N > --approx-max-n {approx_max_n}"
            continue
        if kind == "hnsw" and hnsw_projection is not None and hnsw_projection > max_build:
            row["hnsw_skipped"] = f"projected build {hnsw_projection:.0f} s > --max-build {max_build:.0f} s"
            print(f"[{NAME}] N={n}: skipping hnsw, {row['hnsw_skipped']}", flush=True)
            continue
        t0 = time.perf_counter()
        indexes[kind] = build_index(gallery, index=kind)
        build_s[kind] = time.perf_counter() - t0
        print(f"[{NAME}] N={n}: built {kind} in {build_s[kind]:.1f} s", flush=True)
    row["build_seconds"] = build_s

    def run(kind: str) -> tuple[float, np.ndarray]:
        t0 = time.perf_counter()
        if kind == "torch":
            _, idx = search(queries, gallery, K, backend="torch", device="cpu")
        else:
            _, idx = indexes[kind].search(queries, K)
        return time.perf_counter() - t0, idx

    methods = [*indexes, "torch"]
    times: dict[str, list[float]] = {m: [] for m in methods}
    results: dict[str, np.ndarray] = {}
    for r in range(rounds):
        for m in methods if r % 2 == 0 else methods[::-1]:
            seconds, idx = run(m)
            times[m].append(seconds)
            results[m] = idx
    row["seconds_per_1k_queries"] = {m: float(np.median(t)) * 1000 / N_QUERIES for m, t in times.items()}
    row["all_seconds"] = times
    row["recall@10_vs_exact"] = {m: recall_vs_exact(results[m], results["exact"]) for m in methods}

    # Settings sweep (one timing each): which nprobe / efSearch would reach recall@10 >= 0.95 on this data.
    sweep: dict[str, dict[int, dict[str, float]]] = {"ivf_nprobe": {}, "hnsw_ef_search": {}}
    for nprobe in NPROBE_SWEEP if "ivf" in indexes else ():
        indexes["ivf"].nprobe = min(nprobe, indexes["ivf"].nlist)
        seconds, idx = run("ivf")
        sweep["ivf_nprobe"][nprobe] = {"recall@10": recall_vs_exact(idx, results["exact"]), "s_per_1k": seconds}
    if "hnsw" in indexes:
        for ef in EF_SWEEP:
            indexes["hnsw"].hnsw.efSearch = ef
            seconds, idx = run("hnsw")
            sweep["hnsw_ef_search"][ef] = {"recall@10": recall_vs_exact(idx, results["exact"]), "s_per_1k": seconds}
    row["sweep"] = sweep
    print(f"[{NAME}] N={n}: {row['seconds_per_1k_queries']} recall {row['recall@10_vs_exact']}", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-build", type=float, default=300.0, help="skip HNSW where its build is projected longer")
    p.add_argument(
        "--approx-max-n",
        type=int,
        default=10**9,
        help="skip IVF and HNSW above this gallery size (their builds take many minutes on 2 cores at 1M)",
    )
    p.add_argument("--keep-previous", action="store_true", help="keep other sizes' rows from the last results")
    p.add_argument(
        "--noise",
        type=float,
        default=0.8,
        help="noise norm around each unit class centre (0.8: same-class cosine ~0.6, like trained embeddings; "
        "1.6: ~0.3, near-isotropic, the hard case for IVF)",
    )
    a = p.parse_args()

    cuda_available(NAME)
    import faiss

    gpu_note = "" if hasattr(faiss, "StandardGpuResources") else " (and this faiss build has no GPU support)"
    rows, projection = [], None
    for n in [int(s) for s in a.sizes.split(",")]:
        if rows and "hnsw" in rows[-1]["build_seconds"]:
            projection = rows[-1]["build_seconds"]["hnsw"] * n / rows[-1]["n_gallery"] * 1.2
        rows.append(bench_size(n, a.rounds, projection, a.max_build, a.noise, a.approx_max_n))
    m = machine()
    command = (
        f"python benchmarks/bench_search.py --sizes {a.sizes} --rounds {a.rounds} --max-build {a.max_build:g} "
        f"--noise {a.noise:g} --approx-max-n {a.approx_max_n}" + (" --keep-previous" if a.keep_previous else "")
    )
    for row in rows:
        row["command"] = command
    previous = RESULTS / f"{NAME}.json"
    if a.keep_previous and previous.exists():
        old = json.loads(previous.read_text())
        done = {row["n_gallery"] for row in rows}
        rows = sorted([r for r in old["sizes"] if r["n_gallery"] not in done] + rows, key=lambda r: r["n_gallery"])
    payload = {"machine": m, "gpu_note": NO_GPU + gpu_note, "sizes": rows}
    write_results(NAME, payload, markdown(rows, m, a, gpu_note))


def markdown(rows: list[dict], m: dict, a: argparse.Namespace, gpu_note: str) -> str:
    # rows written before the command was recorded per row came from the first full run
    first = "python benchmarks/bench_search.py --sizes 10000,100000,1000000 --rounds 3 --max-build 300 --noise 0.8"
    commands: dict[str, list[int]] = {}
    for row in rows:
        commands.setdefault(row.get("command", first + " --approx-max-n 100000"), []).append(row["n_gallery"])
    lines = [
        "## Neighbour search: seconds per 1k queries (k=10, D=128)",
        "",
        "Commands: " + "; ".join(f"`{c}` (N = {', '.join(map(str, ns))})" for c, ns in commands.items()) + "  ",
        f"Machine: {machine_line(m)}  ",
        f"GPU: {NO_GPU}{gpu_note}; faiss-gpu rows skipped.",
        "",
        f"Clustered unit vectors (noise norm {a.noise:g} around unit class centres), 1000 queries drawn around the",
        "gallery's class centres. faiss indexes built by",
        "`arcfold.retrieval.search.build_index` at search.py's defaults (IVF-Flat `nlist=4*sqrt(N)`, `nprobe=nlist/4`",
        "(column nprobe; rows without it ran at the former default 16); HNSW-Flat",
        "`M=32`, `efSearch=128`); build time separate. torch = `search(backend='torch')`, exact. Median of alternating",
        f"rounds ({a.rounds}) in one process; shared noisy VM, compare within a row. Recall@10 is against faiss exact.",
        "",
        "| gallery N | nlist | nprobe | exact s/1k q | IVF s/1k q | HNSW s/1k q | torch s/1k q | IVF build s |"
        " HNSW build s | IVF recall@10 | HNSW recall@10 | torch recall@10 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        t, b, rc = row["seconds_per_1k_queries"], row["build_seconds"], row["recall@10_vs_exact"]
        ivf_t = f"{t['ivf']:.4f}" if "ivf" in t else "skipped"
        ivf_b = f"{b['ivf']:.1f}" if "ivf" in b else row.get("ivf_skipped", "")
        ivf_r = f"{rc['ivf']:.4f}" if "ivf" in rc else "-"
        hnsw_t = f"{t['hnsw']:.4f}" if "hnsw" in t else "skipped"
        hnsw_b = f"{b['hnsw']:.1f}" if "hnsw" in b else row.get("hnsw_skipped", "")
        hnsw_r = f"{rc['hnsw']:.4f}" if "hnsw" in rc else "-"
        lines.append(
            f"| {row['n_gallery']} | {row['nlist']} | {row.get('nprobe', 16)} | {t['exact']:.4f} | {ivf_t} | {hnsw_t} "
            f"| {t['torch']:.4f} "
            f"| {ivf_b} | {hnsw_b} | {ivf_r} | {hnsw_r} | {rc['torch']:.4f} |"
        )
    lines += [
        "",
        "Settings sweep (one timing each, same indexes): recall@10 vs exact (seconds per 1k queries).",
        "",
        "| gallery N | "
        + " | ".join(f"IVF nprobe={p}" for p in NPROBE_SWEEP)
        + " | "
        + " | ".join(f"HNSW ef={e}" for e in EF_SWEEP)
        + " |",
        "|---|" + "---|" * (len(NPROBE_SWEEP) + len(EF_SWEEP)),
    ]
    for row in rows:
        sw = row["sweep"]
        cells = [
            f"{sw['ivf_nprobe'][p]['recall@10']:.3f} ({sw['ivf_nprobe'][p]['s_per_1k']:.3f})"
            if p in sw["ivf_nprobe"]
            else "skipped"
            for p in NPROBE_SWEEP
        ]
        cells += [
            f"{sw['hnsw_ef_search'][e]['recall@10']:.3f} ({sw['hnsw_ef_search'][e]['s_per_1k']:.3f})"
            if e in sw["hnsw_ef_search"]
            else "skipped"
            for e in EF_SWEEP
        ]
        lines.append(f"| {row['n_gallery']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
