"""Shared fixtures for the mesh tests: tiny preset directories (written once per session) and the Hugging Face
reference models loaded from the very same directories."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from mesh.presets import make_model

# Small original context so the llama3 scaling's three frequency bands all occur at head_dim 16.
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}

MODEL_VARIANTS = {
    "tiny-llama": ("tiny-llama", None),
    "tiny-qwen2": ("tiny-qwen2", None),
    "tiny-mistral": ("tiny-mistral", None),
    "tiny-llama3-rope": ("tiny-llama", {"rope_scaling": LLAMA3_SCALING}),
    "tiny-mixtral": ("tiny-mixtral", None),
}


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """model_dir(variant) -> directory of that tiny model, written once per test session."""
    written: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in written:
            preset, overrides = MODEL_VARIANTS[variant]
            written[variant] = make_model(tmp_path_factory.mktemp(variant), preset, seed=1234, overrides=overrides)
        return written[variant]

    return get


@pytest.fixture(scope="session")
def hf_model(model_dir):
    """hf_model(variant) -> transformers' own model class on the same directory, float32, eval mode."""
    loaded: dict[str, torch.nn.Module] = {}

    def get(variant: str) -> torch.nn.Module:
        if variant not in loaded:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                model_dir(variant), dtype=torch.float32, attn_implementation="eager")
            loaded[variant] = model.eval()
        return loaded[variant]

    return get


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny matrices on a shared 2-core machine: one intra-op thread is ~10x faster than two fighting threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
