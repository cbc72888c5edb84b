"""Class-sharded margin head (Partial FC): memory per rank for 100k and 1M classes at 512-d, and step time.

Per rank r of w, ``arcfold.models.partial_fc.ShardedMarginHead`` holds C_r = ceil(C / w) class centres and, for a
per-rank batch B, the logits of the global batch N = w B against its classes. Formulas (fp32, 4 bytes):

* state = weights + gradients + AdamW ``exp_avg`` + ``exp_avg_sq`` = 4 x C_r x D x 4 bytes;
* one logits block = N x C_r x 4 bytes = B x C x 4 bytes (about the same for every w: sharding the classes
  does not shrink the logits, since every rank sees the whole global batch).

Measured (where the formula total fits in ``--max-gib``), each cell in a fresh subprocess with
``MALLOC_MMAP_THRESHOLD_`` fixed so that freed blocks go back to the OS: rank 0's shard of a w-rank head is built
in one process (``ShardedMarginHead(rank=0, world_size=w)``); its gradient and AdamW state are allocated by an
optimiser step (state = resident-set growth over the inputs); then one forward + backward on a real gathered
batch (N, 512) with random labels over all C classes (``shard_logits`` + ``distributed_cross_entropy``, the
forward's computation without the collectives, whose buffers are only (N, 512)); the activation peak is
``ru_maxrss`` minus the resident set before that step. A few cells are measured again with class sampling
(``sample_rate=0.1``).

Time: one forward + backward of rank 0's share of the work (simulated as above, no communication) against the
unsharded ``ArcFaceHead`` on the same global batch, and a real 2-process gloo run of the sharded head (with its
collectives) against the single process. Run from the project root::

    OMP_NUM_THREADS=1 python benchmarks/bench_partial_fc.py [--max-gib 8] [--time-classes 100000]

Writes ``benchmarks/results/partial_fc.json`` and its section (``bench_partial_fc``) of ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bench_common import (  # noqa: E402
    NO_GPU,
    RESULTS,
    cuda_available,
    machine,
    machine_line,
    peak_rss_mib,
    run_worker,
    write_results,
)

NAME = "bench_partial_fc"
JSON_NAME = "partial_fc"  # results file name asked for by issue 8's benchmark (write_results names it after NAME)
D = 512
CLASSES = (100_000, 1_000_000)
WORLD_SIZES = (1, 2, 4, 8)
BATCHES = (64, 128)
SAMPLED_CELLS = [(100_000, 8, 128, 0.1), (1_000_000, 8, 128, 0.1), (1_000_000, 4, 128, 0.1)]  # C, w, B, sample_rate
MIB = 2**20
# activation peak of a forward + backward ~ c + a x weights + b x logits block; a first fit on this machine, used
# only to decide which cells fit in --max-gib (the reported fit is redone from the measured cells)
PRIOR_FIT = {"const_mib": 128.0, "weight_copies": 4.5, "logits_blocks": 1.1}


def formula(n_classes: int, world_size: int, batch: int) -> dict:
    rows = math.ceil(n_classes / world_size)  # C_r of rank 0, the largest shard
    weights = rows * D * 4 / MIB
    block = world_size * batch * rows * 4 / MIB
    return {"rows": rows, "weights_mib": weights, "state_mib": 4 * weights, "logits_block_mib": block}


def _activation_mib(row: dict, fit: dict) -> float:
    return fit["const_mib"] + fit["weight_copies"] * row["weights_mib"] + fit["logits_blocks"] * row["logits_block_mib"]


def fit_activations(rows: list[dict]) -> dict:
    """Least-squares fit of the measured activation peaks: ``c + a x weights + b x logits block`` (MiB)."""
    import numpy as np

    done = [r for r in rows if "error" not in r["measured"]]
    if len(done) < 3:
        return PRIOR_FIT | {"fitted_on": 0}
    design = np.array([[1.0, r["weights_mib"], r["logits_block_mib"]] for r in done])
    target = np.array([r["measured"]["activation_peak_mib"] for r in done])
    (c, a, b), *_ = np.linalg.lstsq(design, target, rcond=None)
    worst = float(np.abs(design @ np.array([c, a, b]) - target).max())
    return {"const_mib": c, "weight_copies": a, "logits_blocks": b, "fitted_on": len(done), "max_residual_mib": worst}


def _measured(res: dict) -> dict:
    keys = ("state_mib", "activation_peak_mib", "fwd_bwd_seconds", "base_mib", "peak_mib", "n_sampled", "error")
    return {k: res[k] for k in keys if k in res}


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


# ----------------------------------------------------------------------------------------------------------------------
# workers (fresh processes)


def _step(head, n_rows: int) -> None:
    """One forward + backward + AdamW step of a small head (a warm-up)."""
    import torch

    from arcfold.models.partial_fc import distributed_cross_entropy

    x, labels = torch.randn(n_rows, D, requires_grad=True), torch.randint(0, head.n_classes, (n_rows,))
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
    distributed_cross_entropy(head.shard_logits(x, labels), head.local_labels(labels)).backward()
    optimizer.step()


def memory_worker(args: dict) -> dict:
    import torch

    from arcfold.models.partial_fc import ShardedMarginHead, distributed_cross_entropy

    torch.manual_seed(0)
    _step(ShardedMarginHead("arcface", D, 1000, 30.0, 0.5, rank=0, world_size=2), 64)  # pages in torch's kernels
    n_classes, world_size, batch = args["n_classes"], args["world_size"], args["batch"]
    x = torch.randn(world_size * batch, D, requires_grad=True)  # (N, D) the gathered global batch
    labels = torch.randint(0, n_classes, (world_size * batch,))  # (N,) over all classes: most live on other ranks
    base = current_rss_mib()
    sample_rate = args.get("sample_rate", 1.0)
    head = ShardedMarginHead("arcface", D, n_classes, 30.0, 0.5, rank=0, world_size=world_size, sample_rate=sample_rate)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
    head.weight.grad = torch.zeros_like(head.weight)
    optimizer.step()  # allocates exp_avg, exp_avg_sq
    optimizer.zero_grad(set_to_none=False)  # backward then accumulates into the allocated gradient
    state = current_rss_mib()
    t0 = time.perf_counter()
    columns = head.sample_columns(labels)  # None (all) or (S_r,) kept columns
    logits = head.shard_logits(x, labels, columns)  # (N, C_r) or (N, S_r)
    loss = distributed_cross_entropy(logits, head.local_labels(labels, columns))
    loss.backward()
    seconds = time.perf_counter() - t0
    del logits, loss
    optimizer.step()
    peak = peak_rss_mib()
    return {
        **args,
        "n_sampled": head.stop - head.start if columns is None else len(columns),
        "state_mib": state - base,
        "activation_peak_mib": peak - state,
        "fwd_bwd_seconds": seconds,
        "base_mib": base,
        "peak_mib": peak,
    }


def time_worker(args: dict) -> dict:
    """Median seconds of one forward + backward: rank 0's simulated share (sharded) or the unsharded head."""
    import torch

    from arcfold.models.heads import ArcFaceHead
    from arcfold.models.partial_fc import ShardedMarginHead, distributed_cross_entropy

    torch.manual_seed(0)
    n_classes, world_size, batch = args["n_classes"], args["world_size"], args["batch"]
    x = torch.randn(world_size * batch, D, requires_grad=True)
    labels = torch.randint(0, n_classes, (world_size * batch,))
    if args["mode"] == "unsharded":
        head = ArcFaceHead(D, n_classes, scale=30.0, margin=0.5)

        def step():
            head(x, labels).backward()
    else:
        head = ShardedMarginHead("arcface", D, n_classes, 30.0, 0.5, rank=0, world_size=world_size)

        def step():
            distributed_cross_entropy(head.shard_logits(x, labels), head.local_labels(labels)).backward()

    times = []
    for _ in range(args["repeats"] + 1):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {**args, "seconds": statistics.median(times[1:])}


def _gloo_rank(rank: int, world_size: int, port: int, args: dict, out: str) -> None:
    import torch
    import torch.distributed as dist

    from arcfold.models.partial_fc import ShardedMarginHead

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        torch.manual_seed(rank)
        x = torch.randn(args["batch"], D, requires_grad=True)
        labels = torch.randint(0, args["n_classes"], (args["batch"],))
        head = ShardedMarginHead("arcface", D, args["n_classes"], 30.0, 0.5, rank=rank, world_size=world_size)
        times = []
        for _ in range(args["repeats"] + 1):
            dist.barrier()
            t0 = time.perf_counter()
            head(x, labels).backward()
            times.append(time.perf_counter() - t0)
        if rank == 0:
            Path(out).write_text(json.dumps({"seconds": statistics.median(times[1:])}))
    finally:
        dist.destroy_process_group()


def gloo_worker(args: dict) -> dict:
    """A real ``world_size``-process gloo run of the sharded head (collectives included)."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(tempfile.mkdtemp(), "gloo.json")
    mp.start_processes(_gloo_rank, args=(args["world_size"], port, args, out), nprocs=args["world_size"])
    return {**args, **json.loads(Path(out).read_text())}


WORKERS = {"memory": memory_worker, "time": time_worker, "gloo": gloo_worker}


# ----------------------------------------------------------------------------------------------------------------------
# driver


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-gib", type=float, default=8.0, help="measure only cells whose formula total fits")
    p.add_argument("--time-classes", type=int, default=100_000, help="classes of the timing rows")
    p.add_argument("--time-batch", type=int, default=64, help="per-rank batch of the timing rows")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        args = json.loads(a.worker)
        print(json.dumps(WORKERS[args.pop("kind")](args)))
        return

    cuda_available(NAME)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)  # blocks >= 1 MiB are mmapped: freed ones leave the RSS

    rows = []
    for n_classes in CLASSES:
        for world_size in WORLD_SIZES:
            for batch in BATCHES:
                row = {
                    "n_classes": n_classes,
                    "world_size": world_size,
                    "batch": batch,
                    **formula(n_classes, world_size, batch),
                }
                total_gib = (row["state_mib"] + _activation_mib(row, PRIOR_FIT)) / 1024
                if total_gib <= a.max_gib:
                    args = {"kind": "memory", "n_classes": n_classes, "world_size": world_size, "batch": batch}
                    res = run_worker(__file__, args, timeout=a.timeout)
                    row["measured"] = _measured(res)
                else:
                    row["measured"] = {
                        "error": f"not measured: predicted {total_gib:.1f} GiB > --max-gib {a.max_gib:g}"
                    }
                print(json.dumps(row), flush=True)
                rows.append(row)

    sampled = []  # class sampling (Partial FC's sample_rate) on the largest measured shards
    for n_classes, world_size, batch, rate in SAMPLED_CELLS:
        row = {"n_classes": n_classes, "world_size": world_size, "batch": batch, "sample_rate": rate}
        row |= formula(n_classes, world_size, batch)
        args = {"kind": "memory", "n_classes": n_classes, "world_size": world_size, "batch": batch, "sample_rate": rate}
        row["measured"] = _measured(run_worker(__file__, args, timeout=a.timeout))
        print(json.dumps(row), flush=True)
        sampled.append(row)

    timing = []
    for world_size in WORLD_SIZES:
        for mode in ("sharded", "unsharded"):
            args = {
                "kind": "time",
                "mode": mode,
                "n_classes": a.time_classes,
                "world_size": world_size,
                "batch": a.time_batch,
                "repeats": a.repeats,
            }
            res = run_worker(__file__, args, timeout=a.timeout)
            res.pop("kind", None)
            print(json.dumps(res), flush=True)
            timing.append(res)
    gloo_args = {"kind": "gloo", "n_classes": a.time_classes, "world_size": 2, "batch": a.time_batch}
    gloo = run_worker(__file__, {**gloo_args, "repeats": a.repeats}, timeout=a.timeout)
    gloo.pop("kind", None)
    print(json.dumps(gloo), flush=True)

    fit = fit_activations(rows)
    for row in rows:
        row["predicted_total_mib"] = row["state_mib"] + _activation_mib(row, fit)
    m = machine()
    payload = {
        "machine": m,
        "embedding_size": D,
        "activation_fit": fit,
        "rows": rows,
        "sampled_rows": sampled,
        "timing": timing,
        "gloo_2_processes": gloo,
    }
    write_results(NAME, payload, markdown(rows, sampled, fit, timing, gloo, m, a))
    os.replace(RESULTS / f"{NAME}.json", RESULTS / f"{JSON_NAME}.json")


def _mib(x: float) -> str:
    return f"{x / 1024:.2f} GiB" if x >= 1024 else f"{x:.0f} MiB"


def markdown(
    rows: list[dict], sampled: list[dict], fit: dict, timing: list[dict], gloo: dict, m: dict, a: argparse.Namespace
) -> str:
    lines = [
        "## Partial FC: memory per rank of the class-sharded margin head",
        "",
        f"Command: `OMP_NUM_THREADS=1 python benchmarks/bench_partial_fc.py --max-gib {a.max_gib:g} "
        f"--time-classes {a.time_classes} --time-batch {a.time_batch}`  ",
        f"Machine: {machine_line(m)}  ",
        f"GPU: {NO_GPU}.",
        "",
        f"`ShardedMarginHead` (arcface, D={D}, fp32), rank 0 of w (the largest shard, C_r = ceil(C / w) classes); "
        "B = per-rank batch; the logits cover the global batch N = w B.",
        "Formulas: state = weights + gradients + AdamW's two moments = 4 C_r D x 4 bytes; one logits block = "
        "N C_r x 4 bytes = B C x 4 bytes, the same for every w (every rank sees the whole global batch).",
        "Measured in one fresh process per cell (rank 0's shard simulated in one process; the collectives only move "
        "(N, 512) embeddings): state = RSS growth from building the head and one AdamW step; activations = peak RSS "
        "of one forward + backward above the resident set before it.",
        f"Activation peaks fitted over the {fit['fitted_on']} measured cells: "
        f"{fit['const_mib']:.0f} MiB + {fit['weight_copies']:.2f} x weights + {fit['logits_blocks']:.2f} x logits "
        f"block (largest residual {fit.get('max_residual_mib', float('nan')):.0f} MiB): the temporaries of "
        "`F.normalize(weight)` and its backward (weight-sized) dominate, not the logits, unless w B > D.",
        f"Cells whose predicted total exceeds {a.max_gib:g} GiB are not measured on this 24 GiB machine.",
        "",
        "| classes | w | B | weights / rank | state / rank (formula) | state (measured) | logits block | "
        "fwd+bwd activations (measured) | total / rank (measured) | total / rank (fit) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        meas = r["measured"]
        if "error" in meas:
            state_m, act_m, total_m = "not measured", "", ""
        else:
            state_m, act_m = _mib(meas["state_mib"]), _mib(meas["activation_peak_mib"])
            total_m = _mib(meas["state_mib"] + meas["activation_peak_mib"])
        lines.append(
            f"| {r['n_classes']:,} | {r['world_size']} | {r['batch']} | {_mib(r['weights_mib'])} | "
            f"{_mib(r['state_mib'])} | {state_m} | {_mib(r['logits_block_mib'])} | {act_m} | {total_m} | "
            f"{_mib(r['predicted_total_mib'])} |"
        )
    lines += [
        "",
        "With class sampling (`sample_rate=0.1`, training mode: each rank keeps its positives + random others, "
        "10% of its classes; the state is unchanged, the logits and the weight temporaries shrink):",
        "",
        "| classes | w | B | sample_rate | kept classes / rank | state (measured) | logits block, unsampled | "
        "fwd+bwd activations (measured) | total / rank (measured) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sampled:
        meas = r["measured"]
        if "error" in meas:
            lines.append(
                f"| {r['n_classes']:,} | {r['world_size']} | {r['batch']} | {r['sample_rate']} | "
                f"{meas['error'][:60]} | | | | |"
            )
            continue
        lines.append(
            f"| {r['n_classes']:,} | {r['world_size']} | {r['batch']} | {r['sample_rate']} | {meas['n_sampled']:,} | "
            f"{_mib(meas['state_mib'])} | {_mib(r['logits_block_mib'])} | {_mib(meas['activation_peak_mib'])} | "
            f"{_mib(meas['state_mib'] + meas['activation_peak_mib'])} |"
        )
    by = {(t.get("world_size"), t.get("mode")): t for t in timing}
    lines += [
        "",
        f"Time of one forward + backward, C = {a.time_classes:,}, B = {a.time_batch} per rank (median of "
        f"{a.repeats} after a warm-up, 1 thread): rank 0's share of the sharded head (no communication) against "
        "the unsharded `ArcFaceHead` on the same global batch N = w B in one process:",
        "",
        "| w | N | sharded, per rank s | unsharded s | ratio |",
        "|---|---|---|---|---|",
    ]
    for w in WORLD_SIZES:
        s, u = by.get((w, "sharded"), {}), by.get((w, "unsharded"), {})
        if "seconds" in s and "seconds" in u:
            lines.append(
                f"| {w} | {w * a.time_batch} | {s['seconds']:.3f} | {u['seconds']:.3f} | "
                f"{u['seconds'] / s['seconds']:.1f} |"
            )
        else:
            lines.append(f"| {w} | {w * a.time_batch} | {s.get('error', '')[:40]} | {u.get('error', '')[:40]} | |")
    if "seconds" in gloo:
        unsharded2 = by.get((2, "unsharded"), {}).get("seconds")
        lines += [
            "",
            f"Real 2-process gloo run (both processes on this 2-core machine, collectives included): "
            f"{gloo['seconds']:.3f} s per step and rank, against {unsharded2:.3f} s for the unsharded head on the "
            f"same global batch of {2 * a.time_batch}.",
        ]
    else:
        lines += ["", f"2-process gloo run failed: {gloo.get('error', '')[:200]}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
