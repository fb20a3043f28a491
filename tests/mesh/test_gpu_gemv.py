"""mesh.triton_gemv's fused matrix-vector kernel against its plain-torch definition (TorchOps.fused_linear): in bf16
on CUDA, or in float32 on the CPU under Triton's interpreter (TRITON_INTERPRET=1, when Triton is installed); and
the tile tuner's bookkeeping (CUDA graphs: CUDA only). Inputs are fresh random draws of awkward shapes (N not a
multiple of the tile, K not a multiple of block_k)."""

from __future__ import annotations

import os

import pytest
import torch

from mesh.gpu_ops import TorchOps

pytestmark = pytest.mark.gpu


@pytest.fixture
def kernel():
    """(device, dtype, relative tolerance) the kernels run with here."""
    if torch.cuda.is_available():
        return "cuda", torch.bfloat16, 1e-2
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.importorskip("triton")
        return "cpu", torch.float32, 1e-5
    pytest.skip("needs CUDA, or Triton's interpreter (TRITON_INTERPRET=1)")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("rows", [1, 2, 4, 8])
@pytest.mark.parametrize(("num_out", "k"), [(300, 512), (257, 1000), (64, 4096)])
def test_fused_gemv_matches_torch_for_every_prologue_and_epilogue(kernel, rows, num_out, k):
    from mesh.triton_gemv import candidate_tiles, fused_gemv

    torch.manual_seed(rows * 1000 + num_out)
    device, dtype, tol = kernel
    weight = (torch.randn(num_out, k, device=device) * k ** -0.5).to(dtype)
    bias = torch.randn(num_out, device=device).to(dtype)
    for tile in candidate_tiles(rows)[:3 if device == "cuda" else 1]:  # the interpreter is slow
        x = torch.randn(rows, k, device=device).to(dtype)
        got = fused_gemv(x, weight, bias, tile=tile)
        assert _rel(got, TorchOps.fused_linear(x, weight, bias)) < tol

        logits = fused_gemv(x, weight, out_dtype=torch.float32, tile=tile)
        assert logits.dtype == torch.float32
        assert _rel(logits, TorchOps.fused_linear(x, weight, out_dtype=torch.float32)) < tol

        norm_weight = (1 + 0.1 * torch.randn(k, device=device)).to(dtype)
        sumsq = x.float().pow(2).sum(-1)
        expected = TorchOps.fused_linear(x, weight, norm=(norm_weight, sumsq, 1e-5))
        got = fused_gemv(x, weight, norm=(norm_weight, sumsq, 1e-5), tile=tile)
        assert _rel(got, expected) < tol

        gate_up = torch.randn(rows, 2 * k, device=device).to(dtype)
        expected = TorchOps.fused_linear(gate_up, weight, silu_input=True)
        assert _rel(fused_gemv(gate_up, weight, silu_input=True, tile=tile), expected) < tol


@pytest.mark.parametrize("rows", [1, 4])
def test_residual_epilogue_updates_h_in_place_and_accumulates_its_squares(kernel, rows):
    from mesh.triton_gemv import candidate_tiles, fused_gemv

    torch.manual_seed(rows)
    device, dtype, tol = kernel
    num_out, k = 333, 768
    weight = (torch.randn(num_out, k, device=device) * k ** -0.5).to(dtype)
    for tile in candidate_tiles(rows)[:3 if device == "cuda" else 1]:  # the interpreter is slow
        x = torch.randn(rows, k, device=device).to(dtype)
        h = torch.randn(rows, num_out, device=device).to(dtype)
        h_ref = h.clone()
        start = torch.rand(rows, device=device)  # accumulates onto what is there
        sumsq, sumsq_ref = start.clone(), start.clone()
        returned = fused_gemv(x, weight, residual=(h, sumsq), tile=tile)
        TorchOps.fused_linear(x, weight, residual=(h_ref, sumsq_ref))
        assert returned.data_ptr() == h.data_ptr()
        assert _rel(h, h_ref) < tol
        torch.testing.assert_close(sumsq, sumsq_ref, rtol=2 * tol, atol=1e-3)


def test_rejects_rows_it_cannot_hold_and_two_prologues(kernel):
    from mesh.triton_gemv import fused_gemv

    device, dtype, _ = kernel
    weight = torch.randn(16, 64, device=device, dtype=dtype)
    with pytest.raises(ValueError, match="rows"):
        fused_gemv(torch.randn(3, 64, device=device, dtype=dtype), weight)
    with pytest.raises(ValueError, match="one prologue"):
        x = torch.randn(1, 128, device=device, dtype=dtype)
        fused_gemv(x, weight, norm=(weight[0], x[:, 0].float(), 1e-5), silu_input=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="times CUDA graph replays")
def test_tuner_sets_a_tile_for_every_projection():
    from mesh.config import ModelConfig
    from mesh.gpu_decoder import GpuDecoder
    from mesh.gpu_gemv_tuning import PROJECTIONS, tune_decode_gemv
    from mesh.gpu_weights import random_tensors
    from mesh.presets import PRESETS

    hf_config = dict(PRESETS["tiny-llama"])
    decoder = GpuDecoder.from_tensors(ModelConfig.from_hf_dict(hf_config), random_tensors(hf_config, device="cuda"))
    report = tune_decode_gemv(decoder, 1)
    assert [row["projection"] for row in report] == list(PROJECTIONS)
    for row in report:
        assert (row["projection"], 1) in decoder.gemv_tiles, row["failed"]
        assert (row["projection"], 1) in decoder.plain_gemv_tiles
        assert row["us"] > 0 and row["cublas_us"] > 0
        assert row["plain_best_us"] <= row["cublas_us"]
