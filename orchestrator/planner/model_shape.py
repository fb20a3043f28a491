"""The model as the planner sees it: its shape and the bytes and FLOPs that follow from it.

Who calls it: `orchestrator.planner.cli` (`--model DIR`, `--preset NAME`), the cost model and the tests. Dense
models come through `mesh.config.ModelConfig` (the same parsing, and the same refusals, as the serving code);
mixture-of-experts configs (Mixtral keys) are read here, because the planner sizes expert parallelism before the
mesh can run it. `gpt3-175b` is the seeds' worked example: GPT-3's published shape (96 layers, hidden 12288, plain
GELU MLP of 4h, tied embeddings) with the vocabulary padded to 51200 so that tp up to 8 divides it (as Megatron pads
it); biases, LayerNorm shifts and the 2048 x 12288 position table (0.01% of the weights) are left out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}

_GPT3_175B: dict[str, Any] = {
    "name": "gpt3-175b", "num_layers": 96, "hidden_size": 12288, "intermediate_size": 4 * 12288,
    "num_heads": 96, "num_kv_heads": 96, "head_dim": 128, "vocab_size": 51200, "tie_word_embeddings": True,
    "is_gated_mlp": False, "max_context_len": 2048,
}
PLANNER_PRESETS = {"gpt3-175b": _GPT3_175B}


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int  # per expert for mixture-of-experts models
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    is_gated_mlp: bool = True  # SwiGLU (gate, up, down); False: plain two-matrix MLP (GPT-3)
    num_experts: int = 0  # 0: dense
    num_experts_per_token: int = 0
    dtype_bytes: int = 2
    max_context_len: int = 0  # 0: unknown

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                     "vocab_size", "dtype_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model {self.name}: {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"model {self.name}: num_kv_heads={self.num_kv_heads} must divide "
                             f"num_heads={self.num_heads}")
        if self.num_experts < 0 or (self.num_experts > 0) != (self.num_experts_per_token > 0):
            raise ValueError(f"model {self.name}: num_experts ({self.num_experts}) and num_experts_per_token "
                             f"({self.num_experts_per_token}) must both be 0 (dense) or both positive")
        if self.num_experts_per_token > self.num_experts:
            raise ValueError(f"model {self.name}: num_experts_per_token={self.num_experts_per_token} exceeds "
                             f"num_experts={self.num_experts}")

    # --- parameters ---------------------------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def attention_params_per_layer(self) -> int:
        """q, k, v and o projections."""
        h = self.hidden_size
        return h * (self.q_size + 2 * self.kv_size) + self.q_size * h

    @property
    def mlp_params_per_expert(self) -> int:
        return (3 if self.is_gated_mlp else 2) * self.hidden_size * self.intermediate_size

    @property
    def mlp_params_per_layer(self) -> int:
        """All of one layer's MLP weights (every expert, plus the router, for MoE)."""
        if not self.is_moe:
            return self.mlp_params_per_expert
        return self.num_experts * self.mlp_params_per_expert + self.hidden_size * self.num_experts

    @property
    def norm_params_per_layer(self) -> int:
        return 2 * self.hidden_size

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head_params(self) -> int:
        """The LM head's own table (0 when tied to the embedding on a single-stage mesh)."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def layer_params(self) -> int:
        return self.attention_params_per_layer + self.mlp_params_per_layer + self.norm_params_per_layer

    @property
    def num_params(self) -> int:
        return (self.num_layers * self.layer_params + self.embedding_params + self.head_params
                + self.hidden_size)

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    @property
    def active_linear_params_per_layer(self) -> int:
        """Weights one token multiplies in one layer (its k experts, not all of them)."""
        experts = self.num_experts_per_token if self.is_moe else 1
        router = self.hidden_size * self.num_experts if self.is_moe else 0
        return self.attention_params_per_layer + experts * self.mlp_params_per_expert + router

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers (the whole model, before any sharding)."""
        return 2 * self.num_layers * self.kv_size * self.dtype_bytes

    def with_dtype_bytes(self, dtype_bytes: int) -> ModelShape:
        from dataclasses import replace

        return replace(self, dtype_bytes=dtype_bytes)

    # --- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], *, name: str = "model", dtype_bytes: int | None = None) -> ModelShape:
        """From a Hugging Face config.json's contents. Dense models go through `mesh.config.ModelConfig`
        (ModelConfigError names an unsupported key); Mixtral-style MoE keys are read here."""
        from mesh.config import ModelConfig

        dtype_bytes = dtype_bytes or DTYPE_BYTES.get(str(raw.get("torch_dtype", "bfloat16")), 2)
        num_experts = int(raw.get("num_local_experts") or raw.get("num_experts") or 0)
        dense = dict(raw)
        if num_experts:
            # Validate everything but the experts with the serving code's own parser, as the dense Llama it
            # resembles (the mesh does not run MoE yet; the planner sizes it anyway).
            dense["architectures"] = ["LlamaForCausalLM"]
            dense["model_type"] = "llama"
            for key in ("num_local_experts", "num_experts", "num_experts_per_tok", "sliding_window",
                        "router_aux_loss_coef", "output_router_logits"):
                dense.pop(key, None)
        config = ModelConfig.from_hf_dict(dense)
        return cls(
            name=name,
            num_layers=config.num_layers,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            vocab_size=config.vocab_size,
            tie_word_embeddings=config.tie_word_embeddings,
            is_gated_mlp=True,
            num_experts=num_experts,
            num_experts_per_token=int(raw.get("num_experts_per_tok") or 0) if num_experts else 0,
            dtype_bytes=dtype_bytes,
            max_context_len=config.max_position_embeddings,
        )

    @classmethod
    def from_dir(cls, path: str | Path, *, dtype_bytes: int | None = None) -> ModelShape:
        from mesh.config import ModelConfigError

        config_path = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
        try:
            raw = json.loads(config_path.read_text())
        except FileNotFoundError:
            raise ModelConfigError(f"config.json not found at {str(config_path)!r}") from None
        except json.JSONDecodeError as error:
            raise ModelConfigError(f"{str(config_path)!r} is not valid JSON: {error}") from None
        name = config_path.parent.name if config_path.name == "config.json" else config_path.stem
        return cls.from_hf_dict(raw, name=name, dtype_bytes=dtype_bytes)

    @classmethod
    def from_preset(cls, preset: str, *, dtype_bytes: int = 2) -> ModelShape:
        """A planner preset (`gpt3-175b`) or any `mesh.presets.PRESETS` name."""
        if preset in PLANNER_PRESETS:
            return cls(**PLANNER_PRESETS[preset], dtype_bytes=dtype_bytes)
        from mesh.presets import PRESETS

        if preset not in PRESETS:
            known = sorted(set(PRESETS) | set(PLANNER_PRESETS))
            raise ValueError(f"unknown model preset {preset!r}; known: {', '.join(known)}")
        return cls.from_hf_dict(PRESETS[preset], name=preset, dtype_bytes=dtype_bytes)


def known_presets() -> list[str]:
    from mesh.presets import PRESETS

    return sorted(set(PRESETS) | set(PLANNER_PRESETS))
