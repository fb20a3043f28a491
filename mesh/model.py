"""The decoder-only transformer (Llama / Mistral / Qwen2 family) on one rank of the mesh.

Who calls it: the prefill and decode tier engines, once per step:
`logits = model(input_ids, positions, batch, kv_cache, layer_hook)`. It promises the same numbers as transformers'
own classes on the same checkpoint (float32: within 1e-4 relative), and that with a cache every new token's K/V is
written to its slot before attention reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from mesh.attention import AttentionBatch, StepPlan, attend, write_kv
from mesh.config import ModelConfig
from mesh.layers import (ColumnParallelLinear, ParallelLMHead, RMSNorm, RotaryEmbedding, RowParallelLinear,
                         VocabParallelEmbedding)
from mesh.parallel import ParallelDims

__all__ = ["AttentionBatch", "CausalLM", "CheckpointError", "LayerHook"]

LayerHook = Callable[[int, torch.Tensor, torch.Tensor], None]


class CheckpointError(ValueError):
    """The safetensors files do not match config.json (missing, unexpected or misshapen tensors)."""


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, dims: ParallelDims, layer_index: int, dtype: torch.dtype,
                 device: Any) -> None:
        super().__init__()
        tp_size, group = dims.tp_size, dims.tp_group
        self.layer_index = layer_index
        self.head_dim = config.head_dim
        self.num_heads_local = config.num_heads // tp_size
        # KV heads are split over tp, or replicated when tp exceeds them (ranks tp_rank * kv / tp share a head).
        num_kv_shards = min(tp_size, config.num_kv_heads)
        self.num_kv_heads_local = config.num_kv_heads // num_kv_shards
        kv_shard_index = dims.tp_rank * num_kv_shards // tp_size
        self.scale = config.head_dim ** -0.5
        common = dict(dtype=dtype, device=device)
        self.q_proj = ColumnParallelLinear(config.hidden_size, config.q_size, bias=config.qkv_bias, group=group,
                                           **common)
        self.k_proj = ColumnParallelLinear(config.hidden_size, config.kv_size, bias=config.qkv_bias, group=group,
                                           num_shards=num_kv_shards, shard_index=kv_shard_index, **common)
        self.v_proj = ColumnParallelLinear(config.hidden_size, config.kv_size, bias=config.qkv_bias, group=group,
                                           num_shards=num_kv_shards, shard_index=kv_shard_index, **common)
        self.o_proj = RowParallelLinear(config.q_size, config.hidden_size, bias=False, group=group, **common)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: StepPlan,
                cache: torch.Tensor | None, layer_hook: LayerHook | None) -> torch.Tensor:
        num_tokens = x.shape[0]
        q = self.q_proj(x).view(num_tokens, self.num_heads_local, self.head_dim)
        k = self.k_proj(x).view(num_tokens, self.num_kv_heads_local, self.head_dim)
        v = self.v_proj(x).view(num_tokens, self.num_kv_heads_local, self.head_dim)
        q = RotaryEmbedding.apply(q, cos, sin)
        k = RotaryEmbedding.apply(k, cos, sin)
        if layer_hook is not None:
            layer_hook(self.layer_index, k, v)
        if cache is not None and plan.slot_blocks is not None:
            write_kv(cache, plan, k, v)
        out = attend(q, k, v, plan, cache, self.scale)
        return self.o_proj(out.reshape(num_tokens, self.num_heads_local * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); gate/up column-parallel, down row-parallel (one all-reduce)."""

    def __init__(self, config: ModelConfig, dims: ParallelDims, dtype: torch.dtype, device: Any) -> None:
        super().__init__()
        common = dict(bias=False, group=dims.tp_group, dtype=dtype, device=device)
        self.gate_proj = ColumnParallelLinear(config.hidden_size, config.intermediate_size, **common)
        self.up_proj = ColumnParallelLinear(config.hidden_size, config.intermediate_size, **common)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, **common)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, dims: ParallelDims, layer_index: int, dtype: torch.dtype,
                 device: Any) -> None:
        super().__init__()
        self.self_attn = Attention(config, dims, layer_index, dtype, device)
        self.mlp = MLP(config, dims, dtype, device)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype,
                                                device=device)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: StepPlan,
                cache: torch.Tensor | None, layer_hook: LayerHook | None) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, plan, cache, layer_hook)
        return h + self.mlp(self.post_attention_layernorm(h))


class CausalLM(nn.Module):
    """Parameters are allocated empty: build with `CausalLM.load`, or call `load_weights` yourself."""

    def __init__(self, config: ModelConfig, dims: ParallelDims | None = None, *, dtype: torch.dtype = torch.float32,
                 device: Any = "cpu") -> None:
        super().__init__()
        dims = ParallelDims.single() if dims is None else dims
        dims.shape.validate(config)
        if dims.pp_size > 1 or dims.cp_size > 1:
            raise ValueError(f"CausalLM: pipeline and context parallelism are not implemented yet (mesh {dims.shape})")
        self.config = config
        self.dims = dims
        self.dtype = dtype
        self.device = torch.device(device)
        group = dims.tp_group
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, group=group, dtype=dtype,
                                                   device=device)
        self.layers = nn.ModuleList(DecoderLayer(config, dims, i, dtype, device) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype, device=device)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, group=group, dtype=dtype, device=device)
        if config.tie_word_embeddings:
            self.lm_head.tie_to(self.embed_tokens)
        self.rotary = RotaryEmbedding(config.head_dim, rope_theta=config.rope_theta,
                                      rope_scaling=config.rope_scaling, device=device)

    @property
    def num_kv_heads_local(self) -> int:
        return self.layers[0].self_attn.num_kv_heads_local

    @property
    def head_dim(self) -> int:
        return self.config.head_dim

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @classmethod
    def load(cls, path: str | Path, dims: ParallelDims | None = None, dtype: torch.dtype = torch.float32,
             device: Any = "cpu") -> CausalLM:
        """Reads config.json and every *.safetensors in `path`; each rank copies only its own slices."""
        config = ModelConfig.from_dir(path)
        model = cls(config, dims, dtype=dtype, device=device)
        model.load_weights(path)
        return model.eval()

    def _parameter_targets(self) -> dict[str, tuple[nn.Module, str]]:
        """Hugging Face tensor name -> (layer that loads it, parameter name)."""
        targets: dict[str, tuple[nn.Module, str]] = {"model.embed_tokens.weight": (self.embed_tokens, "weight"),
                                                     "model.norm.weight": (self.norm, "weight")}
        if not self.config.tie_word_embeddings:
            targets["lm_head.weight"] = (self.lm_head, "weight")
        for i, layer in enumerate(self.layers):
            prefix = f"model.layers.{i}."
            attn = layer.self_attn
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                module = getattr(attn, proj)
                targets[f"{prefix}self_attn.{proj}.weight"] = (module, "weight")
                if module.bias is not None:
                    targets[f"{prefix}self_attn.{proj}.bias"] = (module, "bias")
            for proj in ("gate_proj", "up_proj", "down_proj"):
                targets[f"{prefix}mlp.{proj}.weight"] = (getattr(layer.mlp, proj), "weight")
            targets[f"{prefix}input_layernorm.weight"] = (layer.input_layernorm, "weight")
            targets[f"{prefix}post_attention_layernorm.weight"] = (layer.post_attention_layernorm, "weight")
        return targets

    def load_weights(self, path: str | Path) -> None:
        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files in model directory {str(path)!r}")
        targets = self._parameter_targets()
        loaded: set[str] = set()
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name in targets:
                        module, param = targets[name]
                        try:
                            module.load_full(f.get_slice(name), param)
                        except ValueError as error:
                            raise CheckpointError(f"{file.name}: tensor {name}: {error}") from None
                        loaded.add(name)
                    elif name == "lm_head.weight" or name.endswith("rotary_emb.inv_freq"):
                        continue  # tied head (the embedding is used) or a derived buffer older exports include
                    else:
                        raise CheckpointError(f"{file.name}: unexpected tensor {name!r} for {self.config.architecture}")
        missing = sorted(set(targets) - loaded)
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise CheckpointError(f"checkpoint in {str(path)!r} is missing tensors {missing[:5]}{more}")

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                kv_cache: list[torch.Tensor] | None = None,
                layer_hook: LayerHook | None = None) -> torch.Tensor:
        """input_ids, positions: [T] packed; returns float32 logits [len(batch.logits_indices), vocab_size]."""
        if input_ids.shape != positions.shape or input_ids.dim() != 1:
            raise ValueError(f"forward: input_ids {tuple(input_ids.shape)} and positions {tuple(positions.shape)} "
                             "must both be 1-D of the same length")
        if input_ids.shape[0] != batch.num_tokens:
            raise ValueError(f"forward: {input_ids.shape[0]} tokens but batch.query_lens sums to {batch.num_tokens}")
        if kv_cache is not None and batch.block_tables is not None and len(kv_cache) != self.num_layers:
            raise ValueError(f"forward: kv_cache has {len(kv_cache)} layers, model has {self.num_layers}")
        plan = StepPlan.build(batch, kv_cache, input_ids.device)
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions, h.dtype)
        for i, layer in enumerate(self.layers):
            cache = kv_cache[i] if kv_cache is not None and batch.block_tables is not None else None
            h = layer(h, cos, sin, plan, cache, layer_hook)
        # Normalising only the returned rows gives the same numbers (RMSNorm is per row) for less work.
        h = self.norm(h[batch.logits_indices.to(h.device)])
        return self.lm_head(h).float()
