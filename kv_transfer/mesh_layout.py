"""Where each KV element of one request lives on a whole replica: which rank holds which layers (PP), which KV
heads (TP, possibly replicated) and, on a prefill replica, which token rows (CP).

Pure functions and frozen layouts; no tensors move here. `kv_transfer.plan` builds transfer plans from a pair of
layouts, and tests use the same queries to rebuild what each rank holds. Each rule delegates to the mesh's own
(the model takes its layers and heads from the same functions), so the planner and the model cannot disagree:

- Rank layout (`mesh.parallel.MeshShape`): axes (pp, cp, tp), tp fastest, `rank = (pp_rank * cp + cp_rank) * tp
  + tp_rank`. A decode replica has cp = 1 here.
- Layers (`mesh.parallel.stage_layer_range`): contiguous and balanced; when pp does not divide num_layers the
  first `num_layers % pp` stages hold one layer more.
- KV heads (`mesh.kv_layout.kv_head_range`): when tp <= num_kv_heads, tp rank t holds heads [t * H / tp,
  (t + 1) * H / tp); when tp > H, each head is replicated on tp / H consecutive ranks and rank t holds head
  t // (tp / H).
- Tokens (prefill CP, `mesh.cp_sharding.shard_plan`): one fresh sequence of `num_tokens` tokens is split into 2N
  equal chunks, padded at the end, and CP rank i holds chunks i and 2N-1-i. The rank's K/V rows are what its
  layer hook receives: the real rows of chunk i then of chunk 2N-1-i, padding dropped (`mesh.context_parallel.
  CPHookRows`). Padding only ever trails a sequence, so a row index is the same with or without it. With cp = 1
  nothing is sharded: row p is token p.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import TYPE_CHECKING, NamedTuple

import torch

from mesh.cp_sharding import PADDING, shard_plan
from mesh.kv_layout import kv_head_range
from mesh.parallel import MeshShape, stage_layer_range

if TYPE_CHECKING:
    from mesh.config import ModelConfig


class TokenRun(NamedTuple):
    """`length` consecutive tokens of a sequence, starting at position `token_start`, held in consecutive rows of
    a prefill rank's local K/V starting at `src_row`."""

    src_row: int
    token_start: int
    length: int


def stage_layer_ranges(num_layers: int, pp: int) -> tuple[range, ...]:
    """The contiguous layer range of every pipeline stage (the mesh's rule: the first `num_layers % pp` stages
    hold one layer more)."""
    _check_positive("num_layers", num_layers)
    _check_positive("pp", pp)
    if pp > num_layers:
        raise ValueError(f"pp={pp} stages cannot split {num_layers} layers; use pp <= {num_layers}")
    return tuple(stage_layer_range(num_layers, pp, stage) for stage in range(pp))


def tp_head_range(num_kv_heads: int, tp: int, tp_rank: int) -> range:
    """Global KV heads held by tensor-parallel rank `tp_rank` (one head when heads are replicated)."""
    _check_head_split(num_kv_heads, tp)
    if not 0 <= tp_rank < tp:
        raise ValueError(f"tp rank {tp_rank} is outside 0..{tp - 1}")
    return kv_head_range(num_kv_heads, tp, tp_rank)


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

    def token_positions(self, rank: int, num_tokens: int) -> torch.Tensor:
        """Position in the sequence of each of `rank`'s K/V rows for one fresh sequence (int64, a new tensor):
        what `CPHookRows.positions` holds on a one-sequence CP step, `arange(num_tokens)` when cp = 1."""
        _check_positive("num_tokens", num_tokens)
        return _cp_positions(num_tokens, self.cp, self.coords(rank)["cp"]).clone()

    def num_local_rows(self, rank: int, num_tokens: int) -> int:
        """How many K/V rows `rank` holds for one fresh sequence of `num_tokens` tokens (padding dropped)."""
        _check_positive("num_tokens", num_tokens)
        return _cp_positions(num_tokens, self.cp, self.coords(rank)["cp"]).numel()

    def packed_row_starts(self, rank: int, query_lens: Sequence[int]) -> list[int]:
        """Where each sequence's rows begin in `rank`'s layer-hook K/V of a packed step of fresh sequences: slice
        `k[start:start + num_local_rows(rank, T)]` to hand one sequence to `kv_transfer.plan.pack`."""
        starts, total = [], 0
        for num_tokens in query_lens:
            starts.append(total)
            total += self.num_local_rows(rank, num_tokens)
        return starts

    def token_runs(self, rank: int, num_tokens: int) -> tuple[TokenRun, ...]:
        """`rank`'s tokens of one fresh sequence as maximal runs (consecutive rows holding consecutive
        positions), in row order: at most two (chunk i, chunk 2N-1-i), one when they are adjacent."""
        _check_positive("num_tokens", num_tokens)
        return _cp_runs(num_tokens, self.cp, self.coords(rank)["cp"])

    @classmethod
    def from_mesh(cls, shape: MeshShape, config: ModelConfig) -> PrefillLayout:
        """The layout of a prefill replica running `config` on mesh `shape` (validated by the mesh's rules)."""
        shape.validate(config)
        return cls(num_layers=config.num_layers, num_kv_heads=config.num_kv_heads, pp=shape.pp, cp=shape.cp,
                   tp=shape.tp)


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

    @classmethod
    def from_mesh(cls, shape: MeshShape, config: ModelConfig, block_size: int) -> DecodeLayout:
        """The layout of a decode replica running `config` on mesh `shape` with paged blocks of `block_size`."""
        if shape.cp != 1:
            raise ValueError(f"DecodeLayout: decode meshes have cp=1 here (a cp-replicated decode mesh is not "
                             f"planned for yet), got cp={shape.cp}")
        shape.validate(config)
        return cls(num_layers=config.num_layers, num_kv_heads=config.num_kv_heads, pp=shape.pp, tp=shape.tp,
                   block_size=block_size)


@lru_cache(maxsize=256)
def _cp_positions(num_tokens: int, cp: int, cp_rank: int) -> torch.Tensor:
    # Delegates to the model's own sharding rule so the two can never drift apart. Cached: plans for the same
    # prompt length on the same mesh are common; callers get a clone, a count or a derived tuple, never this tensor.
    if cp == 1:
        return torch.arange(num_tokens, dtype=torch.long)
    positions = shard_plan([num_tokens], cp).token_indices[cp_rank]
    return positions[positions != PADDING]  # the hook drops padding rows; they only ever trail


@lru_cache(maxsize=256)
def _cp_runs(num_tokens: int, cp: int, cp_rank: int) -> tuple[TokenRun, ...]:
    positions = _cp_positions(num_tokens, cp, cp_rank)
    if positions.numel() == 0:
        return ()
    breaks = (torch.nonzero(positions[1:] != positions[:-1] + 1).flatten() + 1).tolist()
    starts, ends = [0, *breaks], [*breaks, positions.numel()]
    return tuple(TokenRun(s, int(positions[s]), e - s) for s, e in zip(starts, ends))


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
