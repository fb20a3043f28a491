"""The model's shape, read once from a Hugging Face `config.json`.

Who calls it: `CausalLM.load` (and anything that needs the shape before loading weights: the mesh validation, the
KV cache sizing in the decode tier, the tokenizer's bos/eos). It promises: either a `ModelConfig` this package can
run exactly as Hugging Face transformers does, or a `ModelConfigError` whose message names the offending key.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "MixtralForCausalLM")
MOE_ARCHITECTURES = ("MixtralForCausalLM",)

# Used when `architectures` is missing but `model_type` is present (older or hand-written configs).
_ARCHITECTURE_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
}

# Architectures we recognise but cannot run yet: a clearer message than "unsupported".
_NOT_YET_SUPPORTED = {
    "Qwen2MoeForCausalLM": "Qwen2-MoE (shared experts) is not yet supported by mesh.CausalLM; Mixtral is",
    "Qwen3MoeForCausalLM": "Qwen3-MoE is not yet supported by mesh.CausalLM; Mixtral is",
}

# Transformers' own defaults for keys a config.json may omit, per architecture.
_DEFAULT_MAX_POSITIONS = {"LlamaForCausalLM": 2048, "MistralForCausalLM": 4096 * 32, "Qwen2ForCausalLM": 32768,
                          "MixtralForCausalLM": 4096 * 32}
_DEFAULT_ROPE_THETA = {"MixtralForCausalLM": 1e6}

_LLAMA3_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


class ModelConfigError(ValueError):
    """A config.json this package cannot run; the message names the key and, where there is one, the fix."""


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    # None (plain RoPE) or the normalised llama3 dict: rope_type, factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings.
    rope_scaling: dict | None
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # Mixture of experts (Mixtral): 0 for a dense model. Every layer's MLP is then `num_experts` SwiGLU experts of
    # width intermediate_size, of which the router picks `num_experts_per_tok` per token.
    num_experts: int = 0
    num_experts_per_tok: int = 0

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelConfigError(
                f"architectures: {self.architecture!r} is not supported; expected one of {SUPPORTED_ARCHITECTURES}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ModelConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ModelConfigError(
                f"num_key_value_heads: {self.num_kv_heads} must divide num_attention_heads ({self.num_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ModelConfigError(f"head_dim: rotary embedding needs an even head_dim, got {self.head_dim}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ModelConfigError(f"rope_theta must be a positive number, got {self.rope_theta!r}")
        if not (self.rms_norm_eps > 0):
            raise ModelConfigError(f"rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        if self.rope_scaling is not None:
            _check_llama3_scaling(self.rope_scaling)
        is_moe = self.architecture in MOE_ARCHITECTURES
        if is_moe and not (isinstance(self.num_experts, int) and self.num_experts >= 1):
            raise ModelConfigError(f"num_local_experts: must be a positive integer, got {self.num_experts!r}")
        if is_moe and not (isinstance(self.num_experts_per_tok, int) and 1 <= self.num_experts_per_tok
                           <= self.num_experts):
            raise ModelConfigError(f"num_experts_per_tok: must be an integer in 1..{self.num_experts} "
                                   f"(num_local_experts), got {self.num_experts_per_tok!r}")
        if not is_moe and (self.num_experts or self.num_experts_per_tok):
            raise ModelConfigError(f"num_local_experts: {self.architecture} is a dense model; experts are only "
                                   f"read for {MOE_ARCHITECTURES}")
        if self.bos_token_id is not None and not 0 <= self.bos_token_id < self.vocab_size:
            raise ModelConfigError(f"bos_token_id: {self.bos_token_id} is outside the vocabulary ({self.vocab_size})")
        for eos in self.eos_token_ids:
            if not 0 <= eos < self.vocab_size:
                raise ModelConfigError(f"eos_token_id: {eos} is outside the vocabulary ({self.vocab_size})")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        """Reads `<path>/config.json`. Raises ModelConfigError (missing file, bad JSON, unsupported option)."""
        config_path = Path(path) / "config.json"
        try:
            raw = json.loads(config_path.read_text())
        except FileNotFoundError:
            raise ModelConfigError(f"config.json not found in model directory {str(path)!r}") from None
        except json.JSONDecodeError as error:
            raise ModelConfigError(f"config.json in {str(path)!r} is not valid JSON: {error}") from None
        if not isinstance(raw, dict):
            raise ModelConfigError("config.json must hold a JSON object")
        return cls.from_hf_dict(raw)

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Builds a ModelConfig from the contents of a Hugging Face config.json."""
        architecture = _architecture(raw)
        _reject_unsupported_options(architecture, raw)
        num_heads = _required_int(raw, "num_attention_heads")
        hidden_size = _required_int(raw, "hidden_size")
        head_dim = raw.get("head_dim")
        if head_dim is None:
            if hidden_size % num_heads != 0:
                raise ModelConfigError(
                    f"head_dim: missing, and hidden_size ({hidden_size}) is not divisible by "
                    f"num_attention_heads ({num_heads}); add head_dim to config.json"
                )
            head_dim = hidden_size // num_heads
        rope_theta, rope_scaling = _rope(raw, _DEFAULT_ROPE_THETA.get(architecture, 10000.0))
        is_moe = architecture in MOE_ARCHITECTURES
        return cls(
            architecture=architecture,
            vocab_size=_required_int(raw, "vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=_required_int(raw, "intermediate_size"),
            num_layers=_required_int(raw, "num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=raw.get("max_position_embeddings") or _DEFAULT_MAX_POSITIONS[architecture],
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=architecture == "Qwen2ForCausalLM",
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_eos_ids(raw.get("eos_token_id")),
            num_experts=_required_int(raw, "num_local_experts") if is_moe else 0,
            num_experts_per_tok=_required_int(raw, "num_experts_per_tok") if is_moe else 0,
        )


def _architecture(raw: dict[str, Any]) -> str:
    architectures = raw.get("architectures")
    if architectures is None and raw.get("model_type") in _ARCHITECTURE_BY_MODEL_TYPE:
        architectures = [_ARCHITECTURE_BY_MODEL_TYPE[raw["model_type"]]]
    if not architectures or not isinstance(architectures, list):
        raise ModelConfigError(
            f"architectures: missing or empty in config.json; expected one of {SUPPORTED_ARCHITECTURES}"
        )
    architecture = architectures[0]
    if architecture in _NOT_YET_SUPPORTED:
        raise ModelConfigError(f"architectures: {architecture!r}: {_NOT_YET_SUPPORTED[architecture]}")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ModelConfigError(
            f"architectures: {architecture!r} is not supported; expected one of {SUPPORTED_ARCHITECTURES}"
        )
    return architecture


def _reject_unsupported_options(architecture: str, raw: dict[str, Any]) -> None:
    """Options that would silently change the model's output if we ignored them."""
    hidden_act = raw.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise ModelConfigError(f"hidden_act: only 'silu' is supported, got {hidden_act!r}")
    if raw.get("attention_bias"):
        raise ModelConfigError("attention_bias: true is not supported (only Qwen2's q/k/v bias is)")
    if raw.get("mlp_bias"):
        raise ModelConfigError("mlp_bias: true is not supported")
    if architecture in ("MistralForCausalLM", "MixtralForCausalLM"):
        window = raw.get("sliding_window")
        max_positions = raw.get("max_position_embeddings") or _DEFAULT_MAX_POSITIONS[architecture]
        if window is not None and window < max_positions:
            raise ModelConfigError(
                f"sliding_window: {window} is shorter than max_position_embeddings ({max_positions}); "
                "sliding-window attention is not supported (set sliding_window to null)"
            )
    if architecture == "Qwen2ForCausalLM" and raw.get("use_sliding_window"):
        raise ModelConfigError(
            "use_sliding_window: true is not supported; sliding-window attention is not implemented "
            "(set use_sliding_window to false)"
        )


def _required_int(raw: dict[str, Any], key: str) -> int:
    if key not in raw:
        raise ModelConfigError(f"{key}: missing from config.json")
    value = raw[key]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelConfigError(f"{key}: must be a positive integer, got {value!r}")
    return value


def _rope(raw: dict[str, Any], default_theta: float) -> tuple[float, dict | None]:
    """Reads both the classic keys (rope_theta + rope_scaling) and transformers 5's rope_parameters."""
    parameters = raw.get("rope_parameters")
    scaling = raw.get("rope_scaling")
    theta = raw.get("rope_theta")
    key = "rope_scaling"
    if scaling is None and isinstance(parameters, dict):
        scaling, key = parameters, "rope_parameters"
        theta = parameters.get("rope_theta", theta)
    theta = default_theta if theta is None else theta
    if not isinstance(theta, (int, float)) or isinstance(theta, bool):
        raise ModelConfigError(f"rope_theta: must be a number, got {theta!r}")
    if scaling is None:
        return float(theta), None
    if not isinstance(scaling, dict):
        raise ModelConfigError(f"{key}: must be an object or null, got {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type != "llama3":
        raise ModelConfigError(
            f"{key}: rope type {rope_type!r} is not supported; only null/'default' and 'llama3' are"
        )
    normalised: dict[str, Any] = {"rope_type": "llama3"}
    for name in _LLAMA3_SCALING_KEYS:
        if name not in scaling:
            raise ModelConfigError(f"{key}.{name}: missing (required by rope type 'llama3')")
        normalised[name] = scaling[name]
    return float(theta), normalised


def _check_llama3_scaling(scaling: dict) -> None:
    if scaling.get("rope_type") != "llama3":
        raise ModelConfigError(f"rope_scaling: only rope_type 'llama3' is supported, got {scaling!r}")
    for name in _LLAMA3_SCALING_KEYS:
        value = scaling.get(name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ModelConfigError(f"rope_scaling.{name}: must be a positive number, got {value!r}")
    if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ModelConfigError(
            "rope_scaling.high_freq_factor: must be greater than rope_scaling.low_freq_factor, got "
            f"{scaling['high_freq_factor']} <= {scaling['low_freq_factor']}"
        )


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    raise ModelConfigError(f"eos_token_id: must be an integer or a list of integers, got {value!r}")
