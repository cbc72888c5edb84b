"""Shared helpers for the ``bench_*.py`` scripts: machine description, fresh-subprocess measurements, outputs.

Peak memory is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of a fresh Python process per measurement (tracemalloc
does not see torch/faiss allocations). Each worker reports the peak *after* building its inputs (``base_mib``) and
at the end (``peak_mib``); ``extra_mib = peak_mib - base_mib`` is what the measured call itself added.

Load: the 1-minute load average is taken when a benchmark starts (this module's import) and when it writes its
results; :func:`write_results` stores both in the JSON and prints them under the benchmark's section of
BENCHMARKS.md, and marks the run **busy** when other jobs held the cores (timings are inflated, and ratios favour
whichever side uses fewer threads). Where ``/proc/stat`` exists that is measured, not guessed from the load: the
CPU-seconds the whole machine spent busy (steal included) during the run, less those of the benchmark's own process
and its finished workers, per second of the run, is the cores other processes used; above ``OTHER_CORES_BUSY`` the
run is busy. A benchmark that keeps 2 cores busy itself has a load of ~2 on 2 cores and is still quiet. Without
``/proc/stat``: busy when the load at either end exceeds the core count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path("benchmarks/results")
BENCHMARKS_MD = Path("BENCHMARKS.md")
NO_GPU = "no GPU on this machine (torch.cuda.is_available() is False): CUDA rows skipped"
LOAD_AT_START = os.getloadavg()  # (1, 5, 15 min) when the benchmark script started (imported this module)
OTHER_CORES_BUSY = 0.5  # cores used by other processes on average during a run above which the run is busy


def cpu_counters() -> tuple[float, float, float] | None:
    """(machine busy CPU-seconds, steal included; this process's CPU-seconds and its waited-for workers'; a clock in
    seconds), or None where ``/proc/stat`` is missing."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]  # cpu user nice system idle iowait ...
    except OSError:
        return None
    ticks = [int(f) for f in fields]
    busy = sum(ticks) - ticks[3] - ticks[4]  # everything but idle and iowait (guest time is inside user already)
    if len(ticks) > 8:
        busy -= sum(ticks[8:10])  # guest, guest_nice: counted in user/nice too
    own = os.times()
    return (
        busy / os.sysconf("SC_CLK_TCK"),
        own.user + own.system + own.children_user + own.children_system,
        time.monotonic(),
    )


CPU_AT_START = cpu_counters()


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict[str, Any]:
    import faiss
    import torch

    cpu = "unknown"
    try:
        m = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    try:
        import pytorch_metric_learning as pml

        pml_version = pml.__version__
    except ImportError:
        pml_version = None
    return {
        "cpu": cpu,
        "cores": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "pytorch_metric_learning": pml_version,
        "cuda": torch.cuda.is_available(),
    }


def cuda_available(what: str) -> bool:
    """Whether CUDA rows can run; prints why they are skipped when they cannot."""
    import torch

    if torch.cuda.is_available():
        return True
    print(f"[{what}] skipping CUDA rows: {NO_GPU}", flush=True)
    return False


def parse_or_work(parser: argparse.ArgumentParser, worker: Any) -> argparse.Namespace | None:
    """Parse a benchmark's arguments, or (``--worker JSON``, how :func:`run_worker` starts a fresh process) run
    ``worker`` on them, print its JSON result and return None."""
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return None
    return args


def run_worker(script: str, args: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run ``python <script> --worker '<json args>'`` in a fresh process; return the JSON it prints last."""
    cmd = [sys.executable, script, "--worker", json.dumps(args)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", **args}
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}", **args}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_line(m: dict[str, Any]) -> str:
    return (
        f"{m['cpu']}, {m['cores']} threads; Python {m['python']}, torch {m['torch']}, faiss {m['faiss']}, "
        f"numpy {m['numpy']}, pytorch-metric-learning {m['pytorch_metric_learning']}; CUDA: {m['cuda']}"
    )


def other_cores(start: tuple[float, float, float] | None, end: tuple[float, float, float] | None) -> float | None:
    """Cores that processes other than this one (and its workers) used on average between two :func:`cpu_counters`."""
    if start is None or end is None or end[2] <= start[2]:
        return None
    return max(0.0, ((end[0] - start[0]) - (end[1] - start[1])) / (end[2] - start[2]))


def load_record(start: tuple[float, ...] | None = None, end: tuple[float, ...] | None = None) -> dict[str, Any]:
    """The load averages of a run (start: :data:`LOAD_AT_START`, end: now), the core count, the cores other
    processes used during it (None without ``/proc/stat``), and whether the machine was busy (module docstring)."""
    start = LOAD_AT_START if start is None else start
    end = os.getloadavg() if end is None else end
    cores = os.cpu_count() or 1
    others = other_cores(CPU_AT_START, cpu_counters())
    return {
        "loadavg_start": [round(x, 2) for x in start],
        "loadavg_end": [round(x, 2) for x in end],
        "cores": cores,
        "other_cores": None if others is None else round(others, 2),
        "busy": max(start[0], end[0]) > cores if others is None else others > OTHER_CORES_BUSY,
    }


def load_line(load: dict[str, Any]) -> str:
    """One markdown line: the load averages of the run, and the busy-machine warning when it applies."""
    line = (
        f"Load average (1, 5, 15 min) at the start {load['loadavg_start']}, at the end {load['loadavg_end']}, "
        f"on {load['cores']} cores."
    )
    if load.get("other_cores") is not None:
        line += f" Other processes used {load['other_cores']:.2f} cores on average during the run (`/proc/stat`)."
    if load["busy"]:
        line += (
            " **Busy machine**: other jobs held the cores; timings are inflated"
            " and ratios favour whichever side uses fewer threads. Re-run on a quiet machine before quoting them."
        )
    return line


def write_results(name: str, payload: dict[str, Any], section_md: str) -> None:
    """Write ``benchmarks/results/<name>.json`` and replace (or append) this benchmark's section of BENCHMARKS.md;
    both carry the run's load averages (:func:`load_record`; a payload with its own record, ``load`` or
    ``load_average``, keeps it)."""
    if "load" not in payload and "load_average" not in payload:
        load = load_record()
        payload = {**payload, "load": load}
        section_md = section_md.rstrip() + "\n\n" + load_line(load)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{section_md.strip()}\n{end}"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    BENCHMARKS_MD.write_text(text)


def gemm_floor(x: np.ndarray, block: int = 1024) -> int:
    """The upper-triangle (block, block) tile GEMMs of ``x @ x.T`` that ``arcfold.retrieval.self_knn.self_topk``
    computes (its tile side is 1024), alone: the floor of its pass. Returns their FLOPs."""
    import torch

    xt = torch.from_numpy(x)  # (n, D)
    n, d = xt.shape
    side = min(block, n)
    out = torch.empty((side, side), dtype=torch.float32)
    starts = [min(s, n - side) for s in range(0, n, block)]  # edge tiles as full blocks ending at n, as self_topk
    with torch.inference_mode():
        for a, i0 in enumerate(starts):
            for j0 in starts[a:]:
                torch.matmul(xt[i0 : i0 + side], xt[j0 : j0 + side].T, out=out)
    tiles = len(starts) * (len(starts) + 1) // 2
    return 2 * d * side * side * tiles


def clustered_embeddings(n: int, d: int, seed: int = 0, noise: float = 1.6) -> tuple[np.ndarray, np.ndarray]:
    """``n`` L2-normalised float32 (n, d) embeddings in classes of 1..15 members around random unit centres.

    Class sizes are uniform on 1..15, so about 1/15 of the classes are singletons (distractors, not queries).
    ``noise`` is the expected norm of the Gaussian noise added to each unit centre: at 1.6 the classes overlap
    enough that the metrics are far from 1.
    """
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 16, size=n)  # more classes than needed; cut at n items
    sizes = sizes[: int(np.searchsorted(np.cumsum(sizes), n)) + 1]
    labels = np.repeat(np.arange(len(sizes)), sizes)[:n]  # (n,)
    centres = rng.standard_normal((len(sizes), d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[labels]  # (n, d)
    x += rng.standard_normal((n, d), dtype=np.float32) * np.float32(noise / np.sqrt(d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    perm = rng.permutation(n)
    return np.ascontiguousarray(x[perm]), labels[perm].astype(np.int64)
