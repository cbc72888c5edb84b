"""CLI start-up: wall time of ``python -m arcfold STAGE --help`` for every stage, and of ``import arcfold``.

Each command runs in a fresh interpreter (``subprocess``, the way a user starts it), ``--rounds`` times (default 5)
in alternating order, so machine drift hits every command alike; the median is reported, with the minimum and
maximum. ``python -c pass`` is measured the same way: the interpreter's own start-up, which no code of ours can
remove. Target: every stage's ``--help`` well under 2 s (it must not load torch, timm, faiss, pandas or optuna;
``tests/stages/test_cli_help.py`` checks that).

The 1-minute load average (``os.getloadavg()``) is recorded before and after. When either exceeds the number of
cores, other processes were competing for the CPU: the script prints the table and refuses to write the results,
unless ``--allow-busy``, which writes them marked "busy machine". ``--compare-src DIR`` measures a second source
tree the same way, in the same rounds, as another column (e.g. the commit before a change:
``git archive <commit> src | tar -x -C /tmp/before``, then ``--compare-src /tmp/before/src``). Run from the project
root::

    python benchmarks/bench_cli.py [--rounds 5] [--compare-src DIR [--compare-label NAME]] [--allow-busy]

Writes ``benchmarks/results/bench_cli.json``, ``benchmarks/results/bench_cli.md`` and its section of
``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bench_common import RESULTS, machine, machine_line, write_results  # noqa: E402

NAME = "bench_cli"
SRC = Path("src").resolve()
TARGET_S = 2.0


def commands() -> dict[str, list[str]]:
    """What is timed: label -> argv (run with the source tree on PYTHONPATH)."""
    sys.path.insert(0, str(SRC))
    from arcfold.__main__ import STAGES

    cmds = {"python -c pass": ["-c", "pass"], "import arcfold": ["-c", "import arcfold"]}
    cmds["python -m arcfold"] = ["-m", "arcfold", "--help"]
    cmds.update({f"{stage} --help": ["-m", "arcfold", stage, "--help"] for stage in STAGES})
    return cmds


def time_once(argv: list[str], src: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, timeout=120, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} (PYTHONPATH={src}) exited {proc.returncode}: {proc.stderr[-500:]}")
    return seconds


def summary(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def render(rows: dict[str, dict], trees: list[str], load: dict, busy: bool, rounds: int) -> str:
    head = "| command | " + " | ".join(f"{t}: median (min-max), s" for t in trees) + " |"
    lines = [head, "|---|" + "---|" * len(trees)]
    for label, per_tree in rows.items():
        cells = [f"{s['median_s']:.3f} ({s['min_s']:.3f}-{s['max_s']:.3f})" for s in per_tree.values()]
        lines.append(f"| `{label}` | " + " | ".join(cells) + " |")
    helps = {label: per_tree["this tree"]["median_s"] for label, per_tree in rows.items() if label.endswith("--help")}
    slowest = max(helps, key=helps.get)
    verdict = "met" if helps[slowest] < TARGET_S else "not met"
    note = " **Busy machine**: the load average exceeded the core count; times are inflated." if busy else ""
    return (
        "\n".join(lines)
        + f"\n\nMedian of {rounds} fresh processes per command, alternating. Load average (1 min) before "
        f"{load['before'][0]:.2f}, after {load['after'][0]:.2f}, on {load['cores']} cores.{note} Slowest stage "
        f"`--help`: `{slowest}`, {helps[slowest]:.3f} s (target < {TARGET_S:.0f} s: **{verdict}**)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compare-src", default=None, help="a second source tree's src/ (a 'before' column)")
    parser.add_argument("--compare-label", default="before", help="its column's name, e.g. 'before (e94b7ce)'")
    parser.add_argument("--allow-busy", action="store_true", help="write results even on a busy machine (marked)")
    args = parser.parse_args()
    trees = {"this tree": SRC}
    if args.compare_src:
        trees[args.compare_label] = Path(args.compare_src).resolve()
    cmds = commands()
    cores = os.cpu_count() or 1
    load_before = os.getloadavg()
    times: dict[str, dict[str, list[float]]] = {label: {t: [] for t in trees} for label in cmds}
    for i in range(args.rounds):
        order = list(cmds.items()) if i % 2 == 0 else list(reversed(cmds.items()))
        for label, argv in order:
            for tree, src in trees.items() if i % 2 == 0 else reversed(trees.items()):
                times[label][tree].append(time_once(argv, src))
    load_after = os.getloadavg()
    load = {"before": list(load_before), "after": list(load_after), "cores": cores}
    busy = max(load_before[0], load_after[0]) > cores
    rows = {label: {t: summary(ts) for t, ts in per_tree.items()} for label, per_tree in times.items()}
    table = render(rows, list(trees), load, busy, args.rounds)
    print(table)
    if busy and not args.allow_busy:
        print(
            f"\nbusy machine: load average {max(load_before[0], load_after[0]):.2f} > {cores} cores; results NOT "
            "written. Run again when the machine is idle, or with --allow-busy to write them marked 'busy machine'."
        )
        raise SystemExit(1)
    m = machine()
    command = "python benchmarks/bench_cli.py"
    if args.compare_src:
        command += f" --compare-src DIR --compare-label '{args.compare_label}'"
    command += " --allow-busy" if busy else ""
    section = (
        "## CLI start-up: `python -m arcfold STAGE --help`\n\n"
        f"`{command}` ({'busy machine; ' if busy else ''}Machine: {machine_line(m)})\n\n" + table + "\n"
    )
    payload = {
        "machine": m,
        "command": command,
        "rounds": args.rounds,
        "load_average": load,
        "busy_machine": busy,
        "trees": {t: str(p) for t, p in trees.items()},
        "results": rows,
        "raw_s": times,
    }
    write_results(NAME, payload, section)
    (RESULTS / f"{NAME}.md").write_text(section)
    print(f"\nwrote {RESULTS / NAME}.json, {RESULTS / NAME}.md and BENCHMARKS.md")


if __name__ == "__main__":
    main()
