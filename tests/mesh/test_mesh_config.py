import json

import pytest
import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers import LlamaConfig

from mesh.config import ModelConfig, ModelConfigError
from mesh.layers import rope_inverse_frequencies
from mesh.presets import PRESETS


def _config(preset: str, **overrides) -> dict:
    raw = json.loads(json.dumps(PRESETS[preset]))
    raw.update(overrides)
    return raw


def test_tiny_llama_fields_from_dir(model_dir):
    config = ModelConfig.from_dir(model_dir("tiny-llama"))
    assert config.architecture == "LlamaForCausalLM"
    assert (config.vocab_size, config.hidden_size, config.num_layers) == (512, 64, 4)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (4, 2, 16)  # head_dim = 64 // 4
    assert config.rope_scaling is None and config.rope_theta == 10000.0
    assert not config.qkv_bias and not config.tie_word_embeddings
    assert config.bos_token_id == 256 and config.eos_token_ids == (257,)


def test_qwen2_has_qkv_bias_and_tied_embeddings():
    config = ModelConfig.from_hf_dict(_config("tiny-qwen2"))
    assert config.qkv_bias and config.tie_word_embeddings


def test_mistral_explicit_head_dim():
    config = ModelConfig.from_hf_dict(_config("tiny-mistral"))
    assert config.head_dim == 32 and config.q_size == 128 and config.kv_size == 32


def test_eos_token_id_list():
    config = ModelConfig.from_hf_dict(_config("tiny-llama", eos_token_id=[257, 258]))
    assert config.eos_token_ids == (257, 258)


def test_mistral_short_sliding_window_rejected_naming_the_key():
    with pytest.raises(ModelConfigError, match="sliding_window"):
        ModelConfig.from_hf_dict(_config("tiny-mistral", sliding_window=512))
    assert ModelConfig.from_hf_dict(_config("tiny-mistral", sliding_window=1024)).architecture == "MistralForCausalLM"
    assert ModelConfig.from_hf_dict(_config("tiny-mistral", sliding_window=None)).architecture == "MistralForCausalLM"


def test_qwen2_use_sliding_window_rejected():
    with pytest.raises(ModelConfigError, match="use_sliding_window"):
        ModelConfig.from_hf_dict(_config("tiny-qwen2", use_sliding_window=True, sliding_window=128))


@pytest.mark.parametrize("scaling", [{"type": "linear", "factor": 2.0}, {"rope_type": "yarn", "factor": 4.0},
                                     {"rope_type": "dynamic", "factor": 2.0}])
def test_other_rope_scaling_types_rejected(scaling):
    with pytest.raises(ModelConfigError, match="rope_scaling"):
        ModelConfig.from_hf_dict(_config("tiny-llama", rope_scaling=scaling))


def test_llama3_scaling_missing_field_named():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    with pytest.raises(ModelConfigError, match="rope_scaling.original_max_position_embeddings"):
        ModelConfig.from_hf_dict(_config("tiny-llama", rope_scaling=scaling))


def test_llama3_scaling_accepts_type_or_rope_type_and_transformers5_rope_parameters():
    fields = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    by_type = ModelConfig.from_hf_dict(_config("tiny-llama", rope_scaling={"type": "llama3", **fields}))
    by_rope_type = ModelConfig.from_hf_dict(_config("tiny-llama", rope_scaling={"rope_type": "llama3", **fields}))
    raw = _config("tiny-llama")
    del raw["rope_scaling"], raw["rope_theta"]
    raw["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, **fields}
    v5 = ModelConfig.from_hf_dict(raw)
    assert by_type.rope_scaling == by_rope_type.rope_scaling == v5.rope_scaling == {"rope_type": "llama3", **fields}
    assert v5.rope_theta == 500000.0


@pytest.mark.parametrize(("key", "value", "named"), [
    ("architectures", ["GPT2LMHeadModel"], "architectures"),
    ("hidden_size", None, "hidden_size"),
    ("hidden_act", "gelu", "hidden_act"),
    ("attention_bias", True, "attention_bias"),
    ("num_key_value_heads", 3, "num_key_value_heads"),
    ("eos_token_id", "eos", "eos_token_id"),
    ("eos_token_id", 9999, "eos_token_id"),
])
def test_bad_values_name_the_key(key, value, named):
    raw = _config("tiny-llama", **{key: value})
    if value is None:
        del raw[key]
    with pytest.raises(ModelConfigError, match=named):
        ModelConfig.from_hf_dict(raw)


def test_mixtral_experts_are_read():
    config = ModelConfig.from_hf_dict(_config("tiny-mixtral"))
    assert config.is_moe and (config.num_experts, config.num_experts_per_tok) == (4, 2)
    assert config.rope_theta == 1e6 and not ModelConfig.from_hf_dict(_config("tiny-llama")).is_moe


@pytest.mark.parametrize(("overrides", "named"), [({"num_experts_per_tok": 5}, "num_experts_per_tok"),
                                                  ({"num_local_experts": 0}, "num_local_experts"),
                                                  ({"sliding_window": 16}, "sliding_window")])
def test_mixtral_bad_expert_settings_name_the_key(overrides, named):
    with pytest.raises(ModelConfigError, match=named):
        ModelConfig.from_hf_dict(_config("tiny-mixtral", **overrides))


def test_mixtral_rope_theta_defaults_to_transformers_value():
    raw = _config("tiny-mixtral")
    del raw["rope_theta"]
    assert ModelConfig.from_hf_dict(raw).rope_theta == 1e6


def test_qwen_moe_not_yet_supported():
    raw = _config("tiny-mixtral", architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe")
    with pytest.raises(ModelConfigError, match="architectures.*not yet supported"):
        ModelConfig.from_hf_dict(raw)


def test_missing_config_json(tmp_path):
    with pytest.raises(ModelConfigError, match="config.json"):
        ModelConfig.from_dir(tmp_path)


def test_real_shape_presets_parse():
    small = ModelConfig.from_hf_dict(_config("llama-3.2-1b"))
    assert small.head_dim == 64 and small.tie_word_embeddings and small.rope_scaling["factor"] == 32.0
    big = ModelConfig.from_hf_dict(_config("llama-3-8b"))
    assert big.head_dim == 128 and big.num_kv_heads == 8 and big.rope_scaling is None


@pytest.mark.parametrize("original_context", [64, 8192])
def test_llama3_inverse_frequencies_match_transformers(original_context):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": original_context}
    hf_config = LlamaConfig(hidden_size=256, num_attention_heads=2, rope_theta=500000.0,
                            rope_scaling=dict(scaling), max_position_embeddings=131072)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    ours = rope_inverse_frequencies(128, 500000.0, scaling)
    plain = rope_inverse_frequencies(128, 500000.0, None)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0)
    # All three bands occur: kept (high frequencies), divided by factor (low), and blended in between.
    kept = torch.isclose(ours, plain)
    divided = torch.isclose(ours, plain / 8.0)
    assert kept.any() and divided.any() and (~kept & ~divided).any()
