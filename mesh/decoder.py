"""One decoder layer (attention + dense or MoE MLP) on one rank, and the per-forward `ForwardStep` it reads.

Who calls it: `mesh.model.CausalLM` builds the layers of its pipeline stage and runs them once per step. A layer
holds its global index (`layer_index`), which is what the layer hook receives.

Three ways a step runs (chosen by CausalLM when it builds the ForwardStep):
- local: cp == 1. Attention over the step's own rows and, with `block_tables`, the paged cache (mesh.attention).
- cp-sharded: cp > 1 and no paged cache. This rank holds its load-balanced shard of the new tokens; attention is
  `mesh.ring_attention` over the cp group, the cached prefix (if any) comes from a `RoundRobinKVStore`, and the
  step's new K/V are sent to their round-robin owners after each layer.
- cp-replicated: cp > 1 with a paged cache (decode after a CP prefill). Every cp rank computes every row, like
  cp == 1; the cp group is not used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from mesh.attention import AttentionBatch, StepPlan, attend, write_kv
from mesh.config import ModelConfig
from mesh.context_parallel import CPStep
from mesh.kv_layout import kv_head_range
from mesh.layers import ColumnParallelLinear, RMSNorm, RotaryEmbedding, RowParallelLinear
from mesh.moe import SparseMoE
from mesh.parallel import ParallelDims
from mesh.ring_attention import ring_attention
from mesh.round_robin_kv import StoreStep

# layer_hook(layer_index, k, v) on local and cp-replicated steps; layer_hook(layer_index, k, v, rows: CPHookRows) on
# cp-sharded steps. layer_index is global; k, v are post-rotary [rows, num_kv_heads_local, head_dim].
LayerHook = Callable[..., None]


@dataclass(eq=False)
class ForwardStep:
    """Everything one forward (or one micro-batch) shares across the layers of this rank."""

    batch: AttentionBatch
    input_ids: torch.Tensor  # the rows this rank computes (its CP shard on a cp-sharded step)
    cos: torch.Tensor
    sin: torch.Tensor
    paged: StepPlan | None  # local / cp-replicated steps
    kv_cache: list[torch.Tensor] | None  # stage-local layers; None without block_tables
    cp: CPStep | None  # cp-sharded steps
    store: StoreStep | None  # cp-sharded steps with a RoundRobinKVStore
    layer_hook: LayerHook | None
    moe_replica_group: Any  # ranks holding exactly this rank's rows (expert-parallel slicing)

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def is_real(self) -> torch.Tensor | None:
        return None if self.cp is None else self.cp.is_real


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, dims: ParallelDims, layer_index: int, dtype: torch.dtype,
                 device: Any) -> None:
        super().__init__()
        tp_size, group = dims.tp_size, dims.tp_group
        self.layer_index = layer_index
        self.cp_group = dims.cp_group
        self.head_dim = config.head_dim
        self.num_heads_local = config.num_heads // tp_size
        kv_heads = kv_head_range(config.num_kv_heads, tp_size, dims.tp_rank)
        self.num_kv_heads_local = len(kv_heads)
        num_kv_shards = config.num_kv_heads // self.num_kv_heads_local
        self.scale = config.head_dim ** -0.5
        common = dict(dtype=dtype, device=device)
        self.q_proj = ColumnParallelLinear(config.hidden_size, config.q_size, bias=config.qkv_bias, group=group,
                                           **common)
        kv_split = dict(num_shards=num_kv_shards, shard_index=kv_heads.start // self.num_kv_heads_local)
        self.k_proj = ColumnParallelLinear(config.hidden_size, config.kv_size, bias=config.qkv_bias, group=group,
                                           **kv_split, **common)
        self.v_proj = ColumnParallelLinear(config.hidden_size, config.kv_size, bias=config.qkv_bias, group=group,
                                           **kv_split, **common)
        self.o_proj = RowParallelLinear(config.q_size, config.hidden_size, bias=False, group=group, **common)

    def forward(self, x: torch.Tensor, step: ForwardStep, local_layer: int) -> torch.Tensor:
        num_rows = x.shape[0]
        q = self.q_proj(x).view(num_rows, self.num_heads_local, self.head_dim)
        k = self.k_proj(x).view(num_rows, self.num_kv_heads_local, self.head_dim)
        v = self.v_proj(x).view(num_rows, self.num_kv_heads_local, self.head_dim)
        q = RotaryEmbedding.apply(q, step.cos, step.sin)
        k = RotaryEmbedding.apply(k, step.cos, step.sin)
        if step.cp is None:
            out = self._attend_local(q, k, v, step, local_layer)
        else:
            out = self._attend_ring(q, k, v, step, local_layer)
        return self.o_proj(out.reshape(num_rows, self.num_heads_local * self.head_dim))

    def _attend_local(self, q, k, v, step: ForwardStep, local_layer: int) -> torch.Tensor:
        if step.layer_hook is not None:
            step.layer_hook(self.layer_index, k, v)
        cache = step.kv_cache[local_layer] if step.kv_cache is not None else None
        if cache is not None:
            write_kv(cache, step.paged, k, v)
        return attend(q, k, v, step.paged, cache, self.scale)

    def _attend_ring(self, q, k, v, step: ForwardStep, local_layer: int) -> torch.Tensor:
        cp = step.cp
        if step.layer_hook is not None:
            step.layer_hook(self.layer_index, k[cp.is_real], v[cp.is_real], cp.hook_rows)
        cached_k = cached_v = None
        if step.store is not None and step.store.has_cache:
            cached_k, cached_v = step.store.cached(local_layer)
        out = ring_attention(q, k, v, cp.plan, cp.group, mode=cp.mode, cached_k_local=cached_k,
                             cached_v_local=cached_v, scale=self.scale)
        if step.store is not None:
            step.store.send_new(local_layer, k, v)
        return out


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); gate/up column-parallel, down row-parallel (one all-reduce)."""

    def __init__(self, config: ModelConfig, dims: ParallelDims, dtype: torch.dtype, device: Any) -> None:
        super().__init__()
        common = dict(bias=False, group=dims.tp_group, dtype=dtype, device=device)
        self.gate_proj = ColumnParallelLinear(config.hidden_size, config.intermediate_size, **common)
        self.up_proj = ColumnParallelLinear(config.hidden_size, config.intermediate_size, **common)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, **common)

    def forward(self, x: torch.Tensor, step: ForwardStep) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEMLP(nn.Module):
    """The layer's MLP slot for Mixtral: the sparse MoE block, told which rows are real and who shares them."""

    def __init__(self, config: ModelConfig, dims: ParallelDims, dtype: torch.dtype, device: Any) -> None:
        super().__init__()
        self.block_sparse_moe = SparseMoE(config, dims, dtype, device)

    def forward(self, x: torch.Tensor, step: ForwardStep) -> torch.Tensor:
        return self.block_sparse_moe(x, is_real=step.is_real, replica_group=step.moe_replica_group)


class DecoderLayer(nn.Module):
    """Pre-norm residual block. The residual stream is the hidden state itself (h + attn(norm(h)), then
    h + mlp(norm(h))), so a pipeline stage hands the next one exactly one tensor: h."""

    def __init__(self, config: ModelConfig, dims: ParallelDims, layer_index: int, dtype: torch.dtype,
                 device: Any) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.self_attn = Attention(config, dims, layer_index, dtype, device)
        self.mlp = (MoEMLP if config.is_moe else MLP)(config, dims, dtype, device)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype,
                                                device=device)

    def forward(self, h: torch.Tensor, step: ForwardStep, local_layer: int) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), step, local_layer)
        return h + self.mlp(self.post_attention_layernorm(h), step)

    def checkpoint_targets(self) -> dict[str, tuple[nn.Module, str]]:
        """Hugging Face tensor name -> (module that loads it, its load_full name), for what this rank holds."""
        prefix = f"model.layers.{self.layer_index}."
        targets: dict[str, tuple[nn.Module, str]] = {}
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            module = getattr(self.self_attn, proj)
            targets[f"{prefix}self_attn.{proj}.weight"] = (module, "weight")
            if module.bias is not None:
                targets[f"{prefix}self_attn.{proj}.bias"] = (module, "bias")
        if isinstance(self.mlp, MoEMLP):
            moe = self.mlp.block_sparse_moe
            for name, load_name in moe.checkpoint_names(f"{prefix}block_sparse_moe.").items():
                targets[name] = (moe, load_name)
        else:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                targets[f"{prefix}mlp.{proj}.weight"] = (getattr(self.mlp, proj), "weight")
        targets[f"{prefix}input_layernorm.weight"] = (self.input_layernorm, "weight")
        targets[f"{prefix}post_attention_layernorm.weight"] = (self.post_attention_layernorm, "weight")
        return targets
