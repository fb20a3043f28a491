"""The per-layer step operations of the GPU fast path (mesh.gpu_decoder), in two interchangeable implementations:
`TorchOps` (plain torch: the reference semantics, and the path that runs where Triton cannot, e.g. on CPU) and
`mesh.triton_decode.TritonOps` (one fused Triton kernel each, capturable in CUDA graphs).

Who calls it: `mesh.gpu_decoder.GpuDecoder`, once per layer per step. What each operation promises (both
implementations, checked against each other by tests/mesh/test_gpu_decoder.py):
- `add_rms_norm(h, delta, weight, eps)`: `h += delta` in place (skipped when delta is None), then returns
  `rms_norm(h) * weight` with mesh.layers.RMSNorm's numerics (float32 statistics, cast back, then scale).
- `rope_and_store(qkv, positions, slots, cos, sin, cache, num_heads, num_kv_heads)`: qkv [T, (H + 2 Hkv) * D] is
  the fused projection's output. Rotates q and k (rotate-half RoPE, mesh.layers.RotaryEmbedding's numerics, with
  cos/sin read from per-position tables [max_positions, D / 2] in the model dtype), writes each token's rotated k
  and its v into cache slot `slots[t]` (block slot // block_size, row slot % block_size; slot < 0 = padding row,
  nothing written; cache None = nothing written). Returns (q [T, H, D], k [T, Hkv, D]) contiguous.
- `paged_decode_attention(q, cache, block_tables, seq_lens, scale, num_splits)`: one query per sequence
  (q [B, H, D]) over the first `seq_lens[b]` cached tokens of sequence b (its blocks in block_tables[b]); a row with
  seq_len 0 (padding) returns zeros. GQA: query head h reads KV head h // (H / Hkv). Returns [B, H, D].
  `num_splits` only changes how the work is divided (same result up to rounding).
- `silu_mul(gate_up)`: gate_up [T, 2 I] (gate columns first) -> silu(gate) * up, [T, I].
- `fused_linear(x, weight, bias, *, norm, silu_input, residual, out_dtype, tile)`: `x @ weight.T + bias` for a
  decode step of a few rows, with the elementwise work around it folded in (mesh.triton_gemv's kernel):
  `norm=(norm_weight, sumsq, eps)` first replaces x by `norm_weight * rms_norm(x)` where `sumsq` [T] float32 already
  holds the sum of squares of each row of x (RMSNorm's numerics otherwise); `silu_input=True` first replaces x
  [T, 2 K] by `silu_mul(x)`; `residual=(h, sumsq_out)` adds the product into h in place (the rounding of
  `h += delta`), adds each row's sum of squares of the new h into `sumsq_out`, and returns h; otherwise returns
  a new [T, N] tensor in `out_dtype` (default the weight's; the product is rounded to the weight's dtype first).
  `tile` (mesh.triton_gemv.GemvTile) only changes how the work is divided.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# The fused decode path (fused_linear) runs buckets of a power of two rows up to this many (mesh.triton_gemv keeps
# the rows of one program in registers).
MAX_FUSED_ROWS = 8


def is_fusable(num_rows: int) -> bool:
    return 1 <= num_rows <= MAX_FUSED_ROWS and num_rows & (num_rows - 1) == 0


class TorchOps:
    """Plain torch; not capturable in a CUDA graph (padding rows are filtered on the host)."""

    name = "torch"
    is_graph_safe = False

    @staticmethod
    def add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if delta is not None:
            h.add_(delta)  # the same rounding as the reference's `h = h + delta`
        x32 = h.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x32.to(h.dtype)

    @staticmethod
    def rope_and_store(qkv: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, cache: torch.Tensor | None, num_heads: int,
                       num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        num_tokens = qkv.shape[0]
        head_dim = 2 * cos.shape[1]
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        q = qkv[:, :q_size].reshape(num_tokens, num_heads, head_dim)
        k = qkv[:, q_size:q_size + kv_size].reshape(num_tokens, num_kv_heads, head_dim)
        v = qkv[:, q_size + kv_size:].reshape(num_tokens, num_kv_heads, head_dim)
        cos_full = torch.cat((cos[positions], cos[positions]), dim=-1)[:, None, :]
        sin_full = torch.cat((sin[positions], sin[positions]), dim=-1)[:, None, :]
        q, k = _rotate(q, cos_full, sin_full), _rotate(k, cos_full, sin_full)
        if cache is not None:
            is_real = slots >= 0
            real_slots = slots[is_real]
            block_size = cache.shape[2]
            blocks, rows = real_slots // block_size, real_slots % block_size
            cache[blocks, 0, rows] = k[is_real].to(cache.dtype)
            cache[blocks, 1, rows] = v[is_real].to(cache.dtype)
        return q.contiguous(), k.contiguous()

    @staticmethod
    def paged_decode_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                               seq_lens: torch.Tensor, scale: float, num_splits: int = 1) -> torch.Tensor:
        num_seqs, num_heads, head_dim = q.shape
        block_size, num_kv_heads = cache.shape[2], cache.shape[3]
        out = torch.zeros_like(q)
        for b, seq_len in enumerate(seq_lens.tolist()):
            if seq_len <= 0:
                continue
            num_blocks = -(-seq_len // block_size)
            kv = cache[block_tables[b, :num_blocks].long()]  # [n, 2, block_size, Hkv, D]
            k = kv[:, 0].reshape(-1, num_kv_heads, head_dim)[:seq_len].to(q.dtype)
            v = kv[:, 1].reshape(-1, num_kv_heads, head_dim)[:seq_len].to(q.dtype)
            repeats = num_heads // num_kv_heads
            k = k.repeat_interleave(repeats, dim=1).transpose(0, 1)  # [H, L, D]
            v = v.repeat_interleave(repeats, dim=1).transpose(0, 1)
            attn = F.scaled_dot_product_attention(q[b][:, None, :], k, v, scale=scale)  # [H, 1, D]
            out[b] = attn[:, 0, :]
        return out

    @staticmethod
    def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                     norm: tuple[torch.Tensor, torch.Tensor, float] | None = None, silu_input: bool = False,
                     residual: tuple[torch.Tensor, torch.Tensor] | None = None,
                     out_dtype: torch.dtype | None = None, tile: object = None) -> torch.Tensor:
        if norm is not None:
            norm_weight, sumsq, eps = norm
            inv_rms = torch.rsqrt(sumsq / x.shape[-1] + eps)
            x = norm_weight * (x.to(torch.float32) * inv_rms[:, None]).to(x.dtype)
        if silu_input:
            x = TorchOps.silu_mul(x)
        y = F.linear(x, weight, bias)
        if residual is None:
            return y if out_dtype is None else y.to(out_dtype)
        h, sumsq_out = residual
        h.add_(y)
        sumsq_out.add_(h.to(torch.float32).pow(2).sum(-1))
        return h


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(-1) (the first index of the maximum, as argmax), in two passes over the vocabulary: the
    maxima of up to 256 equal column chunks, then the best chunk. Why: argmax over one long row runs in a single
    thread block (28 us for a 128K vocabulary on an H200, more than a layer's attention); the chunked maxima run
    in parallel. Graph safe (shape-determined work only)."""
    num_rows, vocab = logits.shape
    num_chunks = 1
    while num_chunks < 256 and vocab % (2 * num_chunks) == 0 and vocab // (2 * num_chunks) >= 64:
        num_chunks *= 2
    if num_chunks == 1:
        return logits.argmax(dim=-1)
    chunk_max, chunk_index = logits.view(num_rows, num_chunks, vocab // num_chunks).max(dim=-1)
    best_chunk = chunk_max.argmax(dim=-1, keepdim=True)
    return (best_chunk * (vocab // num_chunks) + chunk_index.gather(1, best_chunk)).squeeze(1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, in x's dtype, as mesh.layers.RotaryEmbedding.apply computes it."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_tables(inv_freq: torch.Tensor, max_positions: int, dtype: torch.dtype,
                device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_positions, D / 2] in `dtype`, computed in float32 exactly as RotaryEmbedding.cos_sin does,
    so a table lookup gives the reference's values."""
    positions = torch.arange(max_positions, device=device, dtype=torch.float32)
    angles = positions[:, None] * inv_freq.to(device=device, dtype=torch.float32)[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def default_ops(device: torch.device) -> object:
    """TritonOps on a CUDA device where Triton imports, TorchOps otherwise."""
    if device.type == "cuda":
        try:
            from mesh.triton_decode import TritonOps
        except ImportError:
            return TorchOps
        return TritonOps
    return TorchOps
