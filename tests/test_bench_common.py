"""benchmarks/_bench_common.py: every benchmark's results carry the load average of their run, and a run on a busy
machine (other processes' CPU use from /proc/stat, or the load above the core count without it) is marked as such in
the JSON and in BENCHMARKS.md."""

from __future__ import annotations

import importlib.util
import json

import pytest

from .conftest import REPO


@pytest.fixture
def common(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("_bench_common", REPO / "benchmarks" / "_bench_common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(module, "BENCHMARKS_MD", tmp_path / "BENCHMARKS.md")
    monkeypatch.setattr(module.os, "cpu_count", lambda: 2)
    return module


@pytest.mark.parametrize(
    "start, end, busy", [((1.2, 1.5, 1.7), (1.9, 1.6, 1.7), False), ((1.0, 1, 1), (4.5, 3, 2), True)]
)
def test_results_carry_the_load_and_a_busy_run_is_marked(common, tmp_path, monkeypatch, start, end, busy):
    monkeypatch.setattr(common, "cpu_counters", lambda: None)  # no /proc/stat: the load average decides
    monkeypatch.setattr(common, "LOAD_AT_START", start)
    monkeypatch.setattr(common.os, "getloadavg", lambda: end)
    common.write_results("bench_x", {"rows": [1]}, "## X\n\n| a |\n")
    payload = json.loads((tmp_path / "results" / "bench_x.json").read_text())
    assert payload["rows"] == [1]
    assert payload["load"] == {
        "loadavg_start": list(start),
        "loadavg_end": list(end),
        "cores": 2,
        "other_cores": None,
        "busy": busy,
    }
    section = (tmp_path / "BENCHMARKS.md").read_text()
    assert f"at the start {list(start)}, at the end {list(end)}, on 2 cores." in section
    assert ("**Busy machine**" in section) is busy


def test_a_benchmark_that_records_its_own_load_keeps_it(common, tmp_path):
    common.write_results("bench_y", {"load_average": {"before": [0.5]}}, "## Y\n")
    assert "load" not in json.loads((tmp_path / "results" / "bench_y.json").read_text())
    assert "Load average" not in (tmp_path / "BENCHMARKS.md").read_text()


@pytest.mark.parametrize(
    "machine_busy, own, other, busy",
    [(200.0, 195.0, 0.05, False), (300.0, 180.0, 1.2, True)],  # over 100 s: 5 / 120 CPU-seconds not the benchmark's
)
def test_other_processes_cpu_decides_over_the_load(common, tmp_path, monkeypatch, machine_busy, own, other, busy):
    # A benchmark that keeps both cores busy itself has a load of ~2: quiet unless others used the cores too.
    monkeypatch.setattr(common, "CPU_AT_START", (1000.0, 10.0, 50.0))
    monkeypatch.setattr(common, "cpu_counters", lambda: (1000.0 + machine_busy, 10.0 + own, 150.0))
    monkeypatch.setattr(common, "LOAD_AT_START", (1.9, 1.9, 1.9))
    monkeypatch.setattr(common.os, "getloadavg", lambda: (2.07, 2.0, 2.0))
    common.write_results("bench_z", {"rows": []}, "## Z\n")
    load = json.loads((tmp_path / "results" / "bench_z.json").read_text())["load"]
    assert load["other_cores"] == pytest.approx(other) and load["busy"] is busy
    section = (tmp_path / "BENCHMARKS.md").read_text()
    assert f"Other processes used {other:.2f} cores" in section
    assert ("**Busy machine**" in section) is busy


def test_cpu_counters_read_this_machine(common):
    counters = common.cpu_counters()
    if counters is None:
        pytest.skip("no /proc/stat here")
    busy, own, clock = counters
    assert busy > 0 and own > 0 and clock > 0
    later = common.cpu_counters()
    assert later[0] >= busy and later[1] >= own and later[2] > clock
