"""Load-balanced context-parallel sharding of one packed prefill step (the CP paper's 2N-chunk layout).

Who calls it: the prefill rank actors, once per step, after rank 0 has broadcast the step's `query_lens` and
`context_lens`. Every rank builds the same `CPShardPlan` (a pure function of those lists and `cp_size`), so every
rank knows which tokens every other rank holds without any communication; `mesh.ring_attention` relies on this to
mask the KV blocks and Q blocks that visit it.

New tokens (load-balanced, with padding). With `cp_size = N`, the new tokens of each sequence are split into 2N
equal chunks and rank i holds chunks i and 2N-1-i. Under a causal mask the early chunks are cheap and the late ones
expensive, so pairing chunk i with its mirror gives every rank the same attention work. When a sequence's new-token
count L does not divide by 2N, the sequence is padded at its end to `ceil(L / 2N) * 2N` slots; padding slots are
rows of the shard like any other (every rank therefore holds exactly the same number of rows, which keeps ring
buffers and all-to-all splits equal), but their `token_indices` entry is -1 and their `seq_ids` entry is -1, so
attention never uses them as keys, their own attention output is zero, and `unshard` drops them. `shard` fills
them with zeros. Their `positions` continue the sequence (context_len + offset) so that rotary embedding on them is
well defined; nothing reads the result.

Rows of a rank's shard are ordered: sequence 0's chunk i, sequence 0's chunk 2N-1-i, sequence 1's chunk i, ...

Cached prefix (round-robin). The KV of a sequence's first `context_len` tokens (a cache hit, or the earlier part of
a chunked prefill) is distributed round-robin: position p of a sequence lives on rank p % N. We pick round-robin
over "wherever an earlier CP step computed it" because it depends only on (context_len, N): it stays valid as the
cache grows step after step (a multi-turn prefix is the union of several earlier steps, each with its own 2N-chunk
split), and it balances cache memory and cache attention work within one token per sequence. The price is that
after a CP prefill the new K/V rows must be sent to their round-robin owner before they join the cache. A rank's
cached rows are ordered by sequence, then by position, with no padding: rank r holds positions r, r+N, r+2N, ...
of sequence 0, then of sequence 1, ...
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PADDING = -1  # token_indices / cached_indices / seq_ids value of a row that holds no token


@dataclass(frozen=True, kw_only=True, eq=False)
class CPShardPlan:
    """Which rows every CP rank holds for one step. All tensors are int64 on the CPU; per-rank tuples are
    indexed by CP rank (the rank inside the CP group, 0..cp_size-1).

    New tokens, per rank, each of length `num_local_tokens` (the same on every rank):
      token_indices[r]: packed row of the step's [T, ...] tensors, or PADDING.
      positions[r]: position inside its sequence (context_len + offset), also defined on padding rows.
      seq_ids[r]: sequence index, or PADDING (-1) on padding rows.
    Cached prefix, per rank, of length `num_cached_local(r)` (round-robin, no padding):
      cached_indices[r]: row of the packed cache tensor [sum(context_lens), ...] (sequence 0's prefix first).
      cached_positions[r], cached_seq_ids[r]: position and sequence of each cached row.
    """

    cp_size: int
    query_lens: tuple[int, ...]
    context_lens: tuple[int, ...]
    chunk_lens: tuple[int, ...]  # per sequence: padded new-token count / (2 * cp_size)
    token_indices: tuple[torch.Tensor, ...]
    positions: tuple[torch.Tensor, ...]
    seq_ids: tuple[torch.Tensor, ...]
    cached_indices: tuple[torch.Tensor, ...]
    cached_positions: tuple[torch.Tensor, ...]
    cached_seq_ids: tuple[torch.Tensor, ...]

    @property
    def num_tokens(self) -> int:
        """T: the step's new tokens, unpadded, over all sequences."""
        return sum(self.query_lens)

    @property
    def num_cached_tokens(self) -> int:
        return sum(self.context_lens)

    @property
    def num_local_tokens(self) -> int:
        """Rows (padding included) of every rank's new-token shard."""
        return 2 * sum(self.chunk_lens)

    def num_cached_local(self, rank: int) -> int:
        return self.cached_indices[self._check_rank(rank)].numel()

    @property
    def max_cached_local(self) -> int:
        return max(self.num_cached_local(r) for r in range(self.cp_size))

    def _check_rank(self, rank: int) -> int:
        if not 0 <= rank < self.cp_size:
            raise ValueError(f"CP rank {rank} is outside 0..{self.cp_size - 1}")
        return rank


def shard_plan(query_lens: list[int], cp_size: int, *, context_lens: list[int] | None = None) -> CPShardPlan:
    """The load-balanced plan for new tokens `query_lens` (packed in order) on `cp_size` ranks; `context_lens[i]`
    tokens of sequence i are already cached (round-robin over the ranks) and its new tokens start at that position.
    """
    query_lens, context_lens = _validate(query_lens, cp_size, context_lens)
    num_chunks = 2 * cp_size
    chunk_lens = tuple(-(-n // num_chunks) for n in query_lens)
    seq_starts = _exclusive_cumsum(query_lens)

    token_indices, positions, seq_ids = [], [], []
    for rank in range(cp_size):
        rank_indices, rank_positions, rank_seqs = [], [], []
        for seq, (num_new, context, chunk, start) in enumerate(zip(query_lens, context_lens, chunk_lens, seq_starts)):
            for chunk_index in (rank, num_chunks - 1 - rank):
                offsets = torch.arange(chunk_index * chunk, (chunk_index + 1) * chunk)
                is_real = offsets < num_new
                rank_indices.append(torch.where(is_real, offsets + start, PADDING))
                rank_positions.append(offsets + context)
                rank_seqs.append(torch.where(is_real, seq, PADDING))
        token_indices.append(_cat_long(rank_indices))
        positions.append(_cat_long(rank_positions))
        seq_ids.append(_cat_long(rank_seqs))

    cached_indices, cached_positions, cached_seq_ids = [], [], []
    cache_starts = _exclusive_cumsum(context_lens)
    for rank in range(cp_size):
        # Positions rank, rank + N, ... below context_len (none when the prefix is shorter than rank + 1).
        rank_positions = [torch.arange(rank, max(context, rank), cp_size) for context in context_lens]
        cached_positions.append(_cat_long(rank_positions))
        cached_indices.append(_cat_long([p + start for p, start in zip(rank_positions, cache_starts)]))
        cached_seq_ids.append(_cat_long([torch.full((p.numel(),), seq) for seq, p in enumerate(rank_positions)]))

    return CPShardPlan(
        cp_size=cp_size, query_lens=query_lens, context_lens=context_lens, chunk_lens=chunk_lens,
        token_indices=tuple(token_indices), positions=tuple(positions), seq_ids=tuple(seq_ids),
        cached_indices=tuple(cached_indices), cached_positions=tuple(cached_positions),
        cached_seq_ids=tuple(cached_seq_ids),
    )


def shard(x: torch.Tensor, plan: CPShardPlan, rank: int) -> torch.Tensor:
    """Rank `rank`'s rows of the step's packed tensor `x` [T, ...] -> [num_local_tokens, ...]; padding rows are
    zeros."""
    if x.shape[0] != plan.num_tokens:
        raise ValueError(f"shard: x has {x.shape[0]} rows but the plan packs {plan.num_tokens} new tokens")
    return _gather_rows(x, plan.token_indices[plan._check_rank(rank)])


def unshard(per_rank: list[torch.Tensor], plan: CPShardPlan) -> torch.Tensor:
    """Inverse of `shard`: the outputs of every rank, in CP-rank order, each [num_local_tokens, ...], back to the
    packed [T, ...] tensor (padding rows dropped)."""
    if len(per_rank) != plan.cp_size:
        raise ValueError(f"unshard: got {len(per_rank)} per-rank tensors for cp_size {plan.cp_size}")
    first = per_rank[0]
    out = first.new_empty((plan.num_tokens, *first.shape[1:]))
    for rank, part in enumerate(per_rank):
        if part.shape[0] != plan.num_local_tokens:
            raise ValueError(
                f"unshard: rank {rank} gave {part.shape[0]} rows, the plan gives each rank {plan.num_local_tokens}"
            )
        indices = plan.token_indices[rank].to(part.device)
        is_real = indices != PADDING
        out[indices[is_real]] = part[is_real]
    return out


def shard_cache(cached_x: torch.Tensor, plan: CPShardPlan, rank: int) -> torch.Tensor:
    """Rank `rank`'s round-robin rows of a packed cached-prefix tensor [sum(context_lens), ...] (sequence 0's
    prefix first) -> [num_cached_local(rank), ...]."""
    if cached_x.shape[0] != plan.num_cached_tokens:
        raise ValueError(
            f"shard_cache: cached_x has {cached_x.shape[0]} rows but context_lens sum to {plan.num_cached_tokens}"
        )
    return cached_x[plan.cached_indices[plan._check_rank(rank)].to(cached_x.device)]


def _gather_rows(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    indices = indices.to(x.device)
    is_real = (indices != PADDING).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(is_real, x[indices.clamp(min=0)], torch.zeros((), dtype=x.dtype, device=x.device))


def _validate(query_lens: list[int], cp_size: int,
              context_lens: list[int] | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if not isinstance(cp_size, int) or isinstance(cp_size, bool) or cp_size < 1:
        raise ValueError(f"shard_plan: cp_size must be an integer >= 1, got {cp_size!r}")
    if len(query_lens) == 0:
        raise ValueError("shard_plan: query_lens is empty; a step needs at least one sequence")
    if any(int(n) < 1 for n in query_lens):
        raise ValueError(f"shard_plan: every sequence needs >= 1 new token, got query_lens={list(query_lens)}")
    if context_lens is None:
        context_lens = [0] * len(query_lens)
    if len(context_lens) != len(query_lens):
        raise ValueError(
            f"shard_plan: {len(query_lens)} query_lens but {len(context_lens)} context_lens (one per sequence)"
        )
    if any(int(n) < 0 for n in context_lens):
        raise ValueError(f"shard_plan: context_lens must be >= 0, got {list(context_lens)}")
    return tuple(int(n) for n in query_lens), tuple(int(n) for n in context_lens)


def _exclusive_cumsum(values: tuple[int, ...]) -> list[int]:
    starts, total = [], 0
    for v in values:
        starts.append(total)
        total += v
    return starts


def _cat_long(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts).long() if parts else torch.zeros(0, dtype=torch.long)
