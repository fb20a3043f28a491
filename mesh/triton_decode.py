"""Triton kernels of the GPU fast path: `TritonOps`, the fused implementation of mesh.gpu_ops' operations (that
module's docstring is the contract; TorchOps is the reference these kernels are tested against).

Who calls it: `mesh.gpu_decoder.GpuDecoder` on CUDA. Every launch has a grid and arguments that depend only on
tensor shapes and Python values fixed per batch bucket, and reads run-time values (positions, slots, sequence
lengths, block tables) from device tensors: the launches are capturable in CUDA graphs and a graph replays
correctly whatever those tensors hold. Integer arguments that vary with the batch are not specialised, so a new
batch size does not recompile a kernel.

Why these kernels: at batch 1 a decode step is a few hundred small launches, so every elementwise chain is one
kernel (residual add + RMSNorm; rotary + KV-cache write; SiLU * up). The paged attention reads only the blocks of
each sequence straight from the cache (no gather copy) and splits long contexts over several programs
(flash-decoding) so that a batch of one still spreads over the chip; a second kernel merges the splits by their
log-sum-exp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mesh.triton_gemv import GemvTile, fused_gemv
from mesh.triton_pdl import is_enabled as pdl_enabled
from mesh.triton_pdl import launch_options


@triton.jit
def _add_rms_norm_kernel(h_ptr, delta_ptr, weight_ptr, out_ptr, eps, hidden_size,
                         HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:  # mesh.triton_pdl: nothing an earlier kernel wrote is touched before this
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden_size
    h_row = h_ptr + row * hidden_size
    h = tl.load(h_row + offs, mask=mask, other=0.0)
    if HAS_DELTA:
        delta = tl.load(delta_ptr + row * hidden_size + offs, mask=mask, other=0.0)
        h = (h.to(tl.float32) + delta.to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(h_row + offs, h, mask=mask)
    x = h.to(tl.float32)
    mean_square = tl.sum(x * x, axis=0) / hidden_size
    normed = (x * tl.rsqrt(mean_square + eps)).to(out_ptr.dtype.element_ty)
    weight = tl.load(weight_ptr + offs, mask=mask, other=0.0)
    y = (weight.to(tl.float32) * normed.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * hidden_size + offs, y, mask=mask)


@triton.jit
def _rope_store_kernel(qkv_ptr, positions_ptr, slots_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, cache_ptr,
                       qkv_row_stride, stride_block, stride_kv, stride_row,
                       NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                       BLOCK_SIZE: tl.constexpr, HAS_CACHE: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:  # mesh.triton_pdl: nothing an earlier kernel wrote is touched before this
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)  # 0..NUM_HEADS - 1: a query head; then the KV heads
    HALF: tl.constexpr = HEAD_DIM // 2
    offs = tl.arange(0, HALF)
    position = tl.load(positions_ptr + token)
    cos = tl.load(cos_ptr + position * HALF + offs).to(tl.float32)
    sin = tl.load(sin_ptr + position * HALF + offs).to(tl.float32)
    src = qkv_ptr + token * qkv_row_stride + head * HEAD_DIM
    x1 = tl.load(src + offs)
    x2 = tl.load(src + HALF + offs)
    dtype = x1.dtype
    # x * cos + rotate_half(x) * sin with each product rounded to the model dtype, as the reference computes it.
    y1 = ((x1.to(tl.float32) * cos).to(dtype).to(tl.float32)
          - (x2.to(tl.float32) * sin).to(dtype).to(tl.float32)).to(dtype)
    y2 = ((x2.to(tl.float32) * cos).to(dtype).to(tl.float32)
          + (x1.to(tl.float32) * sin).to(dtype).to(tl.float32)).to(dtype)
    if head < NUM_HEADS:
        dst = q_out_ptr + (token * NUM_HEADS + head) * HEAD_DIM
        tl.store(dst + offs, y1)
        tl.store(dst + HALF + offs, y2)
    else:
        kv_head = head - NUM_HEADS
        dst = k_out_ptr + (token * NUM_KV_HEADS + kv_head) * HEAD_DIM
        tl.store(dst + offs, y1)
        tl.store(dst + HALF + offs, y2)
        if HAS_CACHE:
            slot = tl.load(slots_ptr + token)
            if slot >= 0:
                block = slot // BLOCK_SIZE
                row = slot % BLOCK_SIZE
                base = cache_ptr + block * stride_block + row * stride_row + kv_head * HEAD_DIM
                cache_dtype = cache_ptr.dtype.element_ty
                tl.store(base + offs, y1.to(cache_dtype))
                tl.store(base + HALF + offs, y2.to(cache_dtype))
                d = tl.arange(0, HEAD_DIM)
                v = tl.load(qkv_ptr + token * qkv_row_stride + (NUM_HEADS + NUM_KV_HEADS + kv_head) * HEAD_DIM + d)
                tl.store(base + stride_kv + d, v.to(cache_dtype))


@triton.jit(do_not_specialize=["num_splits"])
def _paged_decode_kernel(q_ptr, cache_ptr, tables_ptr, seq_lens_ptr, out_ptr, part_out_ptr, part_lse_ptr,
                         scale, num_splits, table_row_stride, stride_block, stride_kv, stride_row,
                         NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         IS_SPLIT: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:  # mesh.triton_pdl: nothing an earlier kernel wrote is touched before this
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    # Each split takes a whole number of BLOCK_N tiles; trailing splits of a short sequence are empty.
    per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    is_head = offs_g < GROUP
    heads = kv_head * GROUP + offs_g  # the query heads that read this KV head
    q = tl.load(q_ptr + (seq * NUM_HEADS + heads)[:, None] * HEAD_DIM + offs_d[None, :], mask=is_head[:, None],
                other=0.0)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    denominator = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    table = tables_ptr + seq * table_row_stride
    for tile_start in range(start, end, BLOCK_N):
        tokens = tile_start + offs_n
        is_token = tokens < end
        blocks = tl.load(table + tokens // BLOCK_SIZE, mask=is_token, other=0).to(tl.int64)
        rows = blocks * stride_block + (tokens % BLOCK_SIZE) * stride_row + kv_head * HEAD_DIM
        k = tl.load(cache_ptr + rows[:, None] + offs_d[None, :], mask=is_token[:, None], other=0.0)
        # V is issued right behind K, so both tiles are in flight together (one memory round trip, not two).
        v = tl.load(cache_ptr + stride_kv + rows[:, None] + offs_d[None, :], mask=is_token[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k).to(q.dtype)) * scale  # [BLOCK_G, BLOCK_N], float32
        scores = tl.where(is_token[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        denominator = denominator * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m = m_new
    has_keys = denominator > 0
    out = acc / tl.where(has_keys, denominator, 1.0)[:, None]
    if IS_SPLIT:
        part = (seq * NUM_HEADS + heads) * num_splits + split
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=is_head[:, None])
        lse = tl.where(has_keys, m + tl.log(tl.where(has_keys, denominator, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=is_head)
    else:
        dst = out_ptr + (seq * NUM_HEADS + heads)[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=is_head[:, None])


@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits_kernel(part_out_ptr, part_lse_ptr, out_ptr, num_splits,
                         MAX_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:  # mesh.triton_pdl: nothing an earlier kernel wrote is touched before this
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)  # seq * NUM_HEADS + head
    offs_s = tl.arange(0, MAX_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM)
    is_split = offs_s < num_splits
    lse = tl.load(part_lse_ptr + row * num_splits + offs_s, mask=is_split, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # every split empty (a padding row): weights 0, output 0
    weights = tl.exp(lse - m)
    total = tl.sum(weights, axis=0)
    parts = tl.load(part_out_ptr + (row * num_splits + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=is_split[:, None], other=0.0)
    out = tl.sum(parts * weights[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * HEAD_DIM + offs_d, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, intermediate_size, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:  # mesh.triton_pdl: nothing an earlier kernel wrote is touched before this
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate_size
    src = gate_up_ptr + row * 2 * intermediate_size
    gate = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(src + intermediate_size + cols, mask=mask, other=0.0)
    activated = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
    y = (activated.to(tl.float32) * up.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * intermediate_size + cols, y, mask=mask)


MAX_SPLITS = 16


class TritonOps:
    """mesh.gpu_ops' operations as Triton kernels (one launch each; two for a split attention)."""

    name = "triton"
    is_graph_safe = True

    @staticmethod
    def add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
        num_rows, hidden_size = h.shape
        out = torch.empty_like(h)
        block = triton.next_power_of_2(hidden_size)
        _add_rms_norm_kernel[(num_rows,)](h, delta if delta is not None else h, weight, out, eps, hidden_size,
                                          HAS_DELTA=delta is not None, BLOCK=block,
                                          num_warps=max(1, min(16, block // 512)), USE_PDL=pdl_enabled(),
                                          **launch_options())
        return out

    @staticmethod
    def rope_and_store(qkv: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, cache: torch.Tensor | None, num_heads: int,
                       num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        num_tokens = qkv.shape[0]
        head_dim = 2 * cos.shape[1]
        q = torch.empty((num_tokens, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
        k = torch.empty((num_tokens, num_kv_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
        has_cache = cache is not None
        target = cache if has_cache else k
        strides = (cache.stride(0), cache.stride(1), cache.stride(2)) if has_cache else (0, 0, 0)
        block_size = cache.shape[2] if has_cache else 1
        _rope_store_kernel[(num_tokens, num_heads + num_kv_heads)](
            qkv, positions, slots, cos, sin, q, k, target, qkv.stride(0), *strides,
            NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
            HAS_CACHE=has_cache, num_warps=1, USE_PDL=pdl_enabled(), **launch_options())
        return q, k

    @staticmethod
    def paged_decode_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                               seq_lens: torch.Tensor, scale: float, num_splits: int = 1) -> torch.Tensor:
        num_seqs, num_heads, head_dim = q.shape
        block_size, num_kv_heads = cache.shape[2], cache.shape[3]
        group = num_heads // num_kv_heads
        if not 1 <= num_splits <= MAX_SPLITS:
            raise ValueError(f"paged_decode_attention: num_splits must be in 1..{MAX_SPLITS}, got {num_splits}")
        out = torch.empty_like(q)
        is_split = num_splits > 1
        if is_split:
            part_out = torch.empty((num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
            part_lse = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=q.device)
        else:
            part_out = part_lse = out  # unused
        block_n = 64 if head_dim <= 128 else 32
        _paged_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
            q, cache, block_tables, seq_lens, out, part_out, part_lse, scale, num_splits, block_tables.stride(0),
            cache.stride(0), cache.stride(1), cache.stride(2),
            NUM_HEADS=num_heads, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
            BLOCK_N=block_n, BLOCK_SIZE=block_size, IS_SPLIT=is_split, num_warps=4, num_stages=2,
            USE_PDL=pdl_enabled(), **launch_options())
        if is_split:
            _merge_splits_kernel[(num_seqs * num_heads,)](part_out, part_lse, out, num_splits,
                                                          MAX_SPLITS=MAX_SPLITS, HEAD_DIM=head_dim, num_warps=1,
                                                          USE_PDL=pdl_enabled(), **launch_options())
        return out

    @staticmethod
    def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        num_rows, double = gate_up.shape
        intermediate_size = double // 2
        out = torch.empty((num_rows, intermediate_size), dtype=gate_up.dtype, device=gate_up.device)
        block = 1024
        _silu_mul_kernel[(num_rows, triton.cdiv(intermediate_size, block))](gate_up, out, intermediate_size,
                                                                           BLOCK=block, num_warps=4,
                                                                           USE_PDL=pdl_enabled(), **launch_options())
        return out


    @staticmethod
    def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                     norm: tuple[torch.Tensor, torch.Tensor, float] | None = None, silu_input: bool = False,
                     residual: tuple[torch.Tensor, torch.Tensor] | None = None,
                     out_dtype: torch.dtype | None = None, tile: GemvTile | None = None) -> torch.Tensor:
        return fused_gemv(x, weight, bias, norm=norm, silu_input=silu_input, residual=residual, out_dtype=out_dtype,
                          tile=tile)


def is_supported(head_dim: int) -> bool:
    """The kernels tile the head dimension whole: a power of two from 16 up (tl.dot needs K >= 16)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0 and head_dim <= 256
