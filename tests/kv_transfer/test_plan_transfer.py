"""Transfer plans between unequal meshes (kv_transfer.plan), pure CPU.

The oracle: the full KV of a prompt `[layers, 2, T, H, D]` drawn at random. Each prefill rank holds what the model
would hold (its stage's layers, its heads, its CP rows in shard order with zero padding); each decode rank should
end up with exactly what it would hold had it computed the prefill itself (its layers, its heads, token p in block
`block_ids[p // block_size]` row `p % block_size`), with every other cache element untouched.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kv_transfer.mesh_layout import DecodeLayout, PrefillLayout
from kv_transfer.plan import Message, TransferPlan, pack, plan_transfer, unpack_into
from mesh.cp_sharding import PADDING, shard, shard_plan

HEAD_DIM = 3


# ---- oracle -----------------------------------------------------------------------------------------------------

def prefill_rank_kv(full: torch.Tensor, src: PrefillLayout, rank: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """What prefill rank `rank`'s layer hook yields for one sequence: global layer -> (k, v) `[rows, local_heads,
    D]`; on CP the rank's shard in shard order with the padding rows dropped (mesh.decoder does `k[is_real]`)."""
    num_tokens = full.shape[2]
    cp_plan = shard_plan([num_tokens], src.cp)
    cp_rank = src.coords(rank)["cp"]
    is_real = cp_plan.token_indices[cp_rank] != PADDING
    heads = src.head_range(rank)

    def rows(x: torch.Tensor) -> torch.Tensor:  # cp = 1 does not shard: all rows, in order
        return shard(x, cp_plan, cp_rank)[is_real] if src.cp > 1 else x.clone()

    return {layer: tuple(rows(full[layer, side, :, heads.start:heads.stop]) for side in (0, 1))
            for layer in src.layer_range(rank)}


def decode_cache(dst: DecodeLayout, rank: int, num_blocks: int, seed: int, dtype=torch.float32) -> list[torch.Tensor]:
    """A decode rank's cache filled with random junk (so untouched elements are recognisable)."""
    generator = torch.Generator().manual_seed(seed * 1000 + rank)
    shape = (num_blocks, 2, dst.block_size, len(dst.head_range(rank)), HEAD_DIM)
    return [torch.randn(shape, generator=generator).to(dtype) for _ in dst.layer_range(rank)]


def expected_cache(full: torch.Tensor, dst: DecodeLayout, rank: int, before: list[torch.Tensor],
                   block_ids: list[int]) -> list[torch.Tensor]:
    """The cache after a correct transfer: the prompt's rows filled block by block, everything else as before."""
    num_tokens, block_size, heads = full.shape[2], dst.block_size, dst.head_range(rank)
    after = [t.clone() for t in before]
    for local, layer in enumerate(dst.layer_range(rank)):
        for index, block in enumerate(block_ids):
            start = index * block_size
            if start >= num_tokens:
                break
            count = min(block_size, num_tokens - start)
            after[local][block, :, :count] = full[layer, :, start:start + count, heads.start:heads.stop]
    return after


def execute(plan: TransferPlan, full: torch.Tensor, caches: dict[int, list[torch.Tensor]], *, is_layerwise: bool,
            extra_rows: bool, rng: random.Random) -> dict[int, list[Message]]:
    """Pack on every prefill rank, deliver in a shuffled order, unpack on every decode rank. Returns the
    messages each decode rank received."""
    inbox: dict[int, list[Message]] = {rank: [] for rank in caches}
    for src_rank in range(plan.src.world_size):
        kv = prefill_rank_kv(full, plan.src, src_rank)
        if extra_rows:  # rows past the sequence's (the next sequence of a packed step, or padding) are ignored
            kv = {layer: tuple(torch.cat([t, torch.full_like(t[:1], 7.0)]) for t in pair) for layer, pair in kv.items()}
        batches = [{layer: pair} for layer, pair in kv.items()] if is_layerwise else [list(kv.values())]
        for batch in batches:
            for dst_rank, messages in pack(plan, src_rank, batch):
                assert all(plan.copies[m.copy_index].dst_rank == dst_rank for m in messages)
                inbox[dst_rank].extend(messages)
    for dst_rank, messages in inbox.items():
        rng.shuffle(messages)
        unpack_into(plan, dst_rank, messages, caches[dst_rank])
    return inbox


def write_counts(plan: TransferPlan, dst_rank: int, messages: list[Message], num_blocks: int) -> list[torch.Tensor]:
    """How many times unpack_into writes each element of the rank's cache: unpack every message alone, with an
    all-ones payload, into a zeroed cache, and add up where the ones landed."""
    shape = (num_blocks, 2, plan.dst.block_size, len(plan.dst.head_range(dst_rank)), HEAD_DIM)
    counts = [torch.zeros(shape, dtype=torch.int32) for _ in plan.dst.layer_range(dst_rank)]
    for message in messages:
        probe = [torch.zeros(shape, dtype=message.tensor.dtype) for _ in counts]
        ones = Message(copy_index=message.copy_index, layers=message.layers, tensor=torch.ones_like(message.tensor))
        unpack_into(plan, dst_rank, [ones], probe)
        for count, written in zip(counts, probe):
            count += (written == 1).int()
    return counts


def prompt_mask(dst: DecodeLayout, rank: int, block_ids: list[int], num_tokens: int, num_blocks: int) -> torch.Tensor:
    shape = (num_blocks, 2, dst.block_size, len(dst.head_range(rank)), HEAD_DIM)
    mask = torch.zeros(shape, dtype=torch.int32)
    for index, block in enumerate(block_ids):
        start = index * dst.block_size
        if start >= num_tokens:
            break
        mask[block, :, :min(dst.block_size, num_tokens - start)] = 1
    return mask


def check_transfer(src: PrefillLayout, dst: DecodeLayout, num_tokens: int, *, seed: int, num_extra_blocks: int = 3,
                   is_layerwise: bool = False, extra_rows: bool = False, count_writes: bool = True,
                   dtype=torch.float32) -> TransferPlan:
    rng = random.Random(seed)
    num_needed = -(-num_tokens // dst.block_size)
    num_blocks = num_needed * 2 + num_extra_blocks
    block_ids = rng.sample(range(num_blocks), num_needed + rng.randint(0, num_extra_blocks))  # shuffled, spare too
    full = torch.randn((src.num_layers, 2, num_tokens, src.num_kv_heads, HEAD_DIM),
                       generator=torch.Generator().manual_seed(seed)).to(dtype)
    plan = plan_transfer(src, dst, num_tokens, block_ids)
    before = {rank: decode_cache(dst, rank, num_blocks, seed, dtype) for rank in range(dst.world_size)}
    caches = {rank: [t.clone() for t in tensors] for rank, tensors in before.items()}
    inbox = execute(plan, full, caches, is_layerwise=is_layerwise, extra_rows=extra_rows, rng=rng)
    for rank in range(dst.world_size):
        expected = expected_cache(full, dst, rank, before[rank], block_ids)
        for layer, got, want in zip(dst.layer_range(rank), caches[rank], expected):
            assert torch.equal(got, want), f"decode rank {rank} layer {layer} differs ({src} -> {dst}, T={num_tokens})"
        if count_writes:
            mask = prompt_mask(dst, rank, block_ids, num_tokens, num_blocks)
            for layer, count in zip(dst.layer_range(rank), write_counts(plan, rank, inbox[rank], num_blocks)):
                assert torch.equal(count, mask), f"decode rank {rank} layer {layer}: an element written != once"
    return plan


# ---- the named cases ----------------------------------------------------------------------------------------------

def test_prefill_tp2_cp4_to_decode_tp4():
    src = PrefillLayout(num_layers=3, num_kv_heads=4, tp=2, cp=4)
    dst = DecodeLayout(num_layers=3, num_kv_heads=4, tp=4, block_size=4)
    for num_tokens in (1, 7, 16, 37, 64):
        plan = check_transfer(src, dst, num_tokens, seed=num_tokens, is_layerwise=num_tokens % 2 == 1)
    # T=64: every decode rank takes its one head from the tp rank holding it, on all 4 CP ranks: 4 messages.
    for dst_rank in range(4):
        copies = plan.copies_to(dst_rank)
        assert sorted(c.src_rank for c in copies) == [src.rank_of(pp=0, cp=cp, tp=dst_rank // 2) for cp in range(4)]
        assert all(c.heads == range(dst_rank, dst_rank + 1) and c.layers == range(3) for c in copies)
        assert sum(c.num_tokens for c in copies) == 64
    for src_rank in range(8):
        assert len(plan.copies_from(src_rank)) == 2  # its two heads go to two decode ranks


def test_prefill_pp2_to_decode_pp1():
    src = PrefillLayout(num_layers=5, num_kv_heads=2, pp=2)
    dst = DecodeLayout(num_layers=5, num_kv_heads=2, block_size=4)
    plan = check_transfer(src, dst, 13, seed=1, is_layerwise=True)
    assert [(c.src_rank, c.dst_rank, c.layers) for c in plan.copies] == [(0, 0, range(0, 3)), (1, 0, range(3, 5))]
    assert all(c.is_all_dst_heads and len(c.token_runs) == 1 for c in plan.copies)


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_prefill_tp1_to_decode_tp8_sends_each_replica_its_own_copy(num_kv_heads):
    src = PrefillLayout(num_layers=2, num_kv_heads=num_kv_heads)
    dst = DecodeLayout(num_layers=2, num_kv_heads=num_kv_heads, tp=8, block_size=4)
    plan = check_transfer(src, dst, 21, seed=num_kv_heads)
    replicas = 8 // num_kv_heads
    assert [(c.src_rank, c.dst_rank) for c in plan.copies] == [(0, d) for d in range(8)]
    for copy in plan.copies:
        head = copy.dst_rank // replicas
        assert copy.heads == range(head, head + 1) and copy.src_heads_local == copy.heads
        assert copy.dst_heads_local == range(0, 1) and copy.is_all_dst_heads


def test_replicated_source_heads_are_read_from_the_congruent_replica():
    # H=2 on prefill TP8: head h lives on tp ranks 4h..4h+3. Decode TP8 has the same placement, so each decode
    # rank reads from the prefill rank with the same index: the load is spread over all eight.
    src = PrefillLayout(num_layers=2, num_kv_heads=2, tp=8)
    dst = DecodeLayout(num_layers=2, num_kv_heads=2, tp=8, block_size=16)
    plan = check_transfer(src, dst, 40, seed=3)
    assert [(c.src_rank, c.dst_rank) for c in plan.copies] == [(r, r) for r in range(8)]
    # Decode TP1 holds both heads; it reads head 0 from tp rank 0 and head 1 from tp rank 4 (replica 0 of each).
    plan = check_transfer(src, DecodeLayout(num_layers=2, num_kv_heads=2, block_size=16), 40, seed=4)
    assert [(c.src_rank, c.heads, c.dst_heads_local) for c in plan.copies] == [
        (0, range(0, 1), range(0, 1)), (4, range(1, 2), range(1, 2))]
    assert not any(c.is_all_dst_heads for c in plan.copies)


def test_head_subset_copies_write_only_their_heads():
    # Prefill TP4 x CP2 -> decode TP1: each decode block row is filled by 4 sources x 2 CP ranks.
    src = PrefillLayout(num_layers=2, num_kv_heads=8, tp=4, cp=2)
    dst = DecodeLayout(num_layers=2, num_kv_heads=8, block_size=16)
    plan = check_transfer(src, dst, 50, seed=5, extra_rows=True)
    assert len(plan.copies) == 8 and all(len(c.heads) == 2 for c in plan.copies)


def test_bfloat16_round_trips_bitwise():
    src = PrefillLayout(num_layers=2, num_kv_heads=4, tp=2, cp=3)
    dst = DecodeLayout(num_layers=2, num_kv_heads=4, tp=4, pp=2, block_size=4)
    check_transfer(src, dst, 29, seed=6, dtype=torch.bfloat16, is_layerwise=True)


# ---- every layout pair: the plan alone (fast, no tensors beyond counters) ------------------------------------

def check_plan_covers_once(plan: TransferPlan) -> None:
    src, dst, num_tokens = plan.src, plan.dst, plan.num_tokens
    counts = {rank: torch.zeros((dst.num_layers, dst.num_kv_heads, num_tokens), dtype=torch.int32)
              for rank in range(dst.world_size)}
    pairs = set()
    positions_of = {rank: src.token_positions(rank, num_tokens).tolist() for rank in range(src.world_size)}
    for index, copy in enumerate(plan.copies):
        assert copy.index == index
        assert (copy.src_rank, copy.dst_rank) not in pairs, "one copy per (src, dst) pair"
        pairs.add((copy.src_rank, copy.dst_rank))
        assert len(copy.token_runs) <= 2
        # The source really holds what it sends, in the rows named.
        assert set(copy.layers) <= set(src.layer_range(copy.src_rank))
        src_heads, dst_heads = src.head_range(copy.src_rank), dst.head_range(copy.dst_rank)
        assert [src_heads[i] for i in copy.src_heads_local] == list(copy.heads)
        assert [dst_heads[i] for i in copy.dst_heads_local] == list(copy.heads)
        assert copy.is_all_dst_heads == (copy.heads == dst_heads)
        positions = positions_of[copy.src_rank]
        count = counts[copy.dst_rank]
        for run in copy.token_runs:
            rows = positions[run.src_row:run.src_row + run.length]
            assert rows == list(range(run.token_start, run.token_start + run.length))
            count[copy.layers.start:copy.layers.stop, copy.heads.start:copy.heads.stop,
                  run.token_start:run.token_start + run.length] += 1
    for rank, count in counts.items():
        want = torch.zeros_like(count)
        layers, heads = dst.layer_range(rank), dst.head_range(rank)
        want[layers.start:layers.stop, heads.start:heads.stop] = 1
        assert torch.equal(count, want), f"{src} -> {dst} T={num_tokens}: decode rank {rank} not covered once"


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4, 8])
@pytest.mark.parametrize("src_pp", [1, 2, 3])
def test_every_layout_pair_covers_each_destination_element_once(num_kv_heads, src_pp):
    num_layers = 5
    for src_cp, src_tp, dst_pp, dst_tp in itertools.product([1, 2, 3, 4], [1, 2, 4, 8], [1, 2], [1, 2, 4, 8]):
        src = PrefillLayout(num_layers=num_layers, num_kv_heads=num_kv_heads, pp=src_pp, cp=src_cp, tp=src_tp)
        dst = DecodeLayout(num_layers=num_layers, num_kv_heads=num_kv_heads, pp=dst_pp, tp=dst_tp, block_size=4)
        for num_tokens in (1, 2 * src_cp * 3, 2 * src_cp * 3 + 1):
            plan = plan_transfer(src, dst, num_tokens, list(range(num_tokens)))
            check_plan_covers_once(plan)


# ---- random layout pairs, executed ------------------------------------------------------------------------------

@st.composite
def transfer_cases(draw):
    num_kv_heads = draw(st.sampled_from([1, 2, 4, 8]))
    src_pp, dst_pp = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2]))
    num_layers = draw(st.integers(min_value=max(src_pp, dst_pp), max_value=5))
    src = PrefillLayout(num_layers=num_layers, num_kv_heads=num_kv_heads, pp=src_pp,
                        cp=draw(st.sampled_from([1, 2, 3, 4])), tp=draw(st.sampled_from([1, 2, 4, 8])))
    dst = DecodeLayout(num_layers=num_layers, num_kv_heads=num_kv_heads, pp=dst_pp,
                       tp=draw(st.sampled_from([1, 2, 4, 8])), block_size=draw(st.sampled_from([1, 4, 16])))
    num_tokens = draw(st.integers(min_value=1, max_value=70))
    return dict(src=src, dst=dst, num_tokens=num_tokens, seed=draw(st.integers(0, 2**16)),
                num_extra_blocks=draw(st.integers(0, 4)), is_layerwise=draw(st.booleans()),
                extra_rows=draw(st.booleans()))


@settings(max_examples=80, deadline=None, derandomize=True)
@given(transfer_cases())
def test_random_layout_pairs_deliver_bitwise_and_write_once(case):
    check_transfer(**case, count_writes=case["seed"] % 3 == 0)


# ---- misuse -------------------------------------------------------------------------------------------------------

def test_plan_refuses_mismatched_models_and_bad_block_tables():
    src = PrefillLayout(num_layers=2, num_kv_heads=4)
    with pytest.raises(ValueError, match="different models"):
        plan_transfer(src, DecodeLayout(num_layers=3, num_kv_heads=4), 5, [0])
    dst = DecodeLayout(num_layers=2, num_kv_heads=4, block_size=4)
    with pytest.raises(ValueError, match="need 3 blocks"):
        plan_transfer(src, dst, 9, [0, 1])
    with pytest.raises(ValueError, match="duplicates"):
        plan_transfer(src, dst, 9, [0, 1, 1])
    with pytest.raises(ValueError, match="non-negative"):
        plan_transfer(src, dst, 9, [0, 1, -2])
    with pytest.raises(ValueError, match="num_tokens"):
        plan_transfer(src, dst, 0, [0])


def test_pack_and_unpack_refuse_wrong_shapes_ranks_and_layers():
    src = PrefillLayout(num_layers=2, num_kv_heads=2, pp=2)
    dst = DecodeLayout(num_layers=2, num_kv_heads=2, tp=2, block_size=4)
    plan = plan_transfer(src, dst, 6, [3, 1])
    k = torch.zeros(6, 2, HEAD_DIM)
    with pytest.raises(ValueError, match="holds layers 1..1, got layers \\[0\\]"):
        pack(plan, 1, {0: (k, k)})
    with pytest.raises(ValueError, match="expected \\[>= 6 rows, 2 heads"):
        pack(plan, 0, {0: (k[:5], k[:5])})
    (dst0, messages0), (dst1, messages1) = pack(plan, 0, [(k, k)])
    assert (dst0, dst1) == (0, 1) and [m.tensor.shape for m in messages0] == [(1, 2, 6, 1, HEAD_DIM)]
    cache = [torch.zeros(4, 2, 4, 1, HEAD_DIM) for _ in range(2)]
    with pytest.raises(ValueError, match="belongs to decode rank 1, not 0"):
        unpack_into(plan, 0, messages1, cache)
    with pytest.raises(ValueError, match="is torch.float32, the cache of layer 0 is torch.float16"):
        unpack_into(plan, 0, messages0, [c.half() for c in cache])
    bad = Message(copy_index=messages0[0].copy_index, layers=range(0, 1), tensor=torch.zeros(1, 2, 5, 1, HEAD_DIM))
    with pytest.raises(ValueError, match="expected \\(1, 2, 6, 1, 3\\)"):
        unpack_into(plan, 0, [bad], cache)
    outside = Message(copy_index=messages0[0].copy_index, layers=range(1, 2), tensor=messages0[0].tensor)
    with pytest.raises(ValueError, match="not within copy"):
        unpack_into(plan, 0, [outside], cache)
    assert unpack_into(plan, 0, messages0, cache) == 2 * 6 * HEAD_DIM * 4
