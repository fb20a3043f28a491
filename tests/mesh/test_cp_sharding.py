"""Load-balanced CP sharding: chunk assignment, padding convention, positions, round trip, round-robin cache."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.cp_sharding import PADDING, shard, shard_cache, shard_plan, unshard

batches = st.integers(1, 4).flatmap(lambda num_seqs: st.tuples(
    st.lists(st.integers(1, 40), min_size=num_seqs, max_size=num_seqs),
    st.lists(st.integers(0, 30), min_size=num_seqs, max_size=num_seqs),
    st.integers(1, 5),
))


@settings(max_examples=150, deadline=None)
@given(batches)
def test_shard_then_unshard_is_the_identity(batch):
    query_lens, context_lens, cp_size = batch
    plan = shard_plan(query_lens, cp_size, context_lens=context_lens)
    x = torch.randn(sum(query_lens), 3, 2)
    parts = [shard(x, plan, rank) for rank in range(cp_size)]
    assert all(p.shape == (plan.num_local_tokens, 3, 2) for p in parts)  # same row count on every rank
    assert torch.equal(unshard(parts, plan), x)


@settings(max_examples=150, deadline=None)
@given(batches)
def test_every_token_is_held_exactly_once_with_its_true_position(batch):
    query_lens, context_lens, cp_size = batch
    plan = shard_plan(query_lens, cp_size, context_lens=context_lens)
    held = torch.cat(plan.token_indices)
    held = held[held != PADDING]
    assert sorted(held.tolist()) == list(range(sum(query_lens)))
    expected_positions = torch.cat([torch.arange(c, c + n) for n, c in zip(query_lens, context_lens)])
    expected_seqs = torch.cat([torch.full((n,), s) for s, n in enumerate(query_lens)])
    for rank in range(cp_size):
        is_real = plan.token_indices[rank] != PADDING
        indices = plan.token_indices[rank][is_real]
        assert torch.equal(plan.positions[rank][is_real], expected_positions[indices])
        assert torch.equal(plan.seq_ids[rank][is_real], expected_seqs[indices])
        assert torch.all(plan.seq_ids[rank][~is_real] == PADDING)


@settings(max_examples=150, deadline=None)
@given(batches)
def test_round_robin_cache_layout(batch):
    query_lens, context_lens, cp_size = batch
    plan = shard_plan(query_lens, cp_size, context_lens=context_lens)
    cache = torch.arange(sum(context_lens)).float()
    seq_starts = torch.tensor([0, *context_lens]).cumsum(0)
    all_rows = []
    for rank in range(cp_size):
        rows = shard_cache(cache, plan, rank).long()
        assert plan.num_cached_local(rank) == rows.numel()
        seqs, positions = plan.cached_seq_ids[rank], plan.cached_positions[rank]
        assert torch.all(positions % cp_size == rank)  # position p lives on rank p % N
        assert torch.equal(rows, seq_starts[seqs] + positions)
        order = seqs * 10_000 + positions  # ordered by sequence, then position
        assert torch.equal(order, order.sort().values)
        all_rows.append(rows)
    assert sorted(torch.cat(all_rows).tolist()) == list(range(sum(context_lens)))
    assert plan.max_cached_local - min(plan.num_cached_local(r) for r in range(cp_size)) <= len(query_lens)


def test_rank_i_holds_chunks_i_and_mirror():
    # 16 new tokens on 2 ranks: 4 chunks of 4; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
    plan = shard_plan([16], 2, context_lens=[100])
    assert plan.token_indices[0].tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert plan.token_indices[1].tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert plan.positions[1].tolist() == [104, 105, 106, 107, 108, 109, 110, 111]


def test_padding_convention_pads_each_sequence_to_a_multiple_of_2n_at_its_end():
    # 5 tokens on 2 ranks -> padded to 8 (chunks of 2): chunk 2 = [4, pad], chunk 3 = [pad, pad]. The length-1
    # sequence -> 4 slots of which only the first is real.
    plan = shard_plan([5, 1], 2, context_lens=[0, 7])
    assert plan.chunk_lens == (2, 1)
    assert plan.token_indices[0].tolist() == [0, 1, -1, -1, 5, -1]
    assert plan.token_indices[1].tolist() == [2, 3, 4, -1, -1, -1]
    assert plan.positions[0].tolist() == [0, 1, 6, 7, 7, 10]  # padding positions continue the sequence
    assert plan.seq_ids[1].tolist() == [0, 0, 0, -1, -1, -1]
    x = torch.arange(1.0, 7.0)
    assert shard(x, plan, 1).tolist() == [3.0, 4.0, 5.0, 0.0, 0.0, 0.0]  # padding rows are zeros


def test_load_balance_gives_every_rank_the_same_causal_work():
    # With T divisible by 2N, each rank's queries see the same number of causal keys in total.
    cp_size, num_new, context = 4, 64, 10
    plan = shard_plan([num_new], cp_size, context_lens=[context])
    work = [int((plan.positions[r] + 1).sum()) for r in range(cp_size)]
    assert len(set(work)) == 1
    contiguous = [sum(range(context + 1 + r * 16, context + 1 + (r + 1) * 16)) for r in range(cp_size)]
    assert max(contiguous) > 1.5 * min(contiguous)  # what the mirror pairing avoids


def test_cp_size_1_keeps_the_batch_whole_and_padded():
    plan = shard_plan([3, 4], 1)
    assert plan.token_indices[0].tolist() == [0, 1, 2, -1, 3, 4, 5, 6]
    assert plan.num_cached_local(0) == 0


@pytest.mark.parametrize("args, match", [
    (([3], 0), "cp_size"),
    (([], 2), "empty"),
    (([3, 0], 2), "new token"),
])
def test_bad_plans_raise(args, match):
    with pytest.raises(ValueError, match=match):
        shard_plan(*args)


def test_bad_context_lens_raise():
    with pytest.raises(ValueError, match="context_lens"):
        shard_plan([3, 4], 2, context_lens=[1])
    with pytest.raises(ValueError, match="context_lens"):
        shard_plan([3], 2, context_lens=[-1])


def test_shape_mismatches_raise():
    plan = shard_plan([3, 4], 2)
    with pytest.raises(ValueError, match="7 new tokens"):
        shard(torch.zeros(6), plan, 0)
    with pytest.raises(ValueError, match="CP rank 2"):
        shard(torch.zeros(7), plan, 2)
    with pytest.raises(ValueError, match="per-rank"):
        unshard([torch.zeros(plan.num_local_tokens)], plan)
    with pytest.raises(ValueError, match="rows"):
        unshard([torch.zeros(3), torch.zeros(3)], plan)
    with pytest.raises(ValueError, match="context_lens sum"):
        shard_cache(torch.zeros(2), plan, 0)
