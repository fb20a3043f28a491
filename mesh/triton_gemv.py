"""A Triton matrix-vector product for decode steps of a few rows (M <= 8), with the neighbouring elementwise work
folded in: `TritonOps.fused_linear` (mesh.gpu_ops states the contract; TorchOps.fused_linear is the reference).

Who calls it: `mesh.gpu_decoder.GpuDecoder.decode` on its fused path (buckets of at most `MAX_FUSED_ROWS` rows),
and `mesh.gpu_gemv_tuning` to pick a tile per weight shape by measurement.

Why: at batch 1 an 8B decode step is ~330 launches whose boundaries cost ~2 us each, and cuBLAS streams the small
q/k/v and o matrices at 60-80% of the copy bandwidth. Here each program owns BLOCK_N output columns and walks the
whole K dimension (no split-K, so no second reduction launch), reading weight rows once with evict-first loads;
the input row is recomputed per chunk from what the previous kernel left:
- prologue "rms_norm": x = weight_n * rms_norm(h), with h's sum of squares already accumulated by the kernel that
  last wrote h (so the separate add+RMSNorm launch disappears);
- prologue "silu_mul": x = silu(gate) * up read from the gate/up output (the SiLU launch disappears);
- epilogue "residual": h += x @ W^T written in place, and each program adds its columns' squares of the new h
  into `sumsq_out` (float32 atomics), which the next norm prologue reads.
Every rounding to the model dtype happens where the unfused path rounds, so results differ from it only in the
order of float32 sums. Under programmatic dependent launch (mesh.triton_pdl) the first weight tile is loaded
before waiting for the previous kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mesh.gpu_ops import MAX_FUSED_ROWS, is_fusable
from mesh.triton_pdl import is_enabled as pdl_enabled
from mesh.triton_pdl import launch_options

PROLOGUE_NONE, PROLOGUE_RMS_NORM, PROLOGUE_SILU_MUL = 0, 1, 2


@dataclass(frozen=True, kw_only=True)
class GemvTile:
    """Output columns per program, K elements per loop step, warps per program."""

    block_n: int
    block_k: int
    num_warps: int = 4

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"GemvTile.{name} must be a power of two >= 1, got {value}")


# Candidates the tuner measures at one row (mesh.gpu_gemv_tuning); the first is the default before tuning.
# Wide tiles (block_n 16, 32) spread the prologue, which every program recomputes over the whole input row, over
# more output columns; narrow ones give more programs for a short N.
CANDIDATE_TILES = (GemvTile(block_n=4, block_k=512), GemvTile(block_n=8, block_k=512),
                   GemvTile(block_n=16, block_k=256), GemvTile(block_n=2, block_k=1024),
                   GemvTile(block_n=8, block_k=1024, num_warps=8), GemvTile(block_n=16, block_k=512, num_warps=8),
                   GemvTile(block_n=32, block_k=256, num_warps=8))


def candidate_tiles(rows: int) -> list[GemvTile]:
    """The candidates for `rows` rows: block_k shrinks with the rows so the float32 accumulator (rows x block_n x
    block_k) stays the size it is at one row, in registers rather than spilled."""
    tiles = []
    for tile in CANDIDATE_TILES:
        scaled = GemvTile(block_n=tile.block_n, block_k=max(64, tile.block_k // rows), num_warps=tile.num_warps)
        if scaled not in tiles:
            tiles.append(scaled)
    return tiles


def default_tile(rows: int) -> GemvTile:
    return candidate_tiles(rows)[0]


@triton.jit
def _input_chunk(x_rows, ks, is_k, norm_w_ptr, inv_rms, silu_offset, PROLOGUE: tl.constexpr, EVEN_K: tl.constexpr):
    """The [ROWS, BLOCK_K] input chunk at columns ks, its prologue applied (rounded where the unfused ops round)."""
    if EVEN_K:
        x = tl.load(x_rows + ks[None, :])
    else:
        x = tl.load(x_rows + ks[None, :], mask=is_k[None, :], other=0.0)
    dtype = x.dtype
    if PROLOGUE == 1:
        normed = (x.to(tl.float32) * inv_rms[:, None]).to(dtype)
        if EVEN_K:
            nw = tl.load(norm_w_ptr + ks)
        else:
            nw = tl.load(norm_w_ptr + ks, mask=is_k, other=0.0)
        x = (nw.to(tl.float32)[None, :] * normed.to(tl.float32)).to(dtype)
    if PROLOGUE == 2:
        if EVEN_K:
            up = tl.load(x_rows + silu_offset + ks[None, :])
        else:
            up = tl.load(x_rows + silu_offset + ks[None, :], mask=is_k[None, :], other=0.0)
        gate = x.to(tl.float32)
        activated = (gate / (1.0 + tl.exp(-gate))).to(dtype)
        x = (activated.to(tl.float32) * up.to(tl.float32)).to(dtype)
    return x


@triton.jit
def _fused_gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, norm_w_ptr, sumsq_in_ptr, sumsq_out_ptr, eps,
                       N, K, x_row_stride, out_row_stride, silu_offset,
                       ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PROLOGUE: tl.constexpr,
                       HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, EVEN_K: tl.constexpr,
                       USE_PDL: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    is_n = offs_n < N
    offs_r = tl.arange(0, ROWS)
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * K
    x_rows = x_ptr + offs_r.to(tl.int64)[:, None] * x_row_stride
    dtype = w_ptr.dtype.element_ty
    # The first weight tile is read-only data: issued before waiting for the kernel that wrote x (PDL).
    is_k = offs_k < K
    if EVEN_K:
        w = tl.load(w_rows + offs_k[None, :], mask=is_n[:, None], other=0.0, eviction_policy="evict_first")
    else:
        w = tl.load(w_rows + offs_k[None, :], mask=is_n[:, None] & is_k[None, :], other=0.0,
                    eviction_policy="evict_first")
    if USE_PDL:  # mesh.triton_pdl: nothing an earlier kernel wrote is touched before this
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    inv_rms = tl.zeros([ROWS], tl.float32)
    if PROLOGUE == 1:
        inv_rms = tl.rsqrt(tl.load(sumsq_in_ptr + offs_r) / K + eps)
    x = _input_chunk(x_rows, offs_k, is_k, norm_w_ptr, inv_rms, silu_offset, PROLOGUE, EVEN_K)
    acc = w.to(tl.float32)[None, :, :] * x.to(tl.float32)[:, None, :]  # [ROWS, BLOCK_N, BLOCK_K]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        ks = k0 + offs_k
        is_k = ks < K
        if EVEN_K:
            w = tl.load(w_rows + ks[None, :], mask=is_n[:, None], other=0.0, eviction_policy="evict_first")
        else:
            w = tl.load(w_rows + ks[None, :], mask=is_n[:, None] & is_k[None, :], other=0.0,
                        eviction_policy="evict_first")
        x = _input_chunk(x_rows, ks, is_k, norm_w_ptr, inv_rms, silu_offset, PROLOGUE, EVEN_K)
        acc += w.to(tl.float32)[None, :, :] * x.to(tl.float32)[:, None, :]
    y = tl.sum(acc, axis=2)  # [ROWS, BLOCK_N]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=is_n, other=0.0).to(tl.float32)[None, :]
    dst = out_ptr + offs_r.to(tl.int64)[:, None] * out_row_stride + offs_n[None, :]
    if RESIDUAL:
        h = tl.load(dst, mask=is_n[None, :], other=0.0)
        new_h = (h.to(tl.float32) + y.to(dtype).to(tl.float32)).to(dtype)
        tl.store(dst, new_h, mask=is_n[None, :])
        squares = new_h.to(tl.float32)
        tl.atomic_add(sumsq_out_ptr + offs_r, tl.sum(squares * squares, axis=1))
    else:
        tl.store(dst, y.to(dtype).to(out_ptr.dtype.element_ty), mask=is_n[None, :])


def fused_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
               norm: tuple[torch.Tensor, torch.Tensor, float] | None = None, silu_input: bool = False,
               residual: tuple[torch.Tensor, torch.Tensor] | None = None, out_dtype: torch.dtype | None = None,
               tile: GemvTile | None = None) -> torch.Tensor:
    """See mesh.gpu_ops (TorchOps.fused_linear) for the contract; `tile` only changes how the work is divided."""
    rows = x.shape[0]
    num_out, k = weight.shape
    if not is_fusable(rows):
        raise ValueError(f"fused_gemv: {rows} rows; a power of two up to {MAX_FUSED_ROWS}")
    if norm is not None and silu_input:
        raise ValueError("fused_gemv: one prologue at a time (norm or silu_input)")
    width = 2 * k if silu_input else k
    if x.shape[1] != width or x.stride(1) != 1 or not weight.is_contiguous():
        raise ValueError(f"fused_gemv: x {tuple(x.shape)} (unit column stride) against weight {tuple(weight.shape)}")
    tile = tile or default_tile(rows)
    dummy = weight
    if residual is not None:
        out, sumsq_out = residual
        if out.shape != (rows, num_out) or out.stride(1) != 1:
            raise ValueError(f"fused_gemv: residual {tuple(out.shape)}, expected {(rows, num_out)}")
    else:
        out = torch.empty((rows, num_out), dtype=out_dtype or weight.dtype, device=weight.device)
        sumsq_out = dummy
    norm_weight, sumsq_in, eps = norm if norm is not None else (dummy, dummy, 0.0)
    prologue = PROLOGUE_RMS_NORM if norm is not None else PROLOGUE_SILU_MUL if silu_input else PROLOGUE_NONE
    grid = (triton.cdiv(num_out, tile.block_n),)
    _fused_gemv_kernel[grid](
        x, weight, bias if bias is not None else dummy, out, norm_weight, sumsq_in, sumsq_out, eps,
        num_out, k, x.stride(0), out.stride(0), k,
        ROWS=rows, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, PROLOGUE=prologue, HAS_BIAS=bias is not None,
        RESIDUAL=residual is not None, EVEN_K=k % tile.block_k == 0, num_warps=tile.num_warps,
        USE_PDL=pdl_enabled(), **launch_options())
    return out
