"""The shared benchmark helpers: percentiles, slopes, the memory verdicts and the JSON file."""

from __future__ import annotations

import json
import math
import os

import pytest

from benchmarks._load_figures import OVERHEAD_DEFINITION, latency_figures
from benchmarks._processes import CpuMeter, MemorySampler, cpu_seconds, rss_bytes
from benchmarks._report import linear_slope, percentile, print_table, summarize, write_json


def test_percentile_interpolates_between_ranks():
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 90) == pytest.approx(3.7)
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match="percentile q"):
        percentile(values, 101)


def test_summarize_and_slope():
    summary = summarize([float(v) for v in range(1, 101)])
    assert summary["n"] == 100 and summary["min"] == 1.0 and summary["max"] == 100.0
    assert summary["p50"] == pytest.approx(50.5) and summary["p99"] == pytest.approx(99.01)
    assert linear_slope([0, 1, 2, 3], [5, 7, 9, 11]) == pytest.approx(2.0)
    assert math.isnan(linear_slope([1], [1]))


def _sampler(minutes: list[float], rss: dict[str, list[float]]) -> MemorySampler:
    sampler = MemorySampler({label: 1000 + i for i, label in enumerate(rss)})
    sampler.times_s = [m * 60 for m in minutes]
    sampler.rss_mib = rss
    return sampler


def test_memory_verdicts_show_growth():
    minutes = [i / 2 for i in range(21)]  # 10 minutes, a sample every 30 s
    flat = [500.0 + (0.2 if i % 2 else 0.0) for i in range(21)]
    leaking = [500.0 + 3.0 * m for m in minutes]  # 3 MiB per minute, all along
    warm_up = [500.0 + min(m, 2.0) * 20 for m in minutes]  # +40 MiB in 2 minutes, then flat
    died = flat[:10] + [math.nan] * 11
    summary = _sampler(minutes, {"flat": flat, "leaking": leaking, "warm_up": warm_up, "died": died}).summary(1.0)
    assert summary["flat"]["verdict"] == "stable"
    assert summary["leaking"]["verdict"] == "GROWING"
    assert summary["leaking"]["slope_mib_per_min"] == pytest.approx(3.0)
    assert summary["leaking"]["growth_mib"] == pytest.approx(30.0)
    assert summary["warm_up"]["verdict"] == "grew early, then flat"
    assert summary["warm_up"]["max_mib"] == pytest.approx(540.0)
    assert summary["died"]["verdict"] == "DIED"


def test_process_readers_see_this_process():
    assert rss_bytes(os.getpid()) > 10 * 2**20
    assert cpu_seconds(os.getpid()) > 0
    assert rss_bytes(2**22 + 12345) is None  # beyond the kernel's default pid range: no such process
    meter = CpuMeter({"me": (os.getpid(), None)}).start()
    sum(i * i for i in range(300_000))  # some CPU to count
    usage = meter.stop()
    assert usage["cpu_s"]["me"] > 0 and usage["wall_s"] > 0


def test_router_overhead_subtracts_the_prefill_tier_time():
    timings = {"ttft_ms": 100.0, "queue_ms": 20.0, "prefill_ms": 30.0, "kv_transfer_ms": 10.0, "tpot_ms": 5.0,
               "e2e_ms": 180.0}
    results = [{"code": "OK", "timings": timings, "client_e2e_ms": 190.0},
               {"code": "UNAVAILABLE", "timings": None, "client_e2e_ms": 3.0}]
    figures = latency_figures(results)
    assert OVERHEAD_DEFINITION == "ttft_ms - queue_ms - prefill_ms - kv_transfer_ms"
    assert figures["router_overhead_ms"]["n"] == 1  # failed requests carry no timings and are not averaged in
    assert figures["router_overhead_ms"]["p50"] == pytest.approx(40.0)
    assert figures["after_first_token_ms"]["p50"] == pytest.approx(80.0)
    assert figures["client_minus_router_e2e_ms"]["p50"] == pytest.approx(10.0)


def test_write_json_turns_nan_into_null(tmp_path):
    path = write_json(tmp_path / "sub" / "figures.json", {"a": math.nan, "b": [1.0, math.inf], "c": {"d": 2}})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None], "c": {"d": 2}}


def test_print_table_aligns_columns(capsys):
    print_table("title", ["name", "value"], [["a", 1.5], ["longer", math.nan]])
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["", "title", "name    value", "------  -----", "a        1.50", "longer      -"]
