"""The weights of the GPU fast path (mesh.gpu_decoder): q/k/v and gate/up concatenated once at load, so a layer
runs two matrix products where the reference runs five.

Where they come from:
- `tensors_of_model(model)`: a loaded one-rank `CausalLM` (the usual path: the decode replica loads the checkpoint
  straight to the GPU in its dtype). With `share_with_model`, the CausalLM's own q/k/v and gate/up parameters
  become views into the fused tensors, so the reference path keeps working on the same memory and the weights
  are held once.
- `random_tensors(hf_config, ...)`: random weights drawn on the device itself in Hugging Face naming, for the
  benchmarks (generating an 8B safetensors file on a CPU takes many minutes; this takes about a second on a GPU).
  Same initialisation kinds as mesh.presets (1/sqrt(fan_in) linears, norms near 1), drawn from a device
  generator, so the numbers differ from `make_model`'s for the same seed.

Who calls it: `GpuDecoder.from_model` / `GpuDecoder.from_tensors`, benchmarks/engine_speed.py.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mesh.config import ModelConfig


@dataclass(eq=False)
class FusedLayer:
    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [(H + 2 Hkv) * D, hidden]: q rows, then k, then v
    qkv_bias: torch.Tensor | None  # [(H + 2 Hkv) * D] (Qwen2)
    o: torch.Tensor  # [hidden, H * D]
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 * intermediate, hidden]: gate rows, then up
    down: torch.Tensor  # [hidden, intermediate]


@dataclass(eq=False)
class FusedWeights:
    embed: torch.Tensor  # [vocab, hidden]
    layers: list[FusedLayer]
    norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor  # [vocab, hidden]; the embedding itself when tied

    def bytes_read_per_step(self) -> int:
        """Bytes of weights one decode step must read: every layer, the final norm and the head (the embedding
        table only through its few looked-up rows, counted as zero; a tied head is read once as the head)."""
        tensors = [self.norm, self.lm_head]
        for layer in self.layers:
            tensors += [layer.input_norm, layer.qkv, layer.o, layer.post_norm, layer.gate_up, layer.down]
            if layer.qkv_bias is not None:
                tensors.append(layer.qkv_bias)
        return sum(t.numel() * t.element_size() for t in tensors)

    def matmul_params_per_token(self) -> int:
        """Multiply-adds per token in the layers' projections (the head excluded: prefill computes it for the
        returned rows only)."""
        return sum(layer.qkv.numel() + layer.o.numel() + layer.gate_up.numel() + layer.down.numel()
                   for layer in self.layers)


def tensors_of_model(model: Any) -> dict[str, torch.Tensor]:
    """Hugging Face name -> parameter tensor of a one-rank dense CausalLM (no copies)."""
    if model.dims.world_size != 1:
        raise ValueError("the GPU fast path runs one-rank models (tp = pp = cp = 1)")
    if model.config.is_moe:
        raise ValueError(f"the GPU fast path runs dense models; {model.config.architecture} is a mixture of experts")
    tensors = {"model.embed_tokens.weight": model.embed_tokens.weight, "model.norm.weight": model.norm.weight,
               "lm_head.weight": model.lm_head.weight}
    for i, layer in enumerate(model.layers):
        prefix = f"model.layers.{i}."
        attn, mlp = layer.self_attn, layer.mlp
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            module = getattr(attn, proj)
            tensors[f"{prefix}self_attn.{proj}.weight"] = module.weight
            if module.bias is not None:
                tensors[f"{prefix}self_attn.{proj}.bias"] = module.bias
        for proj in ("gate_proj", "up_proj", "down_proj"):
            tensors[f"{prefix}mlp.{proj}.weight"] = getattr(mlp, proj).weight
        tensors[f"{prefix}input_layernorm.weight"] = layer.input_layernorm.weight
        tensors[f"{prefix}post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
    return tensors


def fuse(config: ModelConfig, tensors: MutableMapping[str, torch.Tensor]) -> FusedWeights:
    """Builds the fused weights, removing each source tensor from `tensors` once copied (so a caller that holds
    no other reference frees them layer by layer and the peak stays one layer above the model)."""
    if config.is_moe:
        raise ValueError(f"the GPU fast path runs dense models; {config.architecture} is a mixture of experts")

    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise KeyError(f"fuse: tensor {name!r} is missing")
        return tensors.pop(name)

    layers = []
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        qkv = torch.cat([take(f"{p}self_attn.{n}_proj.weight") for n in "qkv"], dim=0)
        bias = None
        if config.qkv_bias:
            bias = torch.cat([take(f"{p}self_attn.{n}_proj.bias") for n in "qkv"], dim=0)
        gate_up = torch.cat([take(f"{p}mlp.gate_proj.weight"), take(f"{p}mlp.up_proj.weight")], dim=0)
        layers.append(FusedLayer(input_norm=take(f"{p}input_layernorm.weight"), qkv=qkv, qkv_bias=bias,
                                 o=take(f"{p}self_attn.o_proj.weight"),
                                 post_norm=take(f"{p}post_attention_layernorm.weight"), gate_up=gate_up,
                                 down=take(f"{p}mlp.down_proj.weight")))
    embed = take("model.embed_tokens.weight")
    lm_head = tensors.pop("lm_head.weight", None)
    if config.tie_word_embeddings or lm_head is None:
        if not config.tie_word_embeddings:
            raise KeyError("fuse: tensor 'lm_head.weight' is missing")
        lm_head = embed
    return FusedWeights(embed=embed, layers=layers, norm=take("model.norm.weight"), lm_head=lm_head)


def share_with_model(model: Any, weights: FusedWeights) -> None:
    """Points the CausalLM's q/k/v and gate/up parameters at row slices of the fused tensors (views, no copy), so
    the reference path and the fast path read the same memory and the separate copies can be freed."""
    config = model.config
    q, kv = config.q_size, config.kv_size
    for layer, fused in zip(model.layers, weights.layers):
        attn, mlp = layer.self_attn, layer.mlp
        for proj, (start, stop) in zip(("q_proj", "k_proj", "v_proj"), ((0, q), (q, q + kv), (q + kv, q + 2 * kv))):
            module = getattr(attn, proj)
            module.weight = nn.Parameter(fused.qkv[start:stop], requires_grad=False)
            if fused.qkv_bias is not None:
                module.bias = nn.Parameter(fused.qkv_bias[start:stop], requires_grad=False)
        inter = config.intermediate_size
        mlp.gate_proj.weight = nn.Parameter(fused.gate_up[:inter], requires_grad=False)
        mlp.up_proj.weight = nn.Parameter(fused.gate_up[inter:], requires_grad=False)


@torch.no_grad()
def random_tensors(hf_config: dict[str, Any], *, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                   device: Any = "cuda") -> dict[str, torch.Tensor]:
    """Every checkpoint tensor of `hf_config` (a config.json dict, e.g. mesh.presets.PRESETS[name]) drawn on
    `device`, in Hugging Face naming: the shapes of mesh.presets.tensor_specs, its initialisation kinds."""
    from mesh.presets import tensor_specs

    generator = torch.Generator(device=device).manual_seed(seed)
    hidden = hf_config["hidden_size"]
    tensors = {}
    for name, shape, kind in tensor_specs(hf_config):
        noise = torch.randn(shape, generator=generator, dtype=torch.float32, device=device)
        if kind == "norm":
            value = noise.mul_(0.05).add_(1.0)
        elif kind == "bias":
            value = noise.mul_(0.1)
        elif kind in ("linear", "lm_head"):
            value = noise.mul_(shape[1] ** -0.5)
        elif kind == "embedding":
            value = noise.mul_(hidden ** -0.5 * 3.0 if hf_config.get("tie_word_embeddings", False) else 1.0)
        else:
            raise ValueError(f"random_tensors: unknown initialisation kind {kind!r} for {name}")
        tensors[name] = value.to(dtype)
        del noise, value
    return tensors


def checkpoint_views(config: ModelConfig, weights: FusedWeights) -> dict[str, torch.Tensor]:
    """The inverse of `fuse` without copies: Hugging Face name -> row-slice view of the fused tensors (a tied head
    appears only as the embedding). Lets another implementation (transformers, in the benchmark) run on the very
    same memory."""
    q, kv, inter = config.q_size, config.kv_size, config.intermediate_size
    views = {"model.embed_tokens.weight": weights.embed, "model.norm.weight": weights.norm}
    if not config.tie_word_embeddings:
        views["lm_head.weight"] = weights.lm_head
    for i, layer in enumerate(weights.layers):
        p = f"model.layers.{i}."
        for name, (start, stop) in zip("qkv", ((0, q), (q, q + kv), (q + kv, q + 2 * kv))):
            views[f"{p}self_attn.{name}_proj.weight"] = layer.qkv[start:stop]
            if layer.qkv_bias is not None:
                views[f"{p}self_attn.{name}_proj.bias"] = layer.qkv_bias[start:stop]
        views[f"{p}self_attn.o_proj.weight"] = layer.o
        views[f"{p}mlp.gate_proj.weight"] = layer.gate_up[:inter]
        views[f"{p}mlp.up_proj.weight"] = layer.gate_up[inter:]
        views[f"{p}mlp.down_proj.weight"] = layer.down
        views[f"{p}input_layernorm.weight"] = layer.input_norm
        views[f"{p}post_attention_layernorm.weight"] = layer.post_norm
    return views
