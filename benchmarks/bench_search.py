"""Neighbour search: time per 1k queries of faiss exact / IVF / HNSW / IVF-PQ (``arcfold.retrieval.search``) and torch.

Gallery: ``N`` L2-normalised clustered float32 vectors at D=128 (``_bench_common.clustered_embeddings``); queries:
1000 further vectors drawn around the same class centres (so they have true neighbours in the gallery), k=10.

* faiss exact / ivf / hnsw / ivfpq: ``arcfold.retrieval.search.build_index`` with search.py's defaults (IVF:
  ``nlist = 4 sqrt(N)`` capped so each list has >= 39 points, trained on <= 256 points per list; HNSW: ``M=32``;
  IVF-PQ: the same lists holding 4-bit fast-scan PQ codes of 2 dimensions each, re-scored exactly),
  each approximate index built once, with its knob chosen for ``target_recall=0.95`` (``--target-recall``) on
  held-out gallery rows (``arcfold.retrieval.index_tuning``; build time includes that sweep, whose own seconds are
  reported too). Searched at that knob (``ivf_target``, ``hnsw_target``, ``ivfpq_target``) and at the former fixed
  defaults (``target_recall=None``: ``nprobe = nlist / 4``, ``efSearch=128``; ``ivf``, ``hnsw``), same index. The search
  time is ``index.search`` of the 1000 queries.
* torch: ``arcfold.retrieval.search.search(..., backend="torch")`` (exact chunked matmul + top-k with the exact
  tie rule).
* recall@10 vs exact: mean over queries of |approx top-10 ∩ faiss exact top-10| / 10 (target >= 0.95), with its
  standard error over the 1000 queries (``recall_se``).

Search methods alternate within each of ``--rounds`` rounds, and the median is reported, so machine drift (shared
2-core VM) hits them alike. HNSW is skipped at a size whose build is projected (from the previous size, x N ratio x
1.2) to exceed ``--max-build`` seconds; the projection is recorded. Run from the project root::

    python benchmarks/bench_search.py [--sizes 10000,100000,1000000] [--rounds 3] [--target-recall 0.95] \\
        [--keep-previous]

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


def per_query_recall(approx: np.ndarray, exact: np.ndarray) -> np.ndarray:
    return (exact[:, :, None] == approx[:, None, :]).any(axis=2).mean(axis=1)  # (Q,)


def recall_vs_exact(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(per_query_recall(approx, exact).mean())


def bench_size(
    n: int,
    rounds: int,
    hnsw_projection: float | None,
    max_build: float,
    noise: float,
    approx_max_n: int,
    target_recall: float,
) -> dict:
    from arcfold.retrieval.index_tuning import set_knob
    from arcfold.retrieval.search import build_index, default_nprobe, search

    x, _ = clustered_embeddings(n + N_QUERIES, D, seed=1, noise=noise)
    gallery, queries = x[:n], x[n:]  # (N, D), (1000, D)
    row: dict = {"n_gallery": n, "d": D, "noise": noise, "n_queries": N_QUERIES, "k": K, "target_recall": target_recall}

    indexes, build_s, knobs = {}, {}, {}
    for kind in ("exact", "ivf", "hnsw", "ivfpq"):
        if kind != "exact" and n > approx_max_n:
            row[f"{kind}_skipped"] = f"N > --approx-max-n {approx_max_n}"
            continue
        if kind == "hnsw" and hnsw_projection is not None and hnsw_projection > max_build:
            row["hnsw_skipped"] = f"projected build {hnsw_projection:.0f} s > --max-build {max_build:.0f} s"
            print(f"[{NAME}] N={n}: skipping hnsw, {row['hnsw_skipped']}", flush=True)
            continue
        report: list[dict] = []
        t0 = time.perf_counter()
        indexes[kind] = build_index(gallery, index=kind, target_recall=target_recall, k=K, report=report)
        build_s[kind] = time.perf_counter() - t0
        if report:
            row[f"{kind}_tuning"] = report[0]
            knobs[f"{kind}_target"] = (kind, report[0]["value"])
        print(f"[{NAME}] N={n}: built {kind} in {build_s[kind]:.1f} s {report}", flush=True)
    row["build_seconds"] = build_s
    if "ivf" in indexes:
        row["nlist"] = indexes["ivf"].nlist
        row["nprobe"] = default_nprobe(row["nlist"])
        knobs["ivf"] = ("ivf", row["nprobe"])
    if "hnsw" in indexes:
        knobs["hnsw"] = ("hnsw", 128)
    if "ivfpq" in indexes:
        import faiss

        row["ivfpq_nlist"] = faiss.extract_index_ivf(indexes["ivfpq"]).nlist

    def run(method: str) -> tuple[float, np.ndarray]:
        kind = knobs[method][0] if method in knobs else method
        if method in knobs:
            set_knob(indexes[kind], kind, knobs[method][1])  # the same index at another knob value
        t0 = time.perf_counter()
        if method == "torch":
            _, idx = search(queries, gallery, K, backend="torch", device="cpu")
        else:
            _, idx = indexes[kind].search(queries, K)
        return time.perf_counter() - t0, idx

    methods = ["exact", *knobs, "torch"]
    times: dict[str, list[float]] = {m: [] for m in methods}
    results: dict[str, np.ndarray] = {}
    for r in range(rounds):
        for m in methods if r % 2 == 0 else methods[::-1]:
            seconds, idx = run(m)
            times[m].append(seconds)
            results[m] = idx
    row["seconds_per_1k_queries"] = {m: float(np.median(t)) * 1000 / N_QUERIES for m, t in times.items()}
    row["all_seconds"] = times
    recalls = {m: per_query_recall(results[m], results["exact"]) for m in methods}
    row["recall@10_vs_exact"] = {m: float(r.mean()) for m, r in recalls.items()}
    row["recall_se"] = {m: float(r.std(ddof=1) / np.sqrt(len(r))) for m, r in recalls.items()}

    # Settings sweep (one timing each): which nprobe / efSearch would reach recall@10 >= 0.95 on this data.
    sweep: dict[str, dict[int, dict[str, float]]] = {"ivf_nprobe": {}, "hnsw_ef_search": {}}
    for nprobe in NPROBE_SWEEP if "ivf" in indexes else ():
        knobs["sweep"] = ("ivf", min(nprobe, indexes["ivf"].nlist))
        seconds, idx = run("sweep")
        sweep["ivf_nprobe"][nprobe] = {"recall@10": recall_vs_exact(idx, results["exact"]), "s_per_1k": seconds}
    if "hnsw" in indexes:
        for ef in EF_SWEEP:
            knobs["sweep"] = ("hnsw", ef)
            seconds, idx = run("sweep")
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
        help="skip IVF, HNSW and IVF-PQ above this gallery size (their builds take minutes on 2 cores at 1M)",
    )
    p.add_argument("--target-recall", type=float, default=0.95, help="build_index's target_recall (IVF/HNSW knob)")
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
        rows.append(bench_size(n, a.rounds, projection, a.max_build, a.noise, a.approx_max_n, a.target_recall))
    m = machine()
    command = (
        f"python benchmarks/bench_search.py --sizes {a.sizes} --rounds {a.rounds} --max-build {a.max_build:g} "
        f"--noise {a.noise:g} --approx-max-n {a.approx_max_n} --target-recall {a.target_recall:g}"
        + (" --keep-previous" if a.keep_previous else "")
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
    from arcfold.retrieval.search import IVFPQ_K_FACTOR

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
        "gallery's class centres (never in the gallery). faiss indexes built by `arcfold.retrieval.search.build_index`",
        "(IVF-Flat `nlist=4*sqrt(N)`, HNSW-Flat `M=32`, IVF-PQ: the same lists of 4-bit fast-scan codes of 2",
        f"dimensions each, the best `{IVFPQ_K_FACTOR} k` re-scored exactly), each approximate index once, its knob",
        "chosen for `target_recall` on held-out gallery rows (`arcfold.retrieval.index_tuning`; the build time",
        "includes that sweep); torch = `search(backend='torch')`, exact. Median of alternating rounds in one",
        "process; shared noisy VM, compare within a row. Recall@10 is against faiss exact on the 1000 queries",
        "(± its standard error).",
        "",
        "**`search.target_recall` (default 0.95)**: the knob chosen on the gallery, then searched with it.",
        "",
        "| gallery N | target | exact s/1k q | IVF nprobe (of nlist) | IVF s/1k q | IVF recall@10 | IVF sweep s "
        "| HNSW efSearch | HNSW s/1k q | HNSW recall@10 | HNSW sweep s | IVF-PQ nprobe (of nlist) | IVF-PQ s/1k q "
        "| IVF-PQ recall@10 | IVF-PQ sweep s | IVF build s | HNSW build s | IVF-PQ build s |",
        "|---" * 18 + "|",
    ]
    for row in (r for r in rows if "target_recall" in r):  # rows measured before target_recall had none
        t, rc, se = row["seconds_per_1k_queries"], row["recall@10_vs_exact"], row["recall_se"]
        b = row["build_seconds"]
        cells = [str(row["n_gallery"]), f"{row['target_recall']:g}"]
        cells.append(f"{t['exact']:.4f}")
        for kind in ("ivf", "hnsw", "ivfpq"):
            tuning, method = row.get(f"{kind}_tuning"), f"{kind}_target"
            if tuning is None or method not in t:
                cells += ["-", "-", "-", "-"]
                continue
            of = f" (of {row['nlist'] if kind == 'ivf' else row['ivfpq_nlist']})" if kind != "hnsw" else ""
            cells.append(f"{tuning['value']}{of}" + ("" if tuning["reached"] else " (not reached)"))
            cells.append(f"{t[method]:.4f}")
            cells.append(f"{rc[method]:.4f} ± {se[method]:.4f}")
            cells.append(f"{tuning['seconds']:.1f}")
        cells += [f"{b[k]:.1f}" if k in b else row.get(f"{k}_skipped", "-") for k in ("ivf", "hnsw", "ivfpq")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "**Former fixed defaults** (`target_recall: null`): IVF `nprobe=nlist/4` (column nprobe; rows without it ran",
        "at 16), HNSW `efSearch=128`; rows with a target column searched the same indexes as above at these knobs.",
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
            f"| {row['n_gallery']} | {row.get('nlist', '-')} | {row.get('nprobe', 16)} | {t['exact']:.4f} | {ivf_t} "
            f"| {hnsw_t} | {t['torch']:.4f} "
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
        # JSON keys are strings: rows kept from an earlier run (--keep-previous) have "16", this run's 16
        sw = {name: {int(key): v for key, v in values.items()} for name, values in row["sweep"].items()}
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
