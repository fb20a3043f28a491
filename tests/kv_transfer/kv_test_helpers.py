"""Shared by the kv_transfer tests (and the UCX peer process): deterministic KV, caches, bounded asyncio runs."""

from __future__ import annotations

import asyncio
import random

import torch

from kv_transfer.layout import gather_kv, num_blocks_for

SENTINEL = 123.25  # what untouched cache blocks hold
NUM_HEADS = 2
HEAD_DIM = 4


def make_kv(seed: int, num_layers: int, num_tokens: int, num_heads: int = NUM_HEADS, head_dim: int = HEAD_DIM,
            dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (k, v), each [num_tokens, heads, head_dim]; the same seed gives the same bits in any process."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(num_tokens, num_heads, head_dim, generator=generator).to(dtype),
            torch.randn(num_tokens, num_heads, head_dim, generator=generator).to(dtype),
        )
        for _ in range(num_layers)
    ]


def make_cache(num_layers: int, num_blocks: int, block_size: int, num_heads: int = NUM_HEADS,
               head_dim: int = HEAD_DIM, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    return [torch.full((num_blocks, 2, block_size, num_heads, head_dim), SENTINEL, dtype=dtype) for _ in range(num_layers)]


def shuffled_block_sets(seed: int, num_blocks: int, sizes: list[int]) -> list[list[int]]:
    """Disjoint, shuffled block tables (some neighbours stay consecutive, so runs of several blocks occur)."""
    rng = random.Random(seed)
    pool = list(range(num_blocks))
    rng.shuffle(pool)
    # Re-sort short stretches so the tables mix multi-block runs and isolated blocks.
    for start in range(0, len(pool), 5):
        if rng.random() < 0.5:
            pool[start : start + 3] = sorted(pool[start : start + 3])
    tables, offset = [], 0
    for size in sizes:
        tables.append(pool[offset : offset + size])
        offset += size
    assert offset <= num_blocks
    return tables


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return num_blocks_for(num_tokens, block_size)


def assert_kv_landed(cache: list[torch.Tensor], block_ids: list[int], num_tokens: int,
                     kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for layer, (k, v) in enumerate(kv):
        got_k, got_v = gather_kv(cache[layer], block_ids, num_tokens)
        assert torch.equal(got_k, k), f"layer {layer}: K differs"
        assert torch.equal(got_v, v), f"layer {layer}: V differs"


def assert_untouched(cache: list[torch.Tensor], block_ids: list[int]) -> None:
    for layer, tensor in enumerate(cache):
        blocks = tensor[sorted(block_ids)]
        assert torch.all(blocks == SENTINEL), f"layer {layer}: a block outside every reservation was written"


def run_bounded(coroutine, timeout_s: float):
    """asyncio.run with a hard bound, so a hang fails the test instead of stalling the suite."""
    return asyncio.run(asyncio.wait_for(coroutine, timeout_s))
