import json

import pytest
import torch
import transformers
from safetensors import safe_open

from mesh.model import AttentionBatch, CausalLM
from mesh.presets import PRESETS, make_model, tensor_specs


def test_directory_is_a_real_hf_checkpoint(tmp_path):
    directory = make_model(tmp_path, "tiny-llama", seed=3)
    config = json.loads((directory / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["torch_dtype"] == "float32"
    generation = json.loads((directory / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 257 and generation["bos_token_id"] == 256
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert f.metadata() == {"format": "pt"}
    assert "model.layers.3.self_attn.q_proj.weight" in names and "lm_head.weight" in names
    assert names == {name for name, _, _ in tensor_specs(config)}


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    a = (make_model(tmp_path / "a", "tiny-qwen2", seed=5) / "model.safetensors").read_bytes()
    b = (make_model(tmp_path / "b", "tiny-qwen2", seed=5) / "model.safetensors").read_bytes()
    c = (make_model(tmp_path / "c", "tiny-qwen2", seed=6) / "model.safetensors").read_bytes()
    assert a == b and a != c


def test_bf16_checkpoint_loads_and_tracks_float32(tmp_path):
    fp32 = CausalLM.load(make_model(tmp_path / "fp32", "tiny-llama", seed=2))
    bf16_dir = make_model(tmp_path / "bf16", "tiny-llama", seed=2, dtype=torch.bfloat16)
    assert json.loads((bf16_dir / "config.json").read_text())["torch_dtype"] == "bfloat16"
    bf16 = CausalLM.load(bf16_dir, dtype=torch.bfloat16)
    assert bf16.embed_tokens.weight.dtype == torch.bfloat16
    ids = torch.arange(10) * 7
    batch = AttentionBatch([10], [0], None, torch.arange(10))
    reference, low = fp32(ids, torch.arange(10), batch), bf16(ids, torch.arange(10), batch)
    assert low.dtype == torch.float32
    assert ((low - reference).abs().max() / reference.abs().max()) < 0.1


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-mistral"])
def test_random_weights_are_decisive(tmp_path, preset):
    """Greedy decoding must not hinge on near-ties: the top-1 margin is usually well above float32 noise."""
    model = CausalLM.load(make_model(tmp_path, preset, seed=0))
    ids = torch.randint(0, 512, (200,), generator=torch.Generator().manual_seed(0))
    logits = model(ids, torch.arange(200), AttentionBatch([200], [0], None, torch.arange(200)))
    top2 = logits.topk(2, dim=-1).values
    margins = top2[:, 0] - top2[:, 1]
    assert (margins > 1e-3).float().mean() > 0.97
    assert logits.argmax(-1).unique().numel() > 20  # predictions depend on context, not one favourite token


def test_mixtral_preset_loads_in_transformers(tmp_path):
    directory = make_model(tmp_path, "tiny-mixtral", seed=0)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                                    output_loading_info=True)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_real_shape_presets_have_the_published_dimensions():
    small, big = PRESETS["llama-3.2-1b"], PRESETS["llama-3-8b"]
    assert (small["hidden_size"], small["num_hidden_layers"], small["intermediate_size"]) == (2048, 16, 8192)
    assert (big["hidden_size"], big["num_hidden_layers"], big["intermediate_size"]) == (4096, 32, 14336)
    # Parameter counts from the specs: ~1.24 B and ~8.03 B.
    count = lambda config: sum(torch.Size(shape).numel() for _, shape, _ in tensor_specs(config))
    assert 1.2e9 < count(small) < 1.3e9 and 8.0e9 < count(big) < 8.1e9


def test_unknown_preset_named(tmp_path):
    with pytest.raises(ValueError, match="tiny-gpt"):
        make_model(tmp_path, "tiny-gpt")
