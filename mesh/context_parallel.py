"""The model side of a context-parallel prefill step: which rows this rank computes, which ring variant runs,
what the layer hook sees, and how the requested logits rows reach every cp rank.

Who calls it: `mesh.model.CausalLM` builds one `CPStep` per forward when cp > 1 and the step has no paged cache
(`AttentionBatch.block_tables is None`); the attention layers read it. Every cp rank builds the same plan from the
same (query_lens, context_lens), so no metadata travels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mesh import comm
from mesh.cp_heuristic import choose_cp_mode_for_batch, validate_cp_mode
from mesh.cp_sharding import PADDING, CPShardPlan, shard, shard_plan


@dataclass(frozen=True, kw_only=True)
class CPRates:
    """Measured rates the `cp_mode: auto` cost model (mesh.cp_heuristic) weighs: one rank's attention throughput
    and the point-to-point bandwidth between neighbouring cp ranks. The defaults are a modest CPU over loopback
    Gloo; a GPU deployment passes its own (H200, measured here: ~600e12 attention FLOP/s, ~341e9 B/s NCCL p2p)."""

    peak_flops: float = 5e10
    bandwidth_bytes_per_s: float = 2e9

    def __post_init__(self) -> None:
        for name in ("peak_flops", "bandwidth_bytes_per_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"CPRates.{name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class CPHookRows:
    """The 4th argument of a layer hook on a CP step: for each row of the k, v the hook receives (this rank's real
    rows, padding dropped), its packed row in the step's [T] input, its position in its sequence and its sequence
    index in the batch. Rows are in shard order: sequence, then chunk i, then chunk 2N-1-i."""

    token_indices: torch.Tensor
    positions: torch.Tensor
    seq_ids: torch.Tensor


@dataclass(eq=False)
class CPStep:
    plan: CPShardPlan
    mode: str  # "pass-kv" or "pass-q"
    rank: int
    group: Any
    input_ids: torch.Tensor  # [num_local_tokens] this rank's shard (padding rows: id 0)
    positions: torch.Tensor  # [num_local_tokens]
    is_real: torch.Tensor  # [num_local_tokens] bool
    hook_rows: CPHookRows

    @classmethod
    def build(cls, input_ids: torch.Tensor, query_lens: list[int], context_lens: list[int], *, cp_size: int,
              cp_rank: int, group: Any, cp_mode: str, heads: tuple[int, int, int], dtype_bytes: int,
              rates: CPRates) -> CPStep:
        """`heads` = (query heads, KV heads, head_dim) of one rank after TP: the cost model's per-rank work."""
        validate_cp_mode(cp_mode)
        plan = shard_plan(query_lens, cp_size, context_lens=context_lens)
        if cp_mode == "auto":
            num_heads, num_kv_heads, head_dim = heads
            cp_mode = choose_cp_mode_for_batch(
                list(query_lens), list(context_lens), num_heads=num_heads, num_kv_heads=num_kv_heads,
                head_dim=head_dim, cp_size=cp_size, peak_flops=rates.peak_flops,
                bandwidth_bytes_per_s=rates.bandwidth_bytes_per_s, dtype_bytes=dtype_bytes)
        device = input_ids.device
        token_indices = plan.token_indices[cp_rank]
        is_real = token_indices != PADDING
        hook_rows = CPHookRows(token_indices[is_real].to(device), plan.positions[cp_rank][is_real].to(device),
                               plan.seq_ids[cp_rank][is_real].to(device))
        return cls(plan=plan, mode=cp_mode, rank=cp_rank, group=group, input_ids=shard(input_ids, plan, cp_rank),
                   positions=plan.positions[cp_rank].to(device), is_real=is_real.to(device), hook_rows=hook_rows)

    @property
    def num_rows(self) -> int:
        return self.plan.num_local_tokens

    def gather_rows(self, hidden: torch.Tensor, packed_rows: torch.Tensor) -> torch.Tensor:
        """Collective over the cp group: the hidden states of the step's packed rows `packed_rows` (e.g.
        logits_indices), from whichever rank holds each, on every cp rank. Each rank fills the rows it holds into
        zeros and the group sums them (exact: every row has one non-zero contribution)."""
        local_of_packed = torch.full((self.plan.num_tokens,), -1, dtype=torch.long)
        token_indices = self.plan.token_indices[self.rank]
        is_real = token_indices != PADDING
        local_of_packed[token_indices[is_real]] = is_real.nonzero().flatten()
        local = local_of_packed[packed_rows.cpu()].to(hidden.device)
        is_mine = local >= 0
        out = hidden.new_zeros((packed_rows.numel(), hidden.shape[1]))
        out[is_mine] = hidden[local[is_mine]]
        if self.plan.cp_size > 1:
            comm.all_reduce(out, group=self.group, kind="cp_row_gather")
        return out
