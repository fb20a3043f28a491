"""Ring attention (pass-KV and pass-Q) against full causal attention computed on one process.

One Gloo world of 4 processes serves every case: CP groups of size 2 (ranks 2, 3: group ranks differ from
global ranks), 3 (ranks 1, 2, 3) and 4 (all) run many random batches each, so the process start-up is paid once.
cp_size 1 runs in-process without torch.distributed (the group=None path).
"""

from __future__ import annotations

import math
import multiprocessing
import random
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mesh.cp_sharding import shard, shard_cache, shard_plan, unshard
from mesh.ring_attention import masked_block_attention, merge_partials, ring_attention

WORLD_SIZE = 4
CP_GROUP_RANKS = {2: [2, 3], 3: [1, 2, 3], 4: [0, 1, 2, 3]}
HEAD_SHAPES = [(2, 2), (4, 1), (8, 1), (8, 2)]  # (num_heads, num_kv_heads): GQA ratios 1, 4, 8, 4
HEAD_DIM = 8
NUM_CASES_PER_GROUP = 30


def reference_attention(q, k, v, cached_k, cached_v, query_lens, context_lens, scale):
    """Full causal attention of the packed batch, one sequence at a time, through SDPA in float64."""
    outs, start, cache_start = [], 0, 0
    group = q.shape[1] // k.shape[1]
    for num_new, context in zip(query_lens, context_lens):
        keys = torch.cat([cached_k[cache_start:cache_start + context], k[start:start + num_new]])
        values = torch.cat([cached_v[cache_start:cache_start + context], v[start:start + num_new]])
        keys = keys.repeat_interleave(group, dim=1).transpose(0, 1)
        values = values.repeat_interleave(group, dim=1).transpose(0, 1)
        query = q[start:start + num_new].transpose(0, 1)
        mask = torch.arange(context + num_new)[None, :] <= torch.arange(context, context + num_new)[:, None]
        outs.append(F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale).transpose(0, 1))
        start, cache_start = start + num_new, cache_start + context
    return torch.cat(outs)


def random_case(rng: random.Random, cp_size: int):
    """A batch mixing lengths that do not divide by 2N, length-1 sequences, and prefixes of 0 or more tokens."""
    num_seqs = rng.randint(1, 4)
    query_lens = [rng.choice([1, rng.randint(1, 3 * 2 * cp_size + 3)]) for _ in range(num_seqs)]
    context_lens = [rng.choice([0, 0, rng.randint(1, 2), rng.randint(3, 25)]) for _ in range(num_seqs)]
    num_heads, num_kv_heads = rng.choice(HEAD_SHAPES)
    dtype = rng.choice([torch.float64, torch.float64, torch.float32])
    return query_lens, context_lens, num_heads, num_kv_heads, dtype


def make_tensors(seed, query_lens, context_lens, num_heads, num_kv_heads, dtype):
    gen = torch.Generator().manual_seed(seed)
    num_new, num_cached = sum(query_lens), sum(context_lens)
    q = torch.randn(num_new, num_heads, HEAD_DIM, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(num_new, num_kv_heads, HEAD_DIM, generator=gen, dtype=torch.float64) for _ in range(2))
    cached_k, cached_v = (torch.randn(num_cached, num_kv_heads, HEAD_DIM, generator=gen, dtype=torch.float64)
                          for _ in range(2))
    return [t.to(dtype) for t in (q, k, v, cached_k, cached_v)]


def check_case(seed: int, cp_size: int, group, rank: int, device: str = "cpu") -> None:
    """One random batch through both variants on this rank; the gathered result must equal the reference."""
    rng = random.Random(seed)
    query_lens, context_lens, num_heads, num_kv_heads, dtype = random_case(rng, cp_size)
    q, k, v, cached_k, cached_v = make_tensors(seed, query_lens, context_lens, num_heads, num_kv_heads, dtype)
    scale = 1.0 / math.sqrt(HEAD_DIM)
    expected = reference_attention(*(t.double() for t in (q, k, v, cached_k, cached_v)), query_lens, context_lens,
                                   scale)
    plan = shard_plan(query_lens, cp_size, context_lens=context_lens)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    has_cache = any(context_lens)
    for mode in ("pass-kv", "pass-q"):
        out_local = ring_attention(
            shard(q, plan, rank).to(device), shard(k, plan, rank).to(device), shard(v, plan, rank).to(device),
            plan, group, mode=mode,
            cached_k_local=shard_cache(cached_k, plan, rank).to(device) if has_cache else None,
            cached_v_local=shard_cache(cached_v, plan, rank).to(device) if has_cache else None,
            cached_positions=plan.cached_positions[rank] if has_cache else None,
        )
        where = f"seed={seed} cp={cp_size} rank={rank} mode={mode} query_lens={query_lens} context_lens={context_lens}"
        assert out_local.dtype == dtype, where
        is_padding = plan.token_indices[rank] < 0
        assert torch.all(out_local.cpu()[is_padding] == 0), f"padding rows must be zero: {where}"
        if group is None:
            gathered = [out_local]
        else:
            gathered = [torch.empty_like(out_local) for _ in range(cp_size)]
            dist.all_gather(gathered, out_local.contiguous(), group=group)
        full = unshard([g.cpu() for g in gathered], plan).double()
        error = (full - expected).abs().max().item()
        assert error < tolerance, f"max error {error:.3g} >= {tolerance}: {where}"


def _worker(rank: int, port: int, seed_base: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        groups = {size: dist.new_group(ranks) for size, ranks in CP_GROUP_RANKS.items()}  # collective: all ranks
        for size, ranks in CP_GROUP_RANKS.items():
            if rank not in ranks:
                continue
            for case in range(NUM_CASES_PER_GROUP):
                check_case(seed_base + 1000 * size + case, size, groups[size], dist.get_rank(groups[size]))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ring_attention_matches_full_attention_on_gloo_groups_of_2_3_4():
    # forkserver with this module preloaded: torch is imported once, not once per rank (seconds on 2 cores).
    multiprocessing.get_context("forkserver").set_forkserver_preload([_worker.__module__])
    mp.start_processes(_worker, args=(_free_port(), 0), nprocs=WORLD_SIZE, join=True, start_method="forkserver")


@pytest.mark.parametrize("case", range(20))
def test_cp_size_1_matches_full_attention_without_a_process_group(case):
    check_case(seed=50_000 + case, cp_size=1, group=None, rank=0)


def test_merge_of_two_partials_equals_attention_over_the_union():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(5, 4, HEAD_DIM, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(9, 2, HEAD_DIM, generator=gen, dtype=torch.float64) for _ in range(2))
    seq = torch.zeros(9, dtype=torch.long)
    q_seq, q_pos, kv_pos = torch.zeros(5, dtype=torch.long), torch.arange(4, 9), torch.arange(9)
    full_out, full_lse = masked_block_attention(q, k, v, q_seq, q_pos, seq, kv_pos, 0.3)
    split = [0, 2, 3, 7, 8]  # an arbitrary, interleaved subset of the keys
    rest = [i for i in range(9) if i not in split]
    parts = [masked_block_attention(q, k[idx], v[idx], q_seq, q_pos, seq[idx], kv_pos[idx], 0.3)
             for idx in (split, rest)]
    out, lse = merge_partials(*parts[0], *parts[1])
    torch.testing.assert_close(out, full_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, full_lse, rtol=0, atol=1e-12)


def test_merge_keeps_rows_that_saw_no_key_at_zero_without_nan():
    out_a, lse_a = torch.zeros(3, 2, 4), torch.full((3, 2), float("-inf"))
    out_b = torch.randn(3, 2, 4)
    lse_b = torch.tensor([[0.5, float("-inf")], [1.0, 2.0], [float("-inf"), float("-inf")]])
    out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out[0, 0], out_b[0, 0])
    assert torch.all(out[2] == 0) and torch.all(lse[2] == float("-inf"))
    # A large lse in one part must not overflow the other's weight.
    big = merge_partials(out_b, torch.full((3, 2), 1e4), out_b * 2, torch.full((3, 2), 1e4 - 1.0))[0]
    assert torch.isfinite(big).all()


def test_missing_cache_for_a_plan_with_cached_tokens_is_an_error():
    plan = shard_plan([4], 1, context_lens=[3])
    q, k = torch.randn(plan.num_local_tokens, 2, HEAD_DIM), torch.randn(plan.num_local_tokens, 1, HEAD_DIM)
    with pytest.raises(ValueError, match="cached tokens"):
        ring_attention(q, k, k, plan, None)


def test_cached_rows_in_the_wrong_order_are_an_error():
    plan = shard_plan([4], 1, context_lens=[3])
    q, k = torch.randn(plan.num_local_tokens, 2, HEAD_DIM), torch.randn(plan.num_local_tokens, 1, HEAD_DIM)
    cached = torch.randn(3, 1, HEAD_DIM)
    with pytest.raises(ValueError, match="round-robin"):
        ring_attention(q, k, k, plan, None, cached_k_local=cached, cached_v_local=cached,
                       cached_positions=torch.tensor([2, 1, 0]))


def test_unknown_mode_is_an_error():
    plan = shard_plan([2], 1)
    x = torch.randn(plan.num_local_tokens, 1, HEAD_DIM)
    with pytest.raises(ValueError, match="mode"):
        ring_attention(x, x, x, plan, None, mode="pass-x")
