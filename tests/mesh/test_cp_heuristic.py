"""The pass-KV / pass-Q choice in the CP paper's regimes, and the cost model's closed-form thresholds."""

from __future__ import annotations

import pytest

from mesh.cp_heuristic import (choose_cp_mode, choose_cp_mode_for_batch, estimate_cp_latency, resolve_cp_mode,
                               validate_cp_mode)

# One CP rank = one 8-GPU host running Llama-3-405B attention with TP8 (128 query / 8 KV heads of 128), as in the
# paper: about 8 x 800 TFLOP/s of attention, hosts linked by RDMA (~400 GB/s) or a TCP front end (~25 GB/s).
LLAMA_405B = dict(num_heads=128, num_kv_heads=8, head_dim=128)
HOST_FLOPS = 8 * 800e12
RDMA, TCP = 400e9, 25e9
CONTEXT = 128 * 1024


def mode(new, cached, *, cp_size=4, bandwidth=TCP, flops=HOST_FLOPS, model=LLAMA_405B):
    return choose_cp_mode(new, cached, cp_size=cp_size, peak_flops=flops, bandwidth_bytes_per_s=bandwidth, **model)


@pytest.mark.parametrize("bandwidth", [RDMA, TCP])
@pytest.mark.parametrize("context", [8 * 1024, CONTEXT, 1024 * 1024])
@pytest.mark.parametrize("cp_size", [2, 4, 16])
def test_full_prefill_picks_pass_kv(bandwidth, context, cp_size):
    assert mode(context, 0, cp_size=cp_size, bandwidth=bandwidth) == "pass-kv"


@pytest.mark.parametrize("new_fraction", [0.01, 0.02, 0.05])
@pytest.mark.parametrize("cp_size", [2, 4, 8])
def test_few_new_tokens_against_a_long_cache_pick_pass_q(new_fraction, cp_size):
    new = int(CONTEXT * new_fraction)
    assert mode(new, CONTEXT - new, cp_size=cp_size) == "pass-q"


@pytest.mark.parametrize("new_fraction", [0.01, 0.02])
def test_few_new_tokens_pick_pass_q_even_over_rdma(new_fraction):
    new = int(CONTEXT * new_fraction)
    assert mode(new, CONTEXT - new, bandwidth=RDMA) == "pass-q"


def test_large_share_of_new_tokens_picks_pass_kv_even_when_its_transfer_is_exposed():
    new, cached = CONTEXT // 2, CONTEXT // 2
    slow = dict(bandwidth=1e9, flops=HOST_FLOPS)
    estimate = estimate_cp_latency(new, cached, cp_size=4, peak_flops=HOST_FLOPS, bandwidth_bytes_per_s=1e9,
                                   **LLAMA_405B)
    assert not estimate.is_kv_transfer_hidden  # it wins on message size, not by hiding
    assert mode(new, cached, **slow) == "pass-kv"


def test_switches_from_pass_q_to_pass_kv_once_as_the_new_share_grows():
    modes = [mode(int(CONTEXT * f / 100), CONTEXT - int(CONTEXT * f / 100)) for f in range(1, 101)]
    first_kv = modes.index("pass-kv")
    assert 1 < first_kv < 50 and set(modes[:first_kv]) == {"pass-q"} and set(modes[first_kv:]) == {"pass-kv"}


def test_message_size_threshold_matches_two_kv_heads_over_heads():
    # With compute made negligible nothing hides and the all-to-all is the only extra: pass-KV must win for a new
    # share comfortably above 2 * H_kv / H = 12.5% and lose comfortably below it.
    fast_links_slow_compute = dict(flops=1e3, bandwidth=1e30)  # every transfer hides: no all-to-all wins
    assert mode(1000, 9000, **fast_links_slow_compute) == "pass-kv"
    no_compute = dict(flops=1e30, bandwidth=TCP)
    assert mode(3000, 7000, **no_compute) == "pass-kv"  # 30% new
    assert mode(500, 9500, **no_compute) == "pass-q"  # 5% new


def test_mha_models_prefer_pass_q_for_partial_prefill_sooner_than_gqa():
    # Without GQA a K/V message is twice a Q message per token, so pass-KV needs a much larger new share.
    mha = dict(num_heads=32, num_kv_heads=32, head_dim=128)
    gqa = dict(num_heads=32, num_kv_heads=4, head_dim=128)
    new, cached = 8192, 32768  # 20% new
    assert mode(new, cached, model=gqa, flops=1e30) == "pass-kv"
    assert mode(new, cached, model=mha, flops=1e30) == "pass-q"


def test_hidden_kv_transfer_threshold_for_full_prefill():
    # Without cache, t_kv <= t_step reads T >= N * C * H_kv * e / (H * B).
    cp_size, flops, bandwidth = 4, 1e15, 50e9
    threshold = cp_size * flops * 8 * 2 / (128 * bandwidth)
    common = dict(cp_size=cp_size, peak_flops=flops, bandwidth_bytes_per_s=bandwidth, **LLAMA_405B)
    assert estimate_cp_latency(int(threshold * 1.01), 0, **common).is_kv_transfer_hidden
    assert not estimate_cp_latency(int(threshold * 0.99), 0, **common).is_kv_transfer_hidden


def test_cp_size_1_has_no_communication_and_picks_pass_kv():
    estimate = estimate_cp_latency(10, 100_000, cp_size=1, peak_flops=1e12, bandwidth_bytes_per_s=1.0,
                                   **LLAMA_405B)
    assert estimate.pass_kv_s == estimate.pass_q_s == estimate.step_compute_s
    assert estimate.mode == "pass-kv"


def test_batch_counts_attention_per_sequence():
    # Many short fresh prompts fused with one long cached one: summing T and P as if one sequence overstates the
    # compute (hiding pass-KV's transfer); per sequence the compute is small and pass-Q wins.
    query_lens = [512] * 8 + [64]
    context_lens = [0] * 8 + [200_000]
    common = dict(cp_size=4, peak_flops=HOST_FLOPS, bandwidth_bytes_per_s=RDMA, **LLAMA_405B)
    assert choose_cp_mode(sum(query_lens), sum(context_lens), **common) == "pass-kv"
    assert choose_cp_mode_for_batch(query_lens, context_lens, **common) == "pass-q"


def test_resolve_cp_mode():
    common = dict(cp_size=4, peak_flops=HOST_FLOPS, bandwidth_bytes_per_s=TCP, **LLAMA_405B)
    assert resolve_cp_mode("pass-q", CONTEXT, 0, **common) == "pass-q"
    assert resolve_cp_mode("pass-kv", 100, CONTEXT, **common) == "pass-kv"
    assert resolve_cp_mode("auto", CONTEXT, 0, **common) == "pass-kv"
    assert resolve_cp_mode("auto", 1000, CONTEXT, **common) == "pass-q"
    with pytest.raises(ValueError, match="cp_mode must be one of auto, pass-kv, pass-q"):
        validate_cp_mode("ring")


@pytest.mark.parametrize("bad, match", [
    (dict(num_new_tokens=0), "num_new_tokens"),
    (dict(num_cached_tokens=-1), "num_cached_tokens"),
    (dict(num_kv_heads=3), "divide"),
    (dict(bandwidth_bytes_per_s=0.0), "bandwidth_bytes_per_s"),
    (dict(cp_size=0), "cp_size"),
])
def test_invalid_inputs_name_the_argument(bad, match):
    args = dict(num_new_tokens=10, num_cached_tokens=0, cp_size=2, peak_flops=1e12, bandwidth_bytes_per_s=1e9,
                **LLAMA_405B)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        choose_cp_mode(args.pop("num_new_tokens"), args.pop("num_cached_tokens"), **args)
