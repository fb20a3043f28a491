"""The chunking rule both sides follow (pure functions): runs of consecutive blocks, padded last block."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kv_transfer.layout import Chunk, chunk_plan, chunk_views, gather_kv, num_blocks_for, pack_chunks


def test_consecutive_ids_form_one_chunk_per_run():
    chunks = chunk_plan([4, 5, 6, 9, 10, 2], num_tokens=22, block_size=4)
    assert chunks == (
        Chunk(first_block=4, num_blocks=3, token_start=0, token_end=12),
        Chunk(first_block=9, num_blocks=2, token_start=12, token_end=20),
        Chunk(first_block=2, num_blocks=1, token_start=20, token_end=22),
    )


def test_descending_neighbours_are_separate_runs_and_extra_blocks_are_ignored():
    # 7 then 6 is not a run (the run must grow upwards in memory); blocks beyond the prompt are for decoding.
    chunks = chunk_plan([7, 6, 8, 9], num_tokens=5, block_size=4)
    assert chunks == (
        Chunk(first_block=7, num_blocks=1, token_start=0, token_end=4),
        Chunk(first_block=6, num_blocks=1, token_start=4, token_end=5),
    )


@pytest.mark.parametrize(
    "block_ids, num_tokens, block_size, message",
    [
        ([1, 2], 9, 4, "need 3 blocks"),
        ([1, 1, 2], 9, 4, "duplicates"),
        ([1, -2, 3], 9, 4, "non-negative"),
        ([1, 2], 0, 4, "num_tokens must be positive"),
        ([1, 2], 3, 0, "block_size must be positive"),
    ],
)
def test_invalid_plans_are_refused_with_a_clear_message(block_ids, num_tokens, block_size, message):
    with pytest.raises(ValueError, match=message):
        chunk_plan(block_ids, num_tokens, block_size)


@settings(max_examples=200, deadline=None)
@given(
    num_blocks_total=st.integers(1, 64),
    block_size=st.integers(1, 8),
    data=st.data(),
)
def test_plan_covers_every_token_once_in_its_block(num_blocks_total, block_size, data):
    num_tokens = data.draw(st.integers(1, num_blocks_total * block_size))
    block_ids = data.draw(st.permutations(list(range(num_blocks_total))))
    num_used = num_blocks_for(num_tokens, block_size)
    chunks = chunk_plan(block_ids, num_tokens, block_size)

    # Tokens: contiguous, in order, each chunk starts on a block boundary, the last one ends at num_tokens.
    assert chunks[0].token_start == 0 and chunks[-1].token_end == num_tokens
    for before, after in zip(chunks, chunks[1:]):
        assert before.token_end == after.token_start
        assert after.first_block != before.block_end  # maximal runs: a split always means a gap
    # Blocks: each chunk is a run of consecutive ids that matches the block table position by position.
    position = 0
    for chunk in chunks:
        assert list(range(chunk.first_block, chunk.block_end)) == list(block_ids[position : position + chunk.num_blocks])
        assert chunk.token_start == position * block_size
        assert chunk.num_tokens <= chunk.num_blocks * block_size
        position += chunk.num_blocks
    assert position == num_used


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31), block_size=st.integers(1, 6), num_tokens=st.integers(1, 40))
def test_pack_then_receive_into_views_rebuilds_kv_and_touches_only_its_blocks(seed, block_size, num_tokens):
    rng = random.Random(seed)
    num_heads, head_dim = 2, 3
    num_blocks_total = num_blocks_for(num_tokens, block_size) + 5
    block_ids = rng.sample(range(num_blocks_total), num_blocks_for(num_tokens, block_size))
    generator = torch.Generator().manual_seed(seed)
    k = torch.randn(num_tokens, num_heads, head_dim, generator=generator)
    v = torch.randn(num_tokens, num_heads, head_dim, generator=generator)
    cache = torch.full((num_blocks_total, 2, block_size, num_heads, head_dim), 7.0)

    chunks = chunk_plan(block_ids, num_tokens, block_size)
    packed = pack_chunks(k, v, chunks, block_size)
    views = chunk_views(cache, chunks)
    for view, message in zip(views, packed):
        assert view.shape == message.shape and view.is_contiguous() and message.is_contiguous()
        assert view.data_ptr() >= cache.data_ptr()  # a view into the cache, not a copy
        view.copy_(message)

    got_k, got_v = gather_kv(cache, block_ids, num_tokens)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    untouched = sorted(set(range(num_blocks_total)) - set(block_ids))
    assert torch.all(cache[untouched] == 7.0)
    # Padding rows of the last block arrive as zeros (decode overwrites them with generated tokens).
    remainder = num_tokens % block_size
    if remainder:
        assert torch.all(cache[block_ids[-1], :, remainder:] == 0)


def test_pack_refuses_mismatched_tokens():
    chunks = chunk_plan([0, 1], num_tokens=6, block_size=4)
    with pytest.raises(ValueError, match="carry 5 tokens"):
        pack_chunks(torch.zeros(5, 1, 2), torch.zeros(5, 1, 2), chunks, 4)


def test_views_refuse_a_non_contiguous_cache():
    cache = torch.zeros(8, 2, 4, 3, 2).transpose(3, 4)
    with pytest.raises(ValueError, match="contiguous"):
        chunk_views(cache, chunk_plan([0], 2, 4))
