"""mesh.flash_block_attention against masked_block_attention and against full causal attention.

CPU: the run planning (which key rows each query run sees, with which mask) through the "math" backend, on the
blocks real CP plans produce (every (query rank, key rank) pair, cached prefixes, padding, GQA) and on odd layouts
that take the fallback; whole ring attention with it over Gloo. GPU (marked gpu): every fused backend on random
bf16 blocks, and ring attention over NCCL on two GPUs with the automatically selected kernel.
"""

from __future__ import annotations

import math
import multiprocessing
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mesh.cp_sharding import PADDING, shard, shard_cache, shard_plan, unshard
from mesh.flash_block_attention import (BACKENDS, FlashBlockAttention, _cached_block_plan,
                                        select_block_attention, set_default_backend)
from mesh.ring_attention import _key_metadata, masked_block_attention, ring_attention
from tests.mesh.test_cp_ring_attention import _free_port, reference_attention

HEAD_SHAPES = [(2, 2), (4, 1), (8, 1), (8, 2)]  # GQA ratios 1, 4, 8, 4
FUSED_BACKENDS = [b for b in BACKENDS if b != "math"]
HAS_TWO_GPUS = torch.cuda.device_count() >= 2


def random_plan(rng: random.Random, cp_size: int):
    num_seqs = rng.randint(1, 3)
    query_lens = [rng.choice([1, rng.randint(1, 6 * cp_size + 5)]) for _ in range(num_seqs)]
    context_lens = [rng.choice([0, rng.randint(1, 3), rng.randint(4, 30)]) for _ in range(num_seqs)]
    return shard_plan(query_lens, cp_size, context_lens=context_lens)


def plan_blocks(plan):
    """(q_seq, q_pos, kv_seq, kv_pos) of every (query rank, key rank) pair ring attention meets, both variants."""
    blocks = []
    for q_rank in range(plan.cp_size):
        for kv_rank in range(plan.cp_size):
            for num_cached_rows in {plan.max_cached_local, plan.num_cached_local(kv_rank)}:  # pass-KV, pass-Q
                kv_seq, kv_pos = _key_metadata(plan, kv_rank, num_cached_rows, torch.device("cpu"))
                blocks.append((plan.seq_ids[q_rank], plan.positions[q_rank], kv_seq, kv_pos))
    return blocks


def random_qkv(gen, num_q, num_k, num_heads, num_kv_heads, head_dim, dtype=torch.float64, device="cpu"):
    q = torch.randn(num_q, num_heads, head_dim, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(num_k, num_kv_heads, head_dim, generator=gen, dtype=torch.float64) for _ in range(2))
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def assert_same_attention(got, expected, *, atol: float, where: str) -> None:
    (out, lse), (ref_out, ref_lse) = got, expected
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape, where
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), f"rows that see no key differ: {where}"
    assert torch.all(out[torch.isinf(ref_lse)] == 0), f"rows that see no key must be zero: {where}"
    finite = torch.isfinite(ref_lse)
    if finite.any():
        lse_error = (lse[finite] - ref_lse[finite]).abs().max().item()
        assert lse_error < atol, f"lse error {lse_error:.3g}: {where}"
    out_error = (out - ref_out).abs().max().item()
    assert out_error < atol, f"max error {out_error:.3g}: {where}"


# ---- CPU: planning through the math backend -------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(12))
def test_math_backend_equals_masked_attention_on_every_block_of_real_plans(seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    attend = FlashBlockAttention(backend="math")
    for cp_size in (1, 2, 3):
        plan = random_plan(rng, cp_size)
        num_heads, num_kv_heads = rng.choice(HEAD_SHAPES)
        for q_seq, q_pos, kv_seq, kv_pos in plan_blocks(plan):
            q, k, v = random_qkv(gen, q_seq.numel(), kv_seq.numel(), num_heads, num_kv_heads, 8)
            where = f"seed={seed} cp={cp_size} query_lens={plan.query_lens} context_lens={plan.context_lens}"
            assert_same_attention(attend(q, k, v, q_seq, q_pos, kv_seq, kv_pos, 0.35),
                                  masked_block_attention(q, k, v, q_seq, q_pos, kv_seq, kv_pos, 0.35),
                                  atol=1e-10, where=where)


@pytest.mark.parametrize("seed", range(8))
def test_odd_layouts_fall_back_and_still_match(seed):
    """Shuffled key rows, duplicate sequences interleaved, padding in the middle: not what cp_sharding makes, so
    several runs take the masked fallback or split diagonals; the answer must not change."""
    rng = random.Random(100 + seed)
    gen = torch.Generator().manual_seed(seed)
    num_q, num_k = rng.randint(1, 40), rng.randint(1, 60)
    q_seq = torch.tensor([rng.choice([0, 1, PADDING]) for _ in range(num_q)])
    q_pos = torch.tensor([rng.randint(0, 30) for _ in range(num_q)])
    kv_seq = torch.tensor([rng.choice([0, 1, 2, PADDING]) for _ in range(num_k)])
    kv_pos = torch.tensor(rng.sample(range(0, 80), num_k))
    q, k, v = random_qkv(gen, num_q, num_k, 4, 2, 8)
    attend = FlashBlockAttention(backend="math", max_diagonal_pieces=rng.choice([1, 8]))
    assert_same_attention(attend(q, k, v, q_seq, q_pos, kv_seq, kv_pos, 0.3),
                          masked_block_attention(q, k, v, q_seq, q_pos, kv_seq, kv_pos, 0.3),
                          atol=1e-10, where=f"seed={seed}")


def test_diagonal_inside_a_query_run_splits_rows_before_on_and_after_it():
    # Query positions 10..19; keys: 0..4 (full), 13..16 (a diagonal strictly inside), 25..27 (invisible).
    q_pos = torch.arange(10, 20)
    kv_pos = torch.cat([torch.arange(0, 5), torch.arange(13, 17), torch.arange(25, 28)])
    q_seq, kv_seq = torch.zeros(10, dtype=torch.long), torch.zeros(kv_pos.numel(), dtype=torch.long)
    q, k, v = random_qkv(torch.Generator().manual_seed(1), 10, kv_pos.numel(), 4, 4, 8)
    assert_same_attention(FlashBlockAttention(backend="math")(q, k, v, q_seq, q_pos, kv_seq, kv_pos, 0.3),
                          masked_block_attention(q, k, v, q_seq, q_pos, kv_seq, kv_pos, 0.3), atol=1e-10,
                          where="diagonal inside")


def test_a_step_plans_each_block_once_and_an_in_place_change_replans():
    plan = shard_plan([40], 2, context_lens=[9])
    kv_seq, kv_pos = _key_metadata(plan, 1, plan.max_cached_local, torch.device("cpu"))
    assert _key_metadata(plan, 1, plan.max_cached_local, torch.device("cpu"))[0] is kv_seq  # every layer
    metadata = (plan.seq_ids[0], plan.positions[0], kv_seq, kv_pos)
    first = _cached_block_plan(*metadata, 8)
    assert _cached_block_plan(*metadata, 8) is first
    q, k, v = random_qkv(torch.Generator().manual_seed(3), plan.num_local_tokens, kv_seq.numel(), 4, 2, 8)
    kv_pos.add_(0)  # an in-place write: the cached plan must not be trusted any more
    assert _cached_block_plan(*metadata, 8) is not first
    assert_same_attention(FlashBlockAttention(backend="math")(q, k, v, *metadata, 0.3),
                          masked_block_attention(q, k, v, *metadata, 0.3), atol=1e-10, where="replanned")


def test_lower_right_causal_call_needs_enough_keys():
    q, k, v = random_qkv(torch.Generator().manual_seed(0), 5, 3, 2, 2, 8)
    with pytest.raises(ValueError, match="at least as many keys"):
        FlashBlockAttention(backend="math").attend_rows(q, k, v, is_causal=True, scale=0.3)


def test_constructor_and_override_reject_unknown_backends():
    with pytest.raises(ValueError, match="backend must be one of"):
        FlashBlockAttention(backend="xformers")
    with pytest.raises(ValueError, match="backend must be one of"):
        set_default_backend("xformers")


def test_cpu_default_stays_masked_and_the_override_applies_everywhere():
    q = torch.zeros(4, 2, 8)
    assert select_block_attention(q) is masked_block_attention
    assert select_block_attention(q.to(torch.bfloat16)) is masked_block_attention
    set_default_backend("math")
    try:
        assert select_block_attention(q) == FlashBlockAttention(backend="math")
    finally:
        set_default_backend(None)
    assert select_block_attention(q) is masked_block_attention


def ring_case(seed: int, cp_size: int, group, rank: int, attend, *, device: str = "cpu",
              dtype: torch.dtype = torch.float64, head_dim: int = 8, tolerance: float = 1e-10,
              max_len: int | None = None) -> None:
    """One random batch through both ring variants with `attend`; the gathered output must equal the reference."""
    rng = random.Random(seed)
    max_len = max_len or 6 * cp_size + 5
    num_seqs = rng.randint(1, 3)
    query_lens = [rng.choice([1, rng.randint(1, max_len)]) for _ in range(num_seqs)]
    context_lens = [rng.choice([0, rng.randint(1, max_len)]) for _ in range(num_seqs)]
    num_heads, num_kv_heads = rng.choice(HEAD_SHAPES)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = random_qkv(gen, sum(query_lens), sum(query_lens), num_heads, num_kv_heads, head_dim, dtype)
    cached_k, cached_v = random_qkv(gen, 1, sum(context_lens), 1, num_kv_heads, head_dim, dtype)[1:]
    scale = 1.0 / math.sqrt(head_dim)
    expected = reference_attention(*(t.double() for t in (q, k, v, cached_k, cached_v)), query_lens, context_lens,
                                   scale)
    plan = shard_plan(query_lens, cp_size, context_lens=context_lens)
    has_cache = any(context_lens)
    for mode in ("pass-kv", "pass-q"):
        out_local = ring_attention(
            shard(q, plan, rank).to(device), shard(k, plan, rank).to(device), shard(v, plan, rank).to(device),
            plan, group, mode=mode, block_attention=attend,
            cached_k_local=shard_cache(cached_k, plan, rank).to(device) if has_cache else None,
            cached_v_local=shard_cache(cached_v, plan, rank).to(device) if has_cache else None)
        where = f"seed={seed} cp={cp_size} mode={mode} query_lens={query_lens} context_lens={context_lens}"
        assert out_local.dtype == dtype, where
        if group is None:
            gathered = [out_local]
        else:
            gathered = [torch.empty_like(out_local) for _ in range(cp_size)]
            dist.all_gather(gathered, out_local.contiguous(), group=group)
        full = unshard([g.cpu() for g in gathered], plan).double()
        error = ((full - expected).norm() / expected.norm()).item()
        assert error < tolerance, f"relative error {error:.3g} >= {tolerance}: {where}"


@pytest.mark.parametrize("seed", range(6))
def test_ring_attention_with_math_backend_on_one_rank(seed):
    ring_case(seed, 1, None, 0, FlashBlockAttention(backend="math"))


def _gloo_worker(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for case in range(10):
            ring_case(2000 + case, 2, dist.group.WORLD, rank, FlashBlockAttention(backend="math"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ring_attention_with_math_backend_on_gloo_pair():
    multiprocessing.get_context("forkserver").set_forkserver_preload([_gloo_worker.__module__])
    mp.start_processes(_gloo_worker, args=(_free_port(),), nprocs=2, join=True, start_method="forkserver")


# ---- GPU ---------------------------------------------------------------------------------------------------------

def _fused_block_case(backend: str, seed: int, head_dim: int) -> None:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    attend = FlashBlockAttention(backend=backend)
    for cp_size in (1, 2, 3):
        plan = random_plan(rng, cp_size)
        num_heads, num_kv_heads = rng.choice(HEAD_SHAPES)
        for q_seq, q_pos, kv_seq, kv_pos in plan_blocks(plan):
            q, k, v = random_qkv(gen, q_seq.numel(), kv_seq.numel(), num_heads, num_kv_heads, head_dim,
                                 torch.bfloat16, "cuda")
            scale = head_dim ** -0.5
            got = attend(q, k, v, q_seq, q_pos, kv_seq, kv_pos, scale)
            expected = masked_block_attention(q, k, v, q_seq.cuda(), q_pos.cuda(), kv_seq.cuda(), kv_pos.cuda(),
                                              scale)
            assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
            assert_same_attention(tuple(t.cpu() for t in got), tuple(t.cpu() for t in expected), atol=5e-2,
                                  where=f"backend={backend} seed={seed} cp={cp_size} heads={num_heads}/"
                                        f"{num_kv_heads} query_lens={plan.query_lens} "
                                        f"context_lens={plan.context_lens}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_fused_backends_equal_masked_attention_on_plan_blocks(backend):
    for seed in range(2):
        _fused_block_case(backend, seed, head_dim=(64, 128)[seed % 2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("num_heads, num_kv_heads", [(32, 8), (16, 16), (32, 4)])
def test_fused_lower_right_causal_with_more_keys_than_queries(backend, num_heads, num_kv_heads):
    """A query chunk against a cached prefix plus its own chunk: one lower-right causal call (a long one, so the
    kernels' tiling and the alignment both show)."""
    gen = torch.Generator().manual_seed(7)
    num_q, num_k = 1000, 3037
    q, k, v = random_qkv(gen, num_q, num_k, num_heads, num_kv_heads, 128, torch.bfloat16, "cuda")
    q_seq = torch.zeros(num_q, dtype=torch.long)
    q_pos = torch.arange(num_k - num_q, num_k)
    kv_seq, kv_pos = torch.zeros(num_k, dtype=torch.long), torch.arange(num_k)
    got = FlashBlockAttention(backend=backend)(q, k, v, q_seq, q_pos, kv_seq, kv_pos, 128 ** -0.5)
    expected = masked_block_attention(q, k, v, q_seq.cuda(), q_pos.cuda(), kv_seq.cuda(), kv_pos.cuda(),
                                      128 ** -0.5)
    out, ref = got[0].cpu(), expected[0].cpu()
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2, backend
    assert (got[1] - expected[1]).abs().max().item() < 1e-2, backend


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_selects_the_fused_kernel():
    q = torch.zeros(4, 2, 128, dtype=torch.bfloat16, device="cuda")
    assert isinstance(select_block_attention(q), FlashBlockAttention)
    assert select_block_attention(q.float()) is masked_block_attention


def _nccl_worker(rank: int, port: int) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            device_id=torch.device("cuda", rank))
    try:
        for case in range(12):
            # block_attention=None: ring_attention picks the fused kernel itself for CUDA bf16.
            ring_case(3000 + case, 2, dist.group.WORLD, rank, None, device=f"cuda:{rank}", dtype=torch.bfloat16,
                      head_dim=128, tolerance=1e-2, max_len=700)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not HAS_TWO_GPUS, reason="needs 2 CUDA GPUs")
def test_ring_attention_with_fused_kernel_equals_full_attention_on_nccl():
    mp.spawn(_nccl_worker, args=(_free_port(),), nprocs=2, join=True)
