"""Transfer plans between a prefill replica's mesh and a decode replica's mesh, and their local execution.

`plan_transfer(src, dst, num_tokens, block_ids)` is a pure function of the two layouts (kv_transfer.mesh_layout),
the prompt length and the request's decode block table. It lists `Copy`s: one per (src rank, dst rank) pair that
has anything to exchange, each a rectangle of layers x KV heads over a few token runs. Every destination element
(dst rank, layer, local head, token) is written by exactly one copy:
- layers: each layer lives on one prefill stage; a dst rank takes each of its layers from that stage;
- tokens: each token lives on one prefill CP rank (chunks i and 2N-1-i), so a copy carries at most two runs
  (one when the two chunks are adjacent);
- heads: a head replicated on several prefill TP ranks is read from one of them, the replica whose index is
  congruent to the dst rank (dst_rank % replicas), which spreads the reads when the decode side also replicates;
  a head replicated on several decode ranks is sent to each of them (each needs its own copy in its own memory).

Execution (what transports call, one message per copy and layer range):
- sender: `pack(plan, src_rank, src_kv_per_layer)` gathers each copy's rows and heads into one contiguous tensor
  `[num_layers, 2, copy.num_tokens, len(copy.heads), head_dim]` (tokens in run order). Pass one layer at a time
  for layer-wise pushing; pass the whole stage to send everything at once.
- receiver: the message lands in a contiguous staging buffer, and `unpack_into(plan, dst_rank, messages, cache)`
  scatters it into the paged blocks. Staging is needed in general: a copy's tokens start mid-block (CP chunks do
  not align with blocks) and, when a copy carries only some of the rank's local heads (`not copy.is_all_dst_heads`),
  those heads are strided inside each block row. A copy with `is_all_dst_heads` writes whole token rows (each
  `[local_heads, head_dim]` row is contiguous in the cache), so its scatter is plain row copies. Receiving in place,
  with no staging, needs block-shaped messages (`[blocks, 2, block_size, heads, head_dim]`, K and V interleaved per
  block as in the cache), which only a source holding every token and head of those blocks can send: the
  single-rank path in kv_transfer.layout.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from kv_transfer.layout import num_blocks_for
from kv_transfer.mesh_layout import DecodeLayout, PrefillLayout, TokenRun, stage_layer_ranges, tp_head_range

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class Copy:
    """One source rank's share of one destination rank's KV: layers x heads x token runs.

    `heads` are global KV head ids; `src_heads_local` / `dst_heads_local` index the same heads in the source's
    K/V and the destination's cache. Each run's `token_start` is the position in the sequence (the destination
    row is `token_start % block_size` of block `block_ids[token_start // block_size]`), `src_row` the row of the
    source rank's local K/V.
    """

    index: int
    src_rank: int
    dst_rank: int
    layers: range
    heads: range
    src_heads_local: range
    dst_heads_local: range
    token_runs: tuple[TokenRun, ...]
    is_all_dst_heads: bool

    def __post_init__(self) -> None:
        if len(self.layers) == 0 or len(self.heads) == 0 or not self.token_runs:
            raise ValueError(f"copy {self.index} is empty: layers={self.layers}, heads={self.heads}, "
                             f"runs={self.token_runs}")
        if not len(self.heads) == len(self.src_heads_local) == len(self.dst_heads_local):
            raise ValueError(f"copy {self.index}: head ranges differ in length: {self.heads}, "
                             f"{self.src_heads_local}, {self.dst_heads_local}")
        if any(run.length < 1 for run in self.token_runs):
            raise ValueError(f"copy {self.index}: empty token run in {self.token_runs}")

    @property
    def num_tokens(self) -> int:
        return sum(run.length for run in self.token_runs)

    def message_shape(self, head_dim: int, num_layers: int | None = None) -> tuple[int, int, int, int, int]:
        """Shape of this copy's message for `num_layers` layers (all of `layers` by default)."""
        return (len(self.layers) if num_layers is None else num_layers, 2, self.num_tokens, len(self.heads), head_dim)


@dataclass(frozen=True, kw_only=True, eq=False)
class Message:
    """One packed message: copy `copy_index`'s elements for `layers` (a contiguous sub-range of the copy's layers).
    `tensor` is `[len(layers), 2, num_tokens, num_heads, head_dim]`, contiguous, K at index 0 of dim 1."""

    copy_index: int
    layers: range
    tensor: torch.Tensor


@dataclass(frozen=True, kw_only=True, eq=False)
class TransferPlan:
    """All copies of one request, ordered by (src_rank, dst_rank); `copies[i].index == i`.

    `block_ids` holds only the blocks the prompt occupies (ceil(num_tokens / block_size) of the block table)."""

    src: PrefillLayout
    dst: DecodeLayout
    num_tokens: int
    block_ids: tuple[int, ...]
    copies: tuple[Copy, ...]
    _slots: dict = field(default_factory=dict, init=False, repr=False)  # (copy index, device) -> (blocks, rows)

    def copies_from(self, src_rank: int) -> tuple[Copy, ...]:
        return tuple(c for c in self.copies if c.src_rank == src_rank)

    def copies_to(self, dst_rank: int) -> tuple[Copy, ...]:
        return tuple(c for c in self.copies if c.dst_rank == dst_rank)

    def dst_slots(self, copy: Copy, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Destination (block id, row in block) of each of the copy's tokens, in message order (int64)."""
        key = (copy.index, str(torch.device(device)))
        if key not in self._slots:
            positions = torch.cat([torch.arange(r.token_start, r.token_start + r.length) for r in copy.token_runs])
            table = torch.tensor(self.block_ids, dtype=torch.long)
            block_size = self.dst.block_size
            self._slots[key] = (table[positions // block_size].to(device), (positions % block_size).to(device))
        return self._slots[key]


def plan_transfer(src: PrefillLayout, dst: DecodeLayout, num_tokens: int, block_ids: Sequence[int]) -> TransferPlan:
    """The copies that move one fresh prompt's KV (`num_tokens` tokens, no cached prefix) from every rank of the
    prefill replica `src` into the blocks `block_ids` (the request's block table; may be longer than the prompt)
    on every rank of the decode replica `dst`. Pure and deterministic: both tiers compute the same plan."""
    if (src.num_layers, src.num_kv_heads) != (dst.num_layers, dst.num_kv_heads):
        raise ValueError(
            f"prefill and decode layouts describe different models: prefill num_layers={src.num_layers}, "
            f"num_kv_heads={src.num_kv_heads}; decode num_layers={dst.num_layers}, num_kv_heads={dst.num_kv_heads}")
    if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 1:
        raise ValueError(f"num_tokens must be an integer >= 1, got {num_tokens!r}")
    needed_blocks = _validate_block_ids(block_ids, num_tokens, dst.block_size)

    num_heads = src.num_kv_heads
    num_src_replicas = max(1, src.tp // num_heads)  # prefill TP ranks holding each head
    src_stages = stage_layer_ranges(src.num_layers, src.pp)
    pieces: list[dict] = []
    for dst_rank in range(dst.world_size):
        dst_layers, dst_heads = dst.layer_range(dst_rank), dst.head_range(dst_rank)
        for src_pp, src_layers in enumerate(src_stages):
            layers = _intersect(src_layers, dst_layers)
            if not layers:
                continue
            for src_tp in range(src.tp):
                if src_tp % num_src_replicas != dst_rank % num_src_replicas:
                    continue  # another replica of these heads serves this destination
                src_heads = tp_head_range(num_heads, src.tp, src_tp)
                heads = _intersect(src_heads, dst_heads)
                if not heads:
                    continue
                for src_cp in range(src.cp):
                    src_rank = src.rank_of(pp=src_pp, cp=src_cp, tp=src_tp)
                    runs = src.token_runs(src_rank, num_tokens)
                    if runs:
                        pieces.append(dict(
                            src_rank=src_rank, dst_rank=dst_rank, layers=layers, heads=heads,
                            src_heads_local=_shift(heads, -src_heads.start),
                            dst_heads_local=_shift(heads, -dst_heads.start), token_runs=runs,
                            is_all_dst_heads=heads == dst_heads))
    pieces.sort(key=lambda p: (p["src_rank"], p["dst_rank"]))
    copies = tuple(Copy(index=i, **p) for i, p in enumerate(pieces))
    prompt_blocks = tuple(int(b) for b in block_ids[:needed_blocks])
    return TransferPlan(src=src, dst=dst, num_tokens=num_tokens, block_ids=prompt_blocks, copies=copies)


def pack(plan: TransferPlan, src_rank: int,
         src_kv_per_layer: Mapping[int, KV] | Sequence[KV]) -> list[tuple[int, list[Message]]]:
    """Sender side: the messages of prefill rank `src_rank`, grouped by destination rank (ascending).

    `src_kv_per_layer`: a mapping global layer -> (k, v) packs just those layers (layer-wise pushing: pass one
    layer as soon as the model's layer hook yields it), or a sequence of (k, v) for every layer of the rank's
    stage in order. k, v: `[local_rows, local_heads, head_dim]`, the rank's rows of this sequence as its layer
    hook gives them (CP shard order, padding dropped; `PrefillLayout.packed_row_starts` locates a sequence in a
    packed step; trailing rows beyond the last one the plan reads are ignored). Returns new contiguous tensors on
    k's device; keep them alive until their sends complete.
    """
    stage = plan.src.layer_range(src_rank)
    kv_by_layer = _by_global_layer(src_kv_per_layer, stage, f"prefill rank {src_rank}")
    local_heads = len(plan.src.head_range(src_rank))
    by_dst: dict[int, list[Message]] = {}
    for copy in plan.copies_from(src_rank):
        rows_needed = max(run.src_row + run.length for run in copy.token_runs)
        for layers in _contiguous_runs(sorted(l for l in kv_by_layer if l in copy.layers)):
            first_k = kv_by_layer[layers.start][0]
            head_dim = first_k.shape[-1]
            out = first_k.new_empty(copy.message_shape(head_dim, len(layers)))
            for i, layer in enumerate(layers):
                for side, source in enumerate(kv_by_layer[layer]):
                    _check_src(source, rows_needed, local_heads, head_dim, layer, src_rank)
                    offset = 0
                    for run in copy.token_runs:
                        out[i, side, offset:offset + run.length] = source[
                            run.src_row:run.src_row + run.length,
                            copy.src_heads_local.start:copy.src_heads_local.stop]
                        offset += run.length
            by_dst.setdefault(copy.dst_rank, []).append(Message(copy_index=copy.index, layers=layers, tensor=out))
    return sorted(by_dst.items())


def unpack_into(plan: TransferPlan, dst_rank: int, messages: Iterable[Message],
                dst_kv_cache: Mapping[int, torch.Tensor] | Sequence[torch.Tensor]) -> int:
    """Receiver side: scatter received messages (any subset, in any order) into decode rank `dst_rank`'s paged
    cache and return the bytes written. `dst_kv_cache`: global layer -> `[num_blocks, 2, block_size, local_heads,
    head_dim]`, or a sequence with one tensor per layer of the rank's stage in order. Only the rows of the prompt's
    tokens are written; the rest of the last block and every other block stay as they were."""
    stage = plan.dst.layer_range(dst_rank)
    cache_by_layer = _by_global_layer(dst_kv_cache, stage, f"decode rank {dst_rank}")
    local_heads = len(plan.dst.head_range(dst_rank))
    num_bytes = 0
    for message in messages:
        if not 0 <= message.copy_index < len(plan.copies):
            raise ValueError(f"message names copy {message.copy_index}, the plan has {len(plan.copies)}")
        copy = plan.copies[message.copy_index]
        if copy.dst_rank != dst_rank:
            raise ValueError(f"message for copy {copy.index} belongs to decode rank {copy.dst_rank}, not {dst_rank}")
        if not message.layers or _intersect(message.layers, copy.layers) != message.layers:
            raise ValueError(f"message layers {message.layers} are not within copy {copy.index}'s {copy.layers}")
        for i, layer in enumerate(message.layers):
            if layer not in cache_by_layer:
                raise ValueError(f"decode rank {dst_rank}: no cache tensor given for layer {layer}")
            cache = cache_by_layer[layer]
            if message.tensor.dtype != cache.dtype:
                raise ValueError(f"message for copy {copy.index} is {message.tensor.dtype}, the cache of layer "
                                 f"{layer} is {cache.dtype}")
            expected = copy.message_shape(cache.shape[-1], len(message.layers))
            if tuple(message.tensor.shape) != expected:
                raise ValueError(f"message for copy {copy.index} has shape {tuple(message.tensor.shape)}, "
                                 f"expected {expected}")
            if cache.dim() != 5 or cache.shape[1] != 2 or cache.shape[2] != plan.dst.block_size \
                    or cache.shape[3] != local_heads:
                raise ValueError(f"decode rank {dst_rank} layer {layer} cache has shape {tuple(cache.shape)}, "
                                 f"expected [num_blocks, 2, {plan.dst.block_size}, {local_heads}, head_dim]")
            blocks, rows = plan.dst_slots(copy, cache.device)
            heads = slice(copy.dst_heads_local.start, copy.dst_heads_local.stop)
            # Advanced indices on dims 0 and 2 around a slice: the indexed view is [num_tokens, 2, heads, D].
            cache[blocks, :, rows, heads] = message.tensor[i].transpose(0, 1)
        num_bytes += message.tensor.numel() * message.tensor.element_size()
    return num_bytes


def _validate_block_ids(block_ids: Sequence[int], num_tokens: int, block_size: int) -> int:
    needed = num_blocks_for(num_tokens, block_size)
    if len(block_ids) < needed:
        raise ValueError(f"{num_tokens} tokens need {needed} blocks of {block_size}, but only {len(block_ids)} "
                         "block ids given")
    if any(not isinstance(b, numbers.Integral) or isinstance(b, bool) or b < 0 for b in block_ids):
        raise ValueError(f"block ids must be non-negative integers, got {list(block_ids)}")
    if len(set(block_ids)) != len(block_ids):
        raise ValueError("block_ids contains duplicates")
    return needed


def _by_global_layer(per_layer: Mapping | Sequence, stage: range, who: str) -> dict:
    if isinstance(per_layer, Mapping):
        outside = sorted(l for l in per_layer if l not in stage)
        if outside:
            raise ValueError(f"{who} holds layers {stage.start}..{stage.stop - 1}, got layers {outside}")
        return dict(per_layer)
    if len(per_layer) != len(stage):
        raise ValueError(f"{who} holds {len(stage)} layers ({stage.start}..{stage.stop - 1}), "
                         f"got a sequence of {len(per_layer)}")
    return dict(zip(stage, per_layer))


def _check_src(source: torch.Tensor, rows_needed: int, local_heads: int, head_dim: int, layer: int,
               src_rank: int) -> None:
    if source.dim() != 3 or source.shape[0] < rows_needed or source.shape[1] != local_heads \
            or source.shape[2] != head_dim:
        raise ValueError(f"prefill rank {src_rank} layer {layer}: K/V has shape {tuple(source.shape)}, expected "
                         f"[>= {rows_needed} rows, {local_heads} heads, {head_dim}]")


def _contiguous_runs(sorted_values: list[int]) -> list[range]:
    runs: list[range] = []
    for value in sorted_values:
        if runs and runs[-1].stop == value:
            runs[-1] = range(runs[-1].start, value + 1)
        else:
            runs.append(range(value, value + 1))
    return runs


def _intersect(a: range, b: range) -> range:
    start, stop = max(a.start, b.start), min(a.stop, b.stop)
    return range(start, max(start, stop))


def _shift(r: range, offset: int) -> range:
    return range(r.start + offset, r.stop + offset)
