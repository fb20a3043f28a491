"""Where one request's KV lives on the decode side, and how it is cut into messages.

The decode replica's paged cache is one tensor per layer, `[num_blocks, 2, block_size, num_kv_heads, head_dim]`
(index 1: 0 = K, 1 = V); token `p` of a request lives in block `block_ids[p // block_size]`, row
`p % block_size`. A run of consecutive block ids is one contiguous slice of that tensor, so each run is sent as
one message and received straight into the cache (no staging on the decode side).

`chunk_plan` is the single rule both sides follow: the receiver posts one destination view per chunk
(`chunk_views`), the sender packs exactly matching tensors (`pack_chunks`). Both are pure functions.
Only one rank on each side for now (issue 2); the transfer plan between unequal meshes grows here (issue 4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class Chunk:
    """One message of one layer: a run of consecutive destination blocks and the prompt tokens it carries.

    `token_end - token_start` tokens fill the run from its first row; the rows after `token_end` in the last
    block are padding (zeros on the wire).
    """

    first_block: int
    num_blocks: int
    token_start: int
    token_end: int

    def __post_init__(self) -> None:
        if self.first_block < 0 or self.num_blocks <= 0:
            raise ValueError(f"bad chunk: first_block={self.first_block}, num_blocks={self.num_blocks}")
        if not 0 <= self.token_start < self.token_end:
            raise ValueError(f"bad chunk token range [{self.token_start}, {self.token_end})")

    @property
    def block_end(self) -> int:
        return self.first_block + self.num_blocks

    @property
    def num_tokens(self) -> int:
        return self.token_end - self.token_start


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` tokens (the last one possibly partly filled)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    return -(-num_tokens // block_size)


def chunk_plan(block_ids: Sequence[int], num_tokens: int, block_size: int) -> tuple[Chunk, ...]:
    """Cut the first `num_tokens` tokens of a request into runs of consecutive destination blocks.

    `block_ids` is the request's block table; it may be longer than needed (the decode side also reserves
    room for generated tokens): only the first `ceil(num_tokens / block_size)` blocks are part of the plan.
    """
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    num_needed = num_blocks_for(num_tokens, block_size)
    if len(block_ids) < num_needed:
        raise ValueError(
            f"{num_tokens} tokens need {num_needed} blocks of {block_size}, but only {len(block_ids)} block ids given"
        )
    if len(set(block_ids)) != len(block_ids):
        raise ValueError("block_ids contains duplicates")
    if any(int(b) != b or b < 0 for b in block_ids):
        raise ValueError(f"block ids must be non-negative integers, got {list(block_ids)}")

    chunks: list[Chunk] = []
    run_start = 0  # index into block_ids of the current run's first block
    for index in range(1, num_needed + 1):
        is_run_end = index == num_needed or block_ids[index] != block_ids[index - 1] + 1
        if not is_run_end:
            continue
        chunks.append(
            Chunk(
                first_block=int(block_ids[run_start]),
                num_blocks=index - run_start,
                token_start=run_start * block_size,
                token_end=min(index * block_size, num_tokens),
            )
        )
        run_start = index
    return tuple(chunks)


def chunk_views(layer_cache: torch.Tensor, chunks: Sequence[Chunk]) -> list[torch.Tensor]:
    """Receiver side: the contiguous slices of one layer's cache that the chunks land in (views, no copy)."""
    if layer_cache.dim() != 5 or layer_cache.shape[1] != 2:
        raise ValueError(
            f"layer cache must be [num_blocks, 2, block_size, heads, head_dim], got {tuple(layer_cache.shape)}"
        )
    if not layer_cache.is_contiguous():
        raise ValueError("layer cache must be contiguous so that a run of blocks is one contiguous slice")
    num_blocks = layer_cache.shape[0]
    views = []
    for chunk in chunks:
        if chunk.block_end > num_blocks:
            raise ValueError(f"chunk blocks [{chunk.first_block}, {chunk.block_end}) outside cache of {num_blocks}")
        views.append(layer_cache[chunk.first_block : chunk.block_end])
    return views


def pack_chunks(k: torch.Tensor, v: torch.Tensor, chunks: Sequence[Chunk], block_size: int) -> list[torch.Tensor]:
    """Sender side: lay one layer's K and V (`[num_tokens, heads, head_dim]` each) out as the chunks'
    `[num_blocks, 2, block_size, heads, head_dim]` tensors, zero-padded after the last token.

    Returns new contiguous tensors on k's device (the sender keeps them alive until their send completes).
    """
    if k.shape != v.shape or k.dim() != 3:
        raise ValueError(f"k and v must both be [num_tokens, heads, head_dim], got {tuple(k.shape)}, {tuple(v.shape)}")
    if k.dtype != v.dtype or k.device != v.device:
        raise ValueError("k and v must share dtype and device")
    num_tokens, num_heads, head_dim = k.shape
    if chunks and chunks[-1].token_end != num_tokens:
        raise ValueError(f"k/v carry {num_tokens} tokens but the plan covers {chunks[-1].token_end}")
    packed = []
    for chunk in chunks:
        out = k.new_empty((chunk.num_blocks, 2, block_size, num_heads, head_dim))
        num_full = chunk.num_tokens // block_size
        remainder = chunk.num_tokens - num_full * block_size
        for side, source in ((0, k), (1, v)):
            tokens = source[chunk.token_start : chunk.token_end]
            if num_full:
                out[:num_full, side] = tokens[: num_full * block_size].reshape(num_full, block_size, num_heads, head_dim)
            if remainder:
                out[num_full, side, :remainder] = tokens[num_full * block_size :]
                out[num_full, side, remainder:] = 0
        packed.append(out)
    return packed


def gather_kv(layer_cache: torch.Tensor, block_ids: Sequence[int], num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a request's first `num_tokens` tokens of K and V back out of one layer's paged cache.

    The inverse of the transfer, used by tests and debugging: returns copies `[num_tokens, heads, head_dim]`.
    """
    block_size = layer_cache.shape[2]
    num_needed = num_blocks_for(num_tokens, block_size)
    index = torch.as_tensor(list(block_ids[:num_needed]), dtype=torch.long, device=layer_cache.device)
    blocks = layer_cache.index_select(0, index)  # [n, 2, block_size, H, D]
    k = blocks[:, 0].reshape(-1, *blocks.shape[3:])[:num_tokens]
    v = blocks[:, 1].reshape(-1, *blocks.shape[3:])[:num_tokens]
    return k.clone(), v.clone()
