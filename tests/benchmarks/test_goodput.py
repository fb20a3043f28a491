"""benchmarks/goodput.py's pure parts: the workload, SLO attainment per rate, and the rate search."""

from __future__ import annotations

import random
import statistics

import pytest

from benchmarks._goodput_report import Slo, goodput_rate, next_rate, rate_summary
from benchmarks._goodput_workload import LengthDistribution, make_workload
from benchmarks.goodput import parse_args


def test_lognormal_lengths_keep_their_mean_and_bounds():
    dist = LengthDistribution(kind="lognormal", mean=1024, sigma=0.4, maximum=3000)
    rng = random.Random(1)
    draws = [dist.draw(rng) for _ in range(20000)]
    assert statistics.mean(draws) == pytest.approx(1024, rel=0.03)
    assert 1 <= min(draws) and max(draws) <= 3000 and len(set(draws)) > 100
    uniform = LengthDistribution(kind="uniform", mean=256, spread=0.5)
    assert all(128 <= uniform.draw(rng) <= 384 for _ in range(1000))
    assert LengthDistribution(kind="fixed", mean=7).draw(rng) == 7
    with pytest.raises(ValueError, match="not one of"):
        LengthDistribution(kind="pareto", mean=3)


def test_workload_is_poisson_and_the_same_requests_at_every_rate():
    inputs, outputs = LengthDistribution(mean=64), LengthDistribution(mean=16)
    slow = make_workload(rate_rps=2.0, num_requests=4000, inputs=inputs, outputs=outputs, vocab_size=500, seed=3)
    fast = make_workload(rate_rps=8.0, num_requests=4000, inputs=inputs, outputs=outputs, vocab_size=500, seed=3)
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(slow, slow[1:])]
    assert statistics.mean(gaps) == pytest.approx(0.5, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(0.5, rel=0.1)  # exponential: stdev = mean
    assert [(p.token_ids, p.max_tokens) for p in slow] == [(p.token_ids, p.max_tokens) for p in fast]
    assert fast[-1].arrival_s < slow[-1].arrival_s / 3
    assert all(3 <= t < 500 for p in slow[:50] for t in p.token_ids)
    again = make_workload(rate_rps=2.0, num_requests=10, inputs=inputs, outputs=outputs, vocab_size=500, seed=3)
    assert again == slow[:10]


def _result(ttft, tpot, code="OK", tokens=16):
    return {"code": code, "message": "", "ttft_ms": ttft, "tpot_ms": tpot, "output_tokens": tokens,
            "send_lag_ms": 0.0}


def test_attainment_needs_both_targets_and_counts_failures():
    slo = Slo(ttft_ms=1000, tpot_ms=25, attainment=0.9)
    results = ([_result(500, 20)] * 7 + [_result(1500, 20), _result(500, 30), _result(None, None, "UNAVAILABLE")]
               + [_result(900, None, tokens=1)])
    row = rate_summary(2.0, {"wall_s": 10.0, "results": results}, slo)
    assert row["attainment"] == pytest.approx(8 / 11)
    assert row["num_failed"] == 1 and not row["meets_slo"]
    assert row["ttft_ms_p50"] == 500 and row["failures"] == ["UNAVAILABLE: "]
    assert rate_summary(1.0, {"wall_s": 1.0, "results": [_result(10, 10)] * 9 + [_result(2000, 10)]},
                        slo)["meets_slo"]  # exactly 90%


def _row(rate, ok):
    return {"rate_rps": rate, "meets_slo": ok}


def test_rate_search_sweeps_then_bisects():
    rates = [1.0, 2.0, 4.0, 8.0]
    assert next_rate([], rates, bisect_steps_left=2) == 1.0
    assert next_rate([_row(1, True), _row(2, True)], rates, bisect_steps_left=2) == 4.0
    rows = [_row(1, True), _row(2, True), _row(4, False)]
    assert next_rate(rows, rates, bisect_steps_left=2) == 3.0  # stops sweeping at the first miss
    assert next_rate(rows, rates, bisect_steps_left=0) is None
    assert next_rate([_row(1, False)], rates, bisect_steps_left=1) == 0.25  # the lowest failed: look below
    assert next_rate([_row(r, True) for r in rates], rates, bisect_steps_left=2) is None


def test_goodput_is_the_highest_rate_below_the_first_miss():
    assert goodput_rate([_row(1, True), _row(3, True), _row(4, False), _row(2, True)]) == 3
    assert goodput_rate([_row(1, True), _row(2, False), _row(8, True)]) == 1  # a lucky pass above a miss
    assert goodput_rate([_row(1, False)]) == 0


def test_cli_validates_its_options():
    args = parse_args(["--config", "a.yaml", "--config", "b.yaml", "--rates", "4,1,2"])
    assert args.rate_list == [1.0, 2.0, 4.0] and args.config == ["a.yaml", "b.yaml"]
    with pytest.raises(SystemExit):
        parse_args(["--rates", "1,-2"])
    with pytest.raises(SystemExit):
        parse_args(["--config", "a.yaml", "--name", "x", "--name", "y"])
