"""CausalLM against transformers' own classes on the same directory (float32, CPU)."""

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from mesh.config import ModelConfigError
from mesh.kv_cache import allocate_kv_cache
from mesh.model import AttentionBatch, CausalLM, CheckpointError
from mesh.presets import make_model

VARIANTS = ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-llama3-rope", "tiny-mixtral"]
PROMPT_LENS = [5, 11, 1, 23]


def _prompts(seed: int = 0, lens=PROMPT_LENS) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (n,), generator=generator) for n in lens]


def _relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@pytest.fixture(scope="module")
def models(model_dir):
    loaded = {}

    def get(variant):
        if variant not in loaded:
            loaded[variant] = CausalLM.load(model_dir(variant))
        return loaded[variant]

    return get


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_prefill_logits_match_transformers(variant, models, hf_model, monkeypatch):
    # One rank: no collective may run.
    for name in ("all_reduce", "all_gather"):
        monkeypatch.setattr(dist, name, lambda *a, **k: pytest.fail("communication on a one-rank mesh"))
    model, reference = models(variant), hf_model(variant)
    prompts = _prompts()
    # Offset positions of the last prompt: positions come per token, so a prompt may start anywhere
    # (transformers gets the same position_ids).
    position_starts = [0, 0, 0, 40]
    input_ids = torch.cat(prompts)
    positions = torch.cat([torch.arange(s, s + len(p)) for s, p in zip(position_starts, prompts)])
    batch = AttentionBatch(PROMPT_LENS, [0] * len(prompts), None, torch.arange(len(input_ids)))
    logits = model(input_ids, positions, batch)
    assert logits.dtype == torch.float32 and logits.shape == (len(input_ids), 512)
    start = 0
    for prompt, position_start in zip(prompts, position_starts):
        position_ids = torch.arange(position_start, position_start + len(prompt))[None]
        with torch.no_grad():
            expected = reference(prompt[None], position_ids=position_ids).logits[0]
        assert _relative_error(logits[start:start + len(prompt)], expected) < 1e-4
        start += len(prompt)


def test_logits_indices_select_rows(models):
    model = models("tiny-llama")
    prompts = _prompts(1, [4, 6])
    input_ids = torch.cat(prompts)
    positions = torch.cat([torch.arange(len(p)) for p in prompts])
    full = model(input_ids, positions, AttentionBatch([4, 6], [0, 0], None, torch.arange(10)))
    last = model(input_ids, positions, AttentionBatch([4, 6], [0, 0], None,
                                                      AttentionBatch.last_token_indices([4, 6])))
    torch.testing.assert_close(last, full[[3, 9]], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", ["tiny-llama", "tiny-mistral"])
def test_chunked_prefill_mixed_with_decode_matches_one_shot(variant, models):
    """Sequence A prefills in two chunks (the second attends to cached context); sequence B decodes one token in
    the same step. Both must equal a one-shot prefill of the whole sequence."""
    model = models(variant)
    block_size = 4
    tokens_a, tokens_b = _prompts(2, [13, 9])
    cache = allocate_kv_cache(model, 16, block_size)
    table_a, table_b = [9, 2, 14, 5], [7, 0, 11]
    # Step 1: A's first 6 tokens and B's first 8 tokens.
    step1 = AttentionBatch([6, 8], [0, 0], [table_a, table_b], AttentionBatch.last_token_indices([6, 8]))
    model(torch.cat([tokens_a[:6], tokens_b[:8]]), torch.cat([torch.arange(6), torch.arange(8)]), step1, cache)
    # Step 2: A's remaining 7 tokens with 6 of context, B's 9th token (decode) with 8 of context.
    step2 = AttentionBatch([7, 1], [6, 8], [table_a, table_b], torch.arange(8))
    mixed = model(torch.cat([tokens_a[6:], tokens_b[8:]]), torch.cat([torch.arange(6, 13), torch.tensor([8])]),
                  step2, cache)
    one_shot = model(torch.cat([tokens_a, tokens_b]), torch.cat([torch.arange(13), torch.arange(9)]),
                     AttentionBatch([13, 9], [0, 0], None, torch.arange(22)))
    assert _relative_error(mixed[:7], one_shot[6:13]) < 1e-5
    assert _relative_error(mixed[7:], one_shot[21:]) < 1e-5


def test_model_attributes(models):
    model = models("tiny-mistral")
    assert (model.num_layers, model.num_kv_heads_local, model.head_dim) == (4, 1, 32)
    cache = allocate_kv_cache(model, 3, 8)
    assert len(cache) == 4 and cache[0].shape == (3, 2, 8, 1, 32) and cache[0].dtype == torch.float32


def test_tied_model_shares_one_table(models):
    model = models("tiny-qwen2")
    assert model.lm_head.weight is model.embed_tokens.weight


def test_batch_validation_errors(models):
    model = models("tiny-llama")
    with pytest.raises(ValueError, match="block_tables"):
        AttentionBatch([2], [3], None, torch.tensor([1]))
    with pytest.raises(ValueError, match=r"block_tables\[0\]"):
        cache = allocate_kv_cache(model, 4, 4)
        model(torch.zeros(9, dtype=torch.long), torch.arange(9), AttentionBatch([9], [0], [[0, 1]], torch.tensor([8])),
              cache)
    with pytest.raises(ValueError, match="query_lens sums"):
        model(torch.zeros(3, dtype=torch.long), torch.arange(3), AttentionBatch([2], [0], None, torch.tensor([1])))


def test_checkpoint_errors_name_the_tensor(tmp_path):
    directory = make_model(tmp_path / "m", "tiny-llama")
    tensors = load_file(str(directory / "model.safetensors"))
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
        CausalLM.load(directory)
    tensors["model.layers.2.mlp.up_proj.weight"] = torch.zeros(128, 64)
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(1)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.mlp.extra.weight'"):
        CausalLM.load(directory)
    tensors.pop("model.layers.0.mlp.extra.weight")
    tensors["model.norm.weight"] = torch.zeros(63)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*\(63,\)"):
        CausalLM.load(directory)


def test_mixtral_checkpoint_errors_name_the_expert_tensor(tmp_path):
    directory = make_model(tmp_path / "moe", "tiny-mixtral")
    tensors = load_file(str(directory / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"experts\.3\.w2\.weight"):
        CausalLM.load(directory)


def test_qwen_moe_directory_is_refused_clearly(tmp_path):
    overrides = {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe"}
    with pytest.raises(ModelConfigError, match="not yet supported"):
        CausalLM.load(make_model(tmp_path / "moe", "tiny-mixtral", overrides=overrides))
