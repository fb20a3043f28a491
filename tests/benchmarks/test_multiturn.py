"""benchmarks/multiturn.py without a cluster: the configuration it derives and the figures it computes."""

from __future__ import annotations

import pytest

from benchmarks.multiturn import benchmark_config, figures, parse_args, ttft_ratio


def _record(turn: int, ttft_s: float, *, cached: int = 0, prompt: int = 100, same: bool = False) -> dict:
    return {"turn": turn, "ttft_s": ttft_s, "prompt_tokens": prompt, "cached_tokens": cached, "same_replica": same,
            "prefill_ms": 1.0}


def test_config_turns_the_prefix_cache_on_for_the_first_policy(tmp_path):
    args = parse_args(["--prefill-replicas", "3", "--cache-tokens", "1000", "--block-size", "8",
                       "--policies", "least-loaded,prefix-aware", "--out", str(tmp_path)])
    config, longest = benchmark_config(args)
    assert longest == 384 + 3 * (16 + 48) + 16
    prefill = config.prefill
    assert prefill.replicas == 3 and prefill.policy == "least-loaded"
    assert (prefill.prefix_cache.max_tokens, prefill.prefix_cache.block_size) == (1000, 8)
    # Room in the decode pool for every conversation's longest turn, twice over.
    assert config.decode.num_kv_blocks >= 2 * 8 * -(-longest // config.decode.block_size)
    assert config.router.port == 0


def test_figures_separate_follow_ups_and_count_cached_tokens():
    records = [_record(0, 1.0), _record(1, 0.2, cached=80, same=True), _record(1, 0.4, cached=0, same=False),
               _record(0, 2.0)]
    result = figures(records, num_expected=5)
    assert result["num_requests"] == 4 and result["num_failed"] == 1
    assert result["ttft_follow_up_s"]["p50"] == pytest.approx(0.3)
    assert result["cached_tokens_fraction"] == pytest.approx(80 / 400)
    assert result["follow_ups_same_replica"] == pytest.approx(0.5)


def test_ratio_is_least_loaded_over_prefix_aware():
    fast = figures([_record(0, 1.0), _record(1, 0.5)], 2)
    slow = figures([_record(0, 1.0), _record(1, 2.0)], 2)
    ratio = ttft_ratio({"prefix-aware": fast, "least-loaded": slow})
    assert ratio["follow_up_p50"] == pytest.approx(4.0)
    assert ttft_ratio({"prefix-aware": fast}) == {}


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        parse_args(["--turns", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--policies", ","])
