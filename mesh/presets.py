"""Model presets written as real Hugging Face directories (config.json, model.safetensors, generation_config.json)
with seeded random weights, so tests and benchmarks exercise the real loading code and transformers can load the
same directory as the reference.

Who calls it: tests (tiny presets), benchmarks on the GPU machine (`llama-3.2-1b`, `llama-3-8b` shapes), the
default cluster.yaml's tiny model.

Initialisation keeps the random model "decisive": linear weights have std 1/sqrt(fan_in) so every layer changes
the residual stream (attention matters), and logits have std around 1-3 so greedy decoding is rarely decided by a
near-tie (the tests check the top-1 margin).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from mesh.checkpoint_writer import write_safetensors_streaming

_TINY_COMMON: dict[str, Any] = {
    "vocab_size": 512,  # ids 0..255 are the byte tokenizer's bytes, 256 = bos, 257 = eos
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "bos_token_id": 256,
    "eos_token_id": 257,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny-llama": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **_TINY_COMMON,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
    },
    "tiny-qwen2": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        **_TINY_COMMON,
        "intermediate_size": 96,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": 4,
    },
    "tiny-mistral": {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        **_TINY_COMMON,
        # head_dim * heads != hidden_size on purpose: exercises an explicit head_dim.
        "head_dim": 32,
        "num_key_value_heads": 1,
        "intermediate_size": 160,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "sliding_window": None,
    },
    "tiny-mixtral": {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        **_TINY_COMMON,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "router_aux_loss_coef": 0.02,
        "output_router_logits": False,
    },
    # Real shapes, random weights: for GPU benchmarks only (2.5 GB and 16 GB in bf16).
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "max_position_embeddings": 131072,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "attention_bias": False,
        "mlp_bias": False,
    },
    "llama-3-8b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "rope_theta": 500000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
    },
}

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def make_model(dir: str | Path, preset: str = "tiny-llama", seed: int = 0, dtype: torch.dtype = torch.float32,
               *, overrides: dict[str, Any] | None = None) -> Path:
    """Writes the preset (with `overrides` applied to its config.json contents) into `dir`; returns the path.
    The same (preset, overrides, seed) gives the same weights whatever the dtype (drawn in float32, then cast)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; expected one of {sorted(PRESETS)}")
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"make_model: dtype {dtype} not supported; use one of {list(_DTYPE_NAMES)}")
    config = copy.deepcopy(PRESETS[preset])
    config.update(overrides or {})
    config["torch_dtype"] = _DTYPE_NAMES[dtype]
    path = Path(dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id")}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    specs = tensor_specs(config)
    generator = torch.Generator().manual_seed(seed)
    initial = {name: kind for name, _, kind in specs}

    def make_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return _initial_tensor(initial[name], shape, config, generator)

    write_safetensors_streaming(path / "model.safetensors", [(name, shape) for name, shape, _ in specs],
                                make_tensor, dtype)
    return path


def tensor_specs(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...], str]]:
    """(Hugging Face tensor name, shape, initialisation kind) for every tensor of the checkpoint, in file order."""
    hidden = config["hidden_size"]
    inter = config["intermediate_size"]
    vocab = config["vocab_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    has_qkv_bias = config["model_type"] == "qwen2"
    specs: list[tuple[str, tuple[int, ...], str]] = [("model.embed_tokens.weight", (vocab, hidden), "embedding")]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [(f"{p}input_layernorm.weight", (hidden,), "norm"),
                  (f"{p}self_attn.q_proj.weight", (heads * head_dim, hidden), "linear"),
                  (f"{p}self_attn.k_proj.weight", (kv_heads * head_dim, hidden), "linear"),
                  (f"{p}self_attn.v_proj.weight", (kv_heads * head_dim, hidden), "linear")]
        if has_qkv_bias:
            specs += [(f"{p}self_attn.q_proj.bias", (heads * head_dim,), "bias"),
                      (f"{p}self_attn.k_proj.bias", (kv_heads * head_dim,), "bias"),
                      (f"{p}self_attn.v_proj.bias", (kv_heads * head_dim,), "bias")]
        specs += [(f"{p}self_attn.o_proj.weight", (hidden, heads * head_dim), "linear"),
                  (f"{p}post_attention_layernorm.weight", (hidden,), "norm")]
        if config["model_type"] == "mixtral":
            moe = f"{p}block_sparse_moe."
            specs.append((f"{moe}gate.weight", (config["num_local_experts"], hidden), "linear"))
            for e in range(config["num_local_experts"]):
                specs += [(f"{moe}experts.{e}.w1.weight", (inter, hidden), "linear"),  # gate
                          (f"{moe}experts.{e}.w2.weight", (hidden, inter), "linear"),  # down
                          (f"{moe}experts.{e}.w3.weight", (inter, hidden), "linear")]  # up
        else:
            specs += [(f"{p}mlp.gate_proj.weight", (inter, hidden), "linear"),
                      (f"{p}mlp.up_proj.weight", (inter, hidden), "linear"),
                      (f"{p}mlp.down_proj.weight", (hidden, inter), "linear")]
    specs.append(("model.norm.weight", (hidden,), "norm"))
    if not config.get("tie_word_embeddings", False):
        specs.append(("lm_head.weight", (vocab, hidden), "lm_head"))
    return specs


def _initial_tensor(kind: str, shape: tuple[int, ...], config: dict[str, Any],
                    generator: torch.Generator) -> torch.Tensor:
    hidden = config["hidden_size"]
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if kind == "norm":
        return 1.0 + 0.05 * noise
    if kind == "bias":
        return 0.1 * noise
    if kind == "linear" or kind == "lm_head":
        return noise * shape[1] ** -0.5
    if kind == "embedding":
        # Tied: the same table is the output head, so keep logits (hidden-dim dot products) near std 3.
        std = hidden ** -0.5 * 3.0 if config.get("tie_word_embeddings", False) else 1.0
        return noise * std
    raise ValueError(f"unknown initialisation kind {kind!r}")
