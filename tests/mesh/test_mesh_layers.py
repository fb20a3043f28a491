import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers import LlamaConfig

from mesh.layers import ColumnParallelLinear, RMSNorm, RotaryEmbedding, RowParallelLinear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_transformers_bitwise(dtype):
    torch.manual_seed(0)
    weight = 1 + 0.1 * torch.randn(32)
    x = (3 * torch.randn(7, 32)).to(dtype)
    ours = RMSNorm(32, eps=1e-5, dtype=dtype)
    ours.load_full(weight)
    reference = LlamaRMSNorm(32, eps=1e-5).to(dtype)
    reference.weight.data.copy_(weight)
    assert torch.equal(ours(x), reference(x))


def test_rotary_matches_transformers_for_arbitrary_positions():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
    positions = torch.tensor([0, 1, 2, 7, 3, 100, 999])
    q = torch.randn(7, 4, 16)
    k = torch.randn(7, 2, 16)
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(q, positions[None])
    # transformers works on [batch, heads, seq, dim].
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], hf_cos, hf_sin)
    rotary = RotaryEmbedding(16, rope_theta=10000.0, rope_scaling=None)
    cos, sin = rotary.cos_sin(positions, torch.float32)
    assert torch.equal(RotaryEmbedding.apply(q, cos, sin), hf_q[0].transpose(0, 1))
    assert torch.equal(RotaryEmbedding.apply(k, cos, sin), hf_k[0].transpose(0, 1))


def test_column_parallel_shards_rows_and_reads_safetensors_slices(tmp_path):
    torch.manual_seed(0)
    weight, bias = torch.randn(8, 6), torch.randn(8)
    save_file({"w": weight, "b": bias}, str(tmp_path / "x.safetensors"))
    x = torch.randn(3, 6)
    outputs = []
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        for shard in range(2):
            layer = ColumnParallelLinear(6, 8, bias=True, num_shards=2, shard_index=shard)
            layer.load_full(f.get_slice("w"))
            layer.load_full(f.get_slice("b"), "bias")
            assert layer.weight.shape == (4, 6)
            outputs.append(layer(x))
    torch.testing.assert_close(torch.cat(outputs, dim=-1), x @ weight.T + bias)


def test_row_parallel_without_group_is_the_full_linear():
    torch.manual_seed(0)
    weight = torch.randn(5, 8)
    layer = RowParallelLinear(8, 5, bias=False)
    layer.load_full(weight)
    x = torch.randn(2, 8)
    torch.testing.assert_close(layer(x), x @ weight.T)


def test_load_full_rejects_wrong_shape():
    layer = ColumnParallelLinear(6, 8, bias=False)
    with pytest.raises(ValueError, match=r"ColumnParallelLinear.weight.*\(8, 7\)"):
        layer.load_full(torch.zeros(8, 7))
    with pytest.raises(ValueError, match="bias"):
        layer.load_full(torch.zeros(8), "bias")
