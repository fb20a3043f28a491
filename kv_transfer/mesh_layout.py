"""Where each KV element of one request lives on a whole replica: which rank holds which layers (PP), which KV
heads (TP, possibly replicated) and, on a prefill replica, which token rows (CP).

Pure functions and frozen layouts; no tensors move here. `kv_transfer.plan` builds transfer plans from a pair of
layouts, and tests use the same queries to rebuild what each rank holds.

Rank layout (the one `mesh.parallel.MeshShape` defines): axes (pp, cp, tp), tp fastest,
`rank = (pp_rank * cp + cp_rank) * tp + tp_rank`. A decode replica has cp = 1.

- Layers: `stage_layer_ranges(num_layers, pp)`: contiguous and balanced; when pp does not divide num_layers the
  first `num_layers % pp` stages hold one layer more.
- KV heads: when tp <= num_kv_heads, tp rank t holds heads [t * H / tp, (t + 1) * H / tp); when tp > H, each head
  is replicated on tp / H consecutive ranks and rank t holds head t // (tp / H) (`mesh.model.Attention`'s rule).
- Tokens (prefill CP): one sequence of `num_tokens` tokens (no cached prefix) is split into 2N equal chunks,
  padded at the end, and CP rank i holds chunks i and 2N-1-i (`mesh.cp_sharding.shard_plan`). Its local K/V rows,
  as the model's layer hook emits them, are chunk i then chunk 2N-1-i, padding rows included. With cp = 1 nothing
  is sharded: row p is token p.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import NamedTuple

import torch

from mesh.cp_sharding import PADDING, shard_plan
from mesh.parallel import MeshShape


class TokenRun(NamedTuple):
    """`length` consecutive tokens of a sequence, starting at position `token_start`, held in consecutive rows of
    a prefill rank's local K/V starting at `src_row`."""

    src_row: int
    token_start: int
    length: int


def stage_layer_ranges(num_layers: int, pp: int) -> tuple[range, ...]:
    """The contiguous layer range of every pipeline stage; the first `num_layers % pp` stages get one extra."""
    _check_positive("num_layers", num_layers)
    _check_positive("pp", pp)
    if pp > num_layers:
        raise ValueError(f"pp={pp} stages cannot split {num_layers} layers; use pp <= {num_layers}")
    base, extra = divmod(num_layers, pp)
    ranges, start = [], 0
    for stage in range(pp):
        size = base + (1 if stage < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return tuple(ranges)


def tp_head_range(num_kv_heads: int, tp: int, tp_rank: int) -> range:
    """Global KV heads held by tensor-parallel rank `tp_rank` (one head when heads are replicated)."""
    _check_head_split(num_kv_heads, tp)
    if not 0 <= tp_rank < tp:
        raise ValueError(f"tp rank {tp_rank} is outside 0..{tp - 1}")
    if tp <= num_kv_heads:
        per_rank = num_kv_heads // tp
        return range(tp_rank * per_rank, (tp_rank + 1) * per_rank)
    head = tp_rank // (tp // num_kv_heads)
    return range(head, head + 1)


def tp_head_holders(num_kv_heads: int, tp: int, head: int) -> range:
    """The tp ranks that hold KV head `head` (more than one when tp > num_kv_heads)."""
    _check_head_split(num_kv_heads, tp)
    if not 0 <= head < num_kv_heads:
        raise ValueError(f"KV head {head} is outside 0..{num_kv_heads - 1}")
    if tp <= num_kv_heads:
        holder = head // (num_kv_heads // tp)
        return range(holder, holder + 1)
    replicas = tp // num_kv_heads
    return range(head * replicas, (head + 1) * replicas)


@dataclass(frozen=True, kw_only=True)
class PrefillLayout:
    """One prefill replica's mesh as far as KV placement goes. Ranks are replica-local (0..world_size-1)."""

    num_layers: int
    num_kv_heads: int
    pp: int = 1
    cp: int = 1
    tp: int = 1

    def __post_init__(self) -> None:
        _validate_common(self, "PrefillLayout")
        _check_positive("PrefillLayout.cp", self.cp)

    @cached_property
    def shape(self) -> MeshShape:
        return MeshShape(tp=self.tp, cp=self.cp, pp=self.pp)

    @property
    def world_size(self) -> int:
        return self.pp * self.cp * self.tp

    def coords(self, rank: int) -> dict[str, int]:
        return self.shape.coords(rank)

    def rank_of(self, *, pp: int, cp: int, tp: int) -> int:
        return self.shape.rank_of(pp=pp, cp=cp, tp=tp)

    def layer_range(self, rank: int) -> range:
        return stage_layer_ranges(self.num_layers, self.pp)[self.coords(rank)["pp"]]

    def head_range(self, rank: int) -> range:
        return tp_head_range(self.num_kv_heads, self.tp, self.coords(rank)["tp"])

    def head_holders(self, head: int) -> range:
        """tp ranks (not mesh ranks) holding `head`."""
        return tp_head_holders(self.num_kv_heads, self.tp, head)

    def num_local_rows(self, num_tokens: int) -> int:
        """Rows of every CP rank's local K/V for one sequence of `num_tokens` tokens (padding included; cp = 1
        does not shard, so no padding)."""
        _check_positive("num_tokens", num_tokens)
        return num_tokens if self.cp == 1 else 2 * -(-num_tokens // (2 * self.cp))

    def packed_row_starts(self, query_lens: Sequence[int]) -> list[int]:
        """Where each sequence's rows begin in a packed step's local K/V (the same on every rank): slice
        `kv[start:start + num_local_rows(T)]` to get one sequence's rows for `kv_transfer.plan.pack`."""
        starts, total = [], 0
        for num_tokens in query_lens:
            starts.append(total)
            total += self.num_local_rows(num_tokens)
        return starts

    def token_positions(self, rank: int, num_tokens: int) -> torch.Tensor:
        """Position of each local K/V row of `rank` for one sequence (PADDING = -1 on padding rows), int64."""
        _check_positive("num_tokens", num_tokens)
        return _cp_positions(num_tokens, self.cp, self.coords(rank)["cp"]).clone()

    def token_runs(self, rank: int, num_tokens: int) -> tuple[TokenRun, ...]:
        """The real tokens of `rank`'s local rows as maximal runs (consecutive rows holding consecutive positions),
        in row order."""
        _check_positive("num_tokens", num_tokens)
        return _cp_runs(num_tokens, self.cp, self.coords(rank)["cp"])


@dataclass(frozen=True, kw_only=True)
class DecodeLayout:
    """One decode replica's mesh (pp x tp; no CP) and its paged-cache block size. Ranks are replica-local."""

    num_layers: int
    num_kv_heads: int
    pp: int = 1
    tp: int = 1
    block_size: int = 16

    def __post_init__(self) -> None:
        _validate_common(self, "DecodeLayout")
        _check_positive("DecodeLayout.block_size", self.block_size)

    @cached_property
    def shape(self) -> MeshShape:
        return MeshShape(tp=self.tp, pp=self.pp)

    @property
    def world_size(self) -> int:
        return self.pp * self.tp

    def coords(self, rank: int) -> dict[str, int]:
        return self.shape.coords(rank)

    def rank_of(self, *, pp: int, tp: int) -> int:
        return self.shape.rank_of(pp=pp, cp=0, tp=tp)

    def layer_range(self, rank: int) -> range:
        return stage_layer_ranges(self.num_layers, self.pp)[self.coords(rank)["pp"]]

    def head_range(self, rank: int) -> range:
        return tp_head_range(self.num_kv_heads, self.tp, self.coords(rank)["tp"])

    def head_holders(self, head: int) -> range:
        """tp ranks (not mesh ranks) holding `head`."""
        return tp_head_holders(self.num_kv_heads, self.tp, head)


@lru_cache(maxsize=256)
def _cp_positions(num_tokens: int, cp: int, cp_rank: int) -> torch.Tensor:
    # Delegates to the model's own sharding rule so the two can never drift apart; cp = 1 does not shard (the
    # model emits the sequence's rows in order, unpadded). Cached: plans for the same prompt length on the same
    # mesh are common; callers get a clone or a derived tuple, never this tensor.
    if cp == 1:
        return torch.arange(num_tokens, dtype=torch.long)
    return shard_plan([num_tokens], cp).token_indices[cp_rank]


@lru_cache(maxsize=256)
def _cp_runs(num_tokens: int, cp: int, cp_rank: int) -> tuple[TokenRun, ...]:
    positions = _cp_positions(num_tokens, cp, cp_rank)
    rows = torch.nonzero(positions != PADDING).flatten()
    if rows.numel() == 0:
        return ()
    real = positions[rows]
    # A run breaks where either the row or the position does not follow the previous one.
    breaks = torch.nonzero((rows[1:] != rows[:-1] + 1) | (real[1:] != real[:-1] + 1)).flatten() + 1
    starts = [0, *breaks.tolist()]
    ends = [*breaks.tolist(), rows.numel()]
    return tuple(TokenRun(int(rows[s]), int(real[s]), e - s) for s, e in zip(starts, ends))


def _validate_common(layout: PrefillLayout | DecodeLayout, name: str) -> None:
    _check_positive(f"{name}.num_layers", layout.num_layers)
    _check_positive(f"{name}.num_kv_heads", layout.num_kv_heads)
    _check_positive(f"{name}.pp", layout.pp)
    _check_positive(f"{name}.tp", layout.tp)
    if layout.pp > layout.num_layers:
        raise ValueError(f"{name}: pp={layout.pp} is larger than num_layers={layout.num_layers}; use pp <= "
                         f"{layout.num_layers}")
    _check_head_split(layout.num_kv_heads, layout.tp, name)


def _check_head_split(num_kv_heads: int, tp: int, name: str = "layout") -> None:
    if tp <= num_kv_heads and num_kv_heads % tp != 0:
        raise ValueError(f"{name}: tp={tp} does not divide num_kv_heads={num_kv_heads}")
    if tp > num_kv_heads and tp % num_kv_heads != 0:
        raise ValueError(f"{name}: tp={tp} is larger than num_kv_heads={num_kv_heads} but not a multiple of it, "
                         "so heads cannot be replicated evenly")


def _check_positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
