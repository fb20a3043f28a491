"""Mixtral's sparse mixture-of-experts MLP, with expert parallelism over the (cp, tp) ranks of a pipeline stage.

Routing is exactly transformers' `MixtralTopKRouter`: logits = x G^T, softmax over all experts in float32, top-k,
then the k weights renormalised to sum to 1. Expert e computes w2(silu(w1 x) * w3 x) (checkpoint names
`block_sparse_moe.experts.{e}.w1/w2/w3`), scaled by its routing weight; a token's output is the sum over its k
experts.

Two ways to place the experts (`ParallelDims.ep_size`, validated by `MeshShape`):
- ep == 1: every rank holds every expert, each expert's intermediate dimension split over tp exactly like the
  dense MLP (w1/w3 column-parallel, w2 row-parallel); one all-reduce over tp for the whole block.
- ep == cp * tp (> 1): rank `ep_rank` of a stage holds the whole experts [ep_rank * E / ep, (ep_rank + 1) * E / ep).
  Attention stays TP x CP sharded on the same ranks, so the tp ranks of a cp shard hold identical rows: each of
  them routes only its 1/tp slice of those rows (no duplicate expert work), sends every (token, expert) pair to the
  expert's owner with one all-to-all over the ep group (counts first, then the rows), the owners run their
  experts, a second all-to-all brings the outputs back, and an all-gather over the tp group restores the replicated
  rows. When a cp > 1 mesh runs a paged-cache step every rank of the stage holds the same rows, and the slicing
  group is the whole ep group instead (the caller passes it: `replica_group`).

Who calls it: `mesh.decoder.DecoderLayer`, once per layer; every rank of the ep group must call it (collectives).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mesh import comm
from mesh.config import ModelConfig
from mesh.layers import check_full, copy_into, empty_param, group_rank_size
from mesh.parallel import ParallelDims


class SparseMoE(nn.Module):
    def __init__(self, config: ModelConfig, dims: ParallelDims, dtype: torch.dtype, device: Any) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.ep_size, self.ep_group = dims.ep_size, dims.ep_group
        if self.ep_size > 1:
            self.num_local_experts = self.num_experts // self.ep_size
            self.first_expert = dims.ep_rank * self.num_local_experts
            self.num_shards, self.shard_index, self.reduce_group = 1, 0, None
        else:
            self.num_local_experts, self.first_expert = self.num_experts, 0
            self.num_shards, self.shard_index, self.reduce_group = dims.tp_size, dims.tp_rank, dims.tp_group
        self.intermediate_local = self.intermediate_size // self.num_shards
        common = dict(dtype=dtype, device=device)
        self.gate = empty_param(self.num_experts, self.hidden_size, **common)  # the router, on every rank
        self.w1 = empty_param(self.num_local_experts, self.intermediate_local, self.hidden_size, **common)
        self.w3 = empty_param(self.num_local_experts, self.intermediate_local, self.hidden_size, **common)
        self.w2 = empty_param(self.num_local_experts, self.hidden_size, self.intermediate_local, **common)

    @property
    def local_experts(self) -> range:
        return range(self.first_expert, self.first_expert + self.num_local_experts)

    def checkpoint_names(self, prefix: str) -> dict[str, str]:
        """Checkpoint tensor name -> the `load_full` name, for the tensors this rank holds (the router and its own
        experts)."""
        names = {f"{prefix}gate.weight": "gate"}
        for expert in self.local_experts:
            for proj in ("w1", "w2", "w3"):
                names[f"{prefix}experts.{expert}.{proj}.weight"] = f"experts.{expert}.{proj}"
        return names

    def load_full(self, full: Any, name: str) -> None:
        if name == "gate":
            check_full(name, full, (self.num_experts, self.hidden_size), "SparseMoE")
            copy_into(self.gate, full[:], "gate")
            return
        _, expert_text, proj = name.split(".")
        expert = int(expert_text)
        if expert not in self.local_experts:
            raise ValueError(f"SparseMoE: expert {expert} is not held by this rank ({self.local_experts})")
        local = expert - self.first_expert
        start = self.shard_index * self.intermediate_local
        stop = start + self.intermediate_local
        if proj in ("w1", "w3"):
            check_full(name, full, (self.intermediate_size, self.hidden_size), "SparseMoE")
            copy_into(getattr(self, proj)[local], full[start:stop], name)
        elif proj == "w2":
            check_full(name, full, (self.hidden_size, self.intermediate_size), "SparseMoE")
            copy_into(self.w2[local], full[:, start:stop], name)
        else:
            raise ValueError(f"SparseMoE has no parameter {name!r} to load")

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights float32 [n, k], expert ids [n, k]) as transformers' MixtralTopKRouter computes them."""
        probs = F.softmax(F.linear(x, self.gate).float(), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), experts

    def forward(self, x: torch.Tensor, *, is_real: torch.Tensor | None = None,
                replica_group: Any = None) -> torch.Tensor:
        """x [n, hidden] -> [n, hidden]. `is_real` marks the rows to compute (CP padding rows come back as
        zeros); `replica_group` is the group of ranks that hold exactly the same rows (ep > 1 only)."""
        rows = torch.arange(x.shape[0], device=x.device) if is_real is None else is_real.nonzero().flatten()
        if self.ep_size == 1:
            out = x.new_zeros(x.shape)
            out[rows] = self._local_moe(x[rows])
            if self.reduce_group is not None:
                # Partial sums over the tp-split intermediate dim.
                comm.all_reduce(out, group=self.reduce_group, kind="tp_allreduce")
            return out
        replica_rank, replica_size = group_rank_size(replica_group)
        chunk = -(-rows.numel() // replica_size)
        mine = rows[replica_rank * chunk:(replica_rank + 1) * chunk]
        mine_out = self._dispatch_combine(x[mine])
        out = x.new_zeros(x.shape)
        if replica_group is None:
            out[mine] = mine_out
            return out
        padded = x.new_zeros((chunk, x.shape[1]))
        padded[:mine_out.shape[0]] = mine_out
        slices = [torch.empty_like(padded) for _ in range(replica_size)]
        comm.all_gather(slices, padded, group=replica_group, kind="ep_allgather")
        out[rows] = torch.cat(slices)[:rows.numel()]
        return out

    def _local_moe(self, x: torch.Tensor) -> torch.Tensor:
        """ep == 1: every expert here (tp-split); the caller all-reduces over tp."""
        weights, experts = self.route(x)
        pair_tokens = torch.arange(x.shape[0], device=x.device).repeat_interleave(self.top_k)
        pair_experts, pair_weights = experts.flatten(), weights.flatten()
        out = self._run_experts(x[pair_tokens], pair_experts - self.first_expert)
        return self._combine(x, pair_tokens, out, pair_weights)

    def _dispatch_combine(self, x: torch.Tensor) -> torch.Tensor:
        """ep > 1: route this rank's rows, all-to-all them to their experts' owners and back, combine."""
        weights, experts = self.route(x)
        # (token, expert) pairs sorted by expert, so each destination rank's pairs are one contiguous run.
        pair_experts = experts.flatten()
        order = torch.argsort(pair_experts, stable=True)
        pair_experts = pair_experts[order]
        pair_tokens = torch.arange(x.shape[0], device=x.device).repeat_interleave(self.top_k)[order]
        pair_weights = weights.flatten()[order]
        send_counts = torch.bincount(pair_experts, minlength=self.num_experts)  # per expert, in expert order
        recv_counts = torch.empty_like(send_counts)
        # recv_counts[j * E_local + e]: pairs rank j sends to my local expert e.
        comm.all_to_all_single(recv_counts, send_counts, group=self.ep_group, kind="ep_all_to_all")
        send_splits = send_counts.view(self.ep_size, -1).sum(dim=1).tolist()
        recv_splits = recv_counts.view(self.ep_size, -1).sum(dim=1).tolist()
        received = x.new_empty((sum(recv_splits), x.shape[1]))
        comm.all_to_all_single(received, x[pair_tokens].contiguous(), recv_splits, send_splits, group=self.ep_group,
                               kind="ep_all_to_all")
        local_ids = torch.arange(self.num_local_experts, device=x.device).repeat(self.ep_size)
        expert_out = self._run_experts(received, local_ids.repeat_interleave(recv_counts))
        returned = x.new_empty((pair_tokens.numel(), x.shape[1]))
        comm.all_to_all_single(returned, expert_out, send_splits, recv_splits, group=self.ep_group,
                               kind="ep_all_to_all")
        return self._combine(x, pair_tokens, returned, pair_weights)

    def _run_experts(self, x: torch.Tensor, local_expert_ids: torch.Tensor) -> torch.Tensor:
        """Row i through local expert local_expert_ids[i] (its tp shard when ep == 1)."""
        out = x.new_empty((x.shape[0], self.hidden_size))
        for local in range(self.num_local_experts):
            selected = (local_expert_ids == local).nonzero().flatten()
            if selected.numel() == 0:
                continue
            hidden = x[selected]
            activated = F.silu(F.linear(hidden, self.w1[local])) * F.linear(hidden, self.w3[local])
            out[selected] = F.linear(activated, self.w2[local])
        return out

    @staticmethod
    def _combine(x: torch.Tensor, pair_tokens: torch.Tensor, pair_out: torch.Tensor,
                 pair_weights: torch.Tensor) -> torch.Tensor:
        # As transformers: scale by the float32 weight, cast back, add into a zero row per token.
        weighted = (pair_out * pair_weights[:, None]).to(x.dtype)
        return x.new_zeros((x.shape[0], x.shape[1])).index_add_(0, pair_tokens, weighted)
