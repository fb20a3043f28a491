"""The GPU fast path of one dense decoder-only model on one GPU (tp = pp = cp = 1): the same function as
mesh.model.CausalLM (which stays the exactness reference), computed with fused weights and fused kernels.

Who calls it: `mesh.gpu_graphs.DecodeGraphs` (decode steps, captured in CUDA graphs), `mesh.gpu_step_runner`
(the decode engine's entry point), benchmarks/engine_speed.py and tests. It promises:
- `prefill(...)` and `decode(...)` return the logits CausalLM.forward returns for the same step (within bf16
  rounding on GPU; within float32 rounding with `TorchOps` on CPU) and write each new token's K (post-rotary) and V
  into the shared paged-cache format (docs/internals.md) before attention reads it.
- `decode` reads every run-time value from device tensors and launches only shape-determined work, so with
  `TritonOps` it can be captured in a CUDA graph and replayed for any batch contents of that size.

Per layer the decode step is ten launches: add+RMSNorm, QKV matmul, rotary+cache write, paged attention (+ split
merge), O matmul, add+RMSNorm, gate/up matmul, SiLU*up, down matmul. The fused decode (`decode(..., fused=True)`,
a few rows; mesh.triton_gemv) folds the norms, the residual adds and SiLU*up into the four projections: six
launches a layer. Which of the two a CUDA graph bucket runs is decided by measurement (mesh.gpu_graphs). Prefill
runs the same layers over the packed tokens with FlashAttention's variable-length kernel (torch's aten op;
per-sequence SDPA where it is missing).
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from mesh.config import ModelConfig
from mesh.gpu_ops import MAX_FUSED_ROWS, TorchOps, default_ops, greedy_tokens, is_fusable, rope_tables
from mesh.gpu_weights import FusedWeights, fuse, share_with_model, tensors_of_model
from mesh.layers import rope_inverse_frequencies

PrefillHook = Callable[[int, torch.Tensor, torch.Tensor], None]


class GpuDecoder:
    """Fused weights + rotary tables + the step operations (`ops`: TritonOps on CUDA, TorchOps elsewhere)."""

    def __init__(self, config: ModelConfig, weights: FusedWeights, *, ops: Any = None,
                 max_positions: int | None = None) -> None:
        self.config = config
        self.weights = weights
        self.device = weights.embed.device
        self.dtype = weights.embed.dtype
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim ** -0.5
        self.eps = config.rms_norm_eps
        self.ops = ops if ops is not None else default_ops(self.device)
        if self.ops is not TorchOps:
            from mesh.triton_decode import is_supported

            if not is_supported(self.head_dim):
                self.ops = TorchOps  # the kernels tile a power-of-two head_dim
        self.max_positions = max_positions or config.max_position_embeddings
        inv_freq = rope_inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        self.cos, self.sin = rope_tables(inv_freq, self.max_positions, self.dtype, self.device)
        self.prefill_attention_backend = "flash-varlen" if self.device.type == "cuda" else "sdpa"
        # (projection, rows) -> mesh.triton_gemv.GemvTile for the fused decode; set by mesh.gpu_gemv_tuning.
        self.gemv_tiles: dict[tuple[str, int], Any] = {}
        # (projection, rows) -> tile of the bare Triton product in the unfused decode, None (or absent) = cuBLAS.
        self.plain_gemv_tiles: dict[tuple[str, int], Any] = {}
        # rows -> the fused down projection computes SiLU*up in its prologue (default) or after the SiLU*up kernel.
        self.down_silu_prologue: dict[int, bool] = {}

    # ---- construction ------------------------------------------------------------------------------------------

    @classmethod
    def from_model(cls, model: Any, *, share_weights: bool = True, ops: Any = None) -> GpuDecoder:
        """From a loaded one-rank dense CausalLM (weights already on the device in their dtype). With
        share_weights the model's q/k/v and gate/up parameters become views of the fused tensors, so the weights
        are held once and the model remains usable as the reference."""
        tensors = tensors_of_model(model)
        weights = fuse(model.config, tensors)
        del tensors
        if share_weights:
            share_with_model(model, weights)
        return cls(model.config, weights, ops=ops)

    @classmethod
    def from_tensors(cls, config: ModelConfig, tensors: MutableMapping[str, torch.Tensor], *, ops: Any = None,
                     max_positions: int | None = None) -> GpuDecoder:
        """From Hugging Face-named tensors (mesh.gpu_weights.random_tensors, a state dict); consumes `tensors`."""
        return cls(config, fuse(config, tensors), ops=ops, max_positions=max_positions)

    # ---- decode ------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, seq_lens: torch.Tensor,
               block_tables: torch.Tensor, kv_cache: Sequence[torch.Tensor],
               num_splits: int = 1, *, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per sequence. input_ids, positions, slots (cache slot of the new token, -1 = padding row),
        seq_lens (tokens attended, the new one included; 0 = padding): [B] int64 on the device; block_tables
        [B, max_blocks] int32. Returns (float32 logits [B, vocab], greedy tokens [B]). `fused` (B a power of two
        up to mesh.gpu_ops.MAX_FUSED_ROWS) runs the fused projections; same function, fewer launches."""
        if fused:
            return self._decode_fused(input_ids, positions, slots, seq_lens, block_tables, kv_cache, num_splits)
        ops, w = self.ops, self.weights
        num_rows = input_ids.shape[0]
        h = F.embedding(input_ids, w.embed)
        delta = None
        for layer, cache in zip(w.layers, kv_cache):
            x = ops.add_rms_norm(h, delta, layer.input_norm, self.eps)
            qkv = self._project("qkv", x, layer.qkv, layer.qkv_bias)
            q, _ = ops.rope_and_store(qkv, positions, slots, self.cos, self.sin, cache, self.num_heads,
                                      self.num_kv_heads)
            attn = ops.paged_decode_attention(q, cache, block_tables, seq_lens, self.scale, num_splits)
            o = self._project("o", attn.view(num_rows, self.num_heads * self.head_dim), layer.o)
            x = ops.add_rms_norm(h, o, layer.post_norm, self.eps)
            delta = self._project("down", ops.silu_mul(self._project("gate_up", x, layer.gate_up)), layer.down)
        x = ops.add_rms_norm(h, delta, w.norm, self.eps)
        logits = self._project("lm_head", x, w.lm_head, out_dtype=torch.float32)
        return logits, greedy_tokens(logits)

    def _project(self, name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """x @ weight.T (+ bias) of the unfused decode: the Triton product where the tuner measured it faster than
        cuBLAS for this projection and row count, cuBLAS otherwise."""
        tile = self.plain_gemv_tiles.get((name, x.shape[0]))
        if tile is None:
            y = F.linear(x, weight, bias)
            return y if out_dtype is None else y.to(out_dtype)
        return self.ops.fused_linear(x, weight, bias, out_dtype=out_dtype, tile=tile)

    def _decode_fused(self, input_ids, positions, slots, seq_lens, block_tables, kv_cache, num_splits):
        """decode() with the norms, residual adds and SiLU*up folded into the projections (ops.fused_linear). The
        residual stream h is updated in place by the o and down projections, which also leave each row's sum of
        squares of the new h for the next norm (sumsq[layer, 0]: before attention, [layer, 1]: before the MLP)."""
        ops, w, eps = self.ops, self.weights, self.eps
        num_rows = input_ids.shape[0]
        if not is_fusable(num_rows):
            raise ValueError(f"decode(fused=True): {num_rows} rows; a power of two up to {MAX_FUSED_ROWS}")
        tiles = {name: self.gemv_tiles.get((name, num_rows)) for name in ("qkv", "o", "gate_up", "down", "lm_head")}
        silu_prologue = self.down_silu_prologue.get(num_rows, True)
        h = F.embedding(input_ids, w.embed)
        sumsq = torch.zeros((len(w.layers) + 1, 2, num_rows), dtype=torch.float32, device=h.device)
        x = ops.add_rms_norm(h, None, w.layers[0].input_norm, eps)  # the first norm has no kernel before it
        for index, (layer, cache) in enumerate(zip(w.layers, kv_cache)):
            if index == 0:
                qkv = ops.fused_linear(x, layer.qkv, layer.qkv_bias, tile=tiles["qkv"])
            else:
                qkv = ops.fused_linear(h, layer.qkv, layer.qkv_bias, norm=(layer.input_norm, sumsq[index, 0], eps),
                                       tile=tiles["qkv"])
            q, _ = ops.rope_and_store(qkv, positions, slots, self.cos, self.sin, cache, self.num_heads,
                                      self.num_kv_heads)
            attn = ops.paged_decode_attention(q, cache, block_tables, seq_lens, self.scale, num_splits)
            ops.fused_linear(attn.view(num_rows, self.num_heads * self.head_dim), layer.o,
                             residual=(h, sumsq[index, 1]), tile=tiles["o"])
            gate_up = ops.fused_linear(h, layer.gate_up, norm=(layer.post_norm, sumsq[index, 1], eps),
                                       tile=tiles["gate_up"])
            if silu_prologue:
                ops.fused_linear(gate_up, layer.down, silu_input=True, residual=(h, sumsq[index + 1, 0]),
                                 tile=tiles["down"])
            else:
                ops.fused_linear(ops.silu_mul(gate_up), layer.down, residual=(h, sumsq[index + 1, 0]),
                                 tile=tiles["down"])
        logits = ops.fused_linear(h, w.lm_head, norm=(w.norm, sumsq[len(w.layers), 0], eps), out_dtype=torch.float32,
                                  tile=tiles["lm_head"])
        return logits, greedy_tokens(logits)

    # ---- prefill -----------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, positions: torch.Tensor, query_lens: Sequence[int],
                context_lens: Sequence[int] | None = None, block_tables: Sequence[Sequence[int]] | None = None,
                kv_cache: Sequence[torch.Tensor] | None = None, *, logits_indices: torch.Tensor | None = None,
                layer_hook: PrefillHook | None = None) -> torch.Tensor:
        """Packed prompts (or prompt chunks): input_ids, positions [T] on the device, `query_lens` new tokens per
        sequence, `context_lens` tokens already cached (then block_tables and kv_cache are needed). Writes the new
        K/V into the cache when one is given. `layer_hook(layer, k, v)` sees each layer's post-rotary K and V
        [T, Hkv, D] (mesh.model's layer hook contract). Returns float32 logits of `logits_indices` (default: each
        sequence's last token)."""
        num_tokens = input_ids.shape[0]
        context_lens = list(context_lens) if context_lens is not None else [0] * len(query_lens)
        if sum(query_lens) != num_tokens or len(context_lens) != len(query_lens):
            raise ValueError(f"prefill: {num_tokens} tokens, query_lens {list(query_lens)}, "
                             f"context_lens {context_lens}: they must match")
        if any(context_lens) and (kv_cache is None or block_tables is None):
            raise ValueError("prefill: context_lens > 0 needs kv_cache and block_tables (the cached prefix)")
        if kv_cache is not None and block_tables is None:
            raise ValueError("prefill: kv_cache given without block_tables")
        if kv_cache is not None and len(kv_cache) != self.config.num_layers:
            raise ValueError(f"prefill: kv_cache has {len(kv_cache)} layers, the model {self.config.num_layers}")
        if max(c + q for c, q in zip(context_lens, query_lens)) > self.max_positions:
            raise ValueError(f"prefill: a sequence exceeds the {self.max_positions} positions of the rotary tables")
        block_size = kv_cache[0].shape[2] if kv_cache is not None else 1
        if kv_cache is not None:
            slots = slot_mapping(query_lens, context_lens, block_tables, block_size).to(self.device)
        else:
            slots = torch.full((num_tokens,), -1, dtype=torch.long, device=self.device)
        plan = _PrefillAttention(self, query_lens, context_lens, block_tables, block_size)
        ops, w = self.ops, self.weights
        h = F.embedding(input_ids, w.embed)
        delta = None
        for index, layer in enumerate(w.layers):
            cache = kv_cache[index] if kv_cache is not None else None
            x = ops.add_rms_norm(h, delta, layer.input_norm, self.eps)
            qkv = F.linear(x, layer.qkv, layer.qkv_bias)
            q, k = ops.rope_and_store(qkv, positions, slots, self.cos, self.sin, cache, self.num_heads,
                                      self.num_kv_heads)
            v_start = (self.num_heads + self.num_kv_heads) * self.head_dim
            v = qkv[:, v_start:].reshape(num_tokens, self.num_kv_heads, self.head_dim)
            if layer_hook is not None:
                layer_hook(index, k, v)
            attn = plan.attend(q, k, v, cache)
            o = F.linear(attn.reshape(num_tokens, self.num_heads * self.head_dim), layer.o)
            x = ops.add_rms_norm(h, o, layer.post_norm, self.eps)
            delta = F.linear(ops.silu_mul(F.linear(x, layer.gate_up)), layer.down)
        h.add_(delta)
        if logits_indices is None:
            logits_indices = torch.tensor(list(query_lens), device=self.device).cumsum(0) - 1
        rows = h[logits_indices.to(self.device)].contiguous()
        return F.linear(ops.add_rms_norm(rows, None, w.norm, self.eps), w.lm_head).float()

    def prefill_chunked(self, prompt_ids: Sequence[int], block_table: Sequence[int],
                        kv_cache: Sequence[torch.Tensor], *, max_chunk_tokens: int) -> torch.Tensor:
        """One prompt longer than the step budget, in chunks of at most `max_chunk_tokens`, each attending to the
        chunks before it through the cache. Returns the last token's float32 logits [1, vocab]."""
        if max_chunk_tokens < 1:
            raise ValueError(f"prefill_chunked: max_chunk_tokens must be >= 1, got {max_chunk_tokens}")
        logits = None
        for start in range(0, len(prompt_ids), max_chunk_tokens):
            chunk = list(prompt_ids[start:start + max_chunk_tokens])
            ids = torch.tensor(chunk, dtype=torch.long, device=self.device)
            positions = torch.arange(start, start + len(chunk), device=self.device)
            logits = self.prefill(ids, positions, [len(chunk)], [start], [list(block_table)], kv_cache)
        if logits is None:
            raise ValueError("prefill_chunked: empty prompt")
        return logits


def slot_mapping(query_lens: Sequence[int], context_lens: Sequence[int], block_tables: Sequence[Sequence[int]],
                 block_size: int) -> torch.Tensor:
    """Cache slot (block * block_size + row) of every new token of a packed step, int64 [T] on the CPU."""
    parts = []
    for i, (new, context, table) in enumerate(zip(query_lens, context_lens, block_tables)):
        positions = np.arange(context, context + new)
        if len(table) * block_size < context + new:
            raise ValueError(f"block_tables[{i}]: {len(table)} blocks hold {len(table) * block_size} tokens, "
                             f"sequence needs {context + new}")
        blocks = np.asarray(table, dtype=np.int64)[positions // block_size]
        parts.append(blocks * block_size + positions % block_size)
    return torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))


class _PrefillAttention:
    """Attention of one prefill step, planned once and run per layer. Fresh sequences (no cached prefix) go
    through FlashAttention's variable-length kernel in one launch for the whole packed step (GQA native); a
    sequence with a cached prefix reads its blocks back from the cache (its new K/V are already there) with a
    bottom-right causal mask."""

    def __init__(self, decoder: GpuDecoder, query_lens: Sequence[int], context_lens: Sequence[int],
                 block_tables: Sequence[Sequence[int]] | None, block_size: int) -> None:
        self.decoder = decoder
        self.query_lens = list(query_lens)
        self.context_lens = list(context_lens)
        self.block_size = block_size
        self.starts = np.concatenate(([0], np.cumsum(self.query_lens)[:-1])).tolist()
        device = decoder.device
        self.is_all_fresh = not any(self.context_lens)
        self.cu_seqlens = torch.tensor([0, *np.cumsum(self.query_lens).tolist()], dtype=torch.int32, device=device)
        self.max_len = max(self.query_lens)
        self.blocks: list[torch.Tensor | None] = []
        self.masks: list[torch.Tensor | None] = []
        for i, (context, new) in enumerate(zip(self.context_lens, self.query_lens)):
            if context == 0:
                self.blocks.append(None)
                self.masks.append(None)
                continue
            num_blocks = -(-(context + new) // block_size)
            self.blocks.append(torch.tensor(list(block_tables[i][:num_blocks]), dtype=torch.long, device=device))
            # Query j sits at position context + j and sees keys 0..context + j.
            mask = torch.arange(context + new)[None, :] <= torch.arange(context, context + new)[:, None]
            self.masks.append(mask.to(device))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor | None) -> torch.Tensor:
        decoder = self.decoder
        if self.is_all_fresh and decoder.prefill_attention_backend == "flash-varlen":
            try:
                out = torch.ops.aten._flash_attention_forward(
                    q, k, v.contiguous(), self.cu_seqlens, self.cu_seqlens, self.max_len, self.max_len, 0.0, True,
                    False, scale=decoder.scale)[0]
                return out
            except (RuntimeError, TypeError, AttributeError, NotImplementedError):
                decoder.prefill_attention_backend = "sdpa"  # not built into this torch: per-sequence SDPA
        return self._attend_per_sequence(q, k, v, cache)

    def _attend_per_sequence(self, q, k, v, cache) -> torch.Tensor:
        decoder = self.decoder
        repeats = decoder.num_heads // decoder.num_kv_heads
        out = torch.empty_like(q)
        for i, (start, new) in enumerate(zip(self.starts, self.query_lens)):
            q_seq = q[start:start + new].transpose(0, 1)[None]  # [1, H, new, D]
            if self.blocks[i] is None:
                k_seq, v_seq, mask, is_causal = k[start:start + new], v[start:start + new], None, True
            else:
                length = self.context_lens[i] + new
                kv = cache[self.blocks[i]]  # [n, 2, block_size, Hkv, D]
                k_seq = kv[:, 0].reshape(-1, decoder.num_kv_heads, decoder.head_dim)[:length].to(q.dtype)
                v_seq = kv[:, 1].reshape(-1, decoder.num_kv_heads, decoder.head_dim)[:length].to(q.dtype)
                mask, is_causal = self.masks[i], False
            k_seq = k_seq.repeat_interleave(repeats, dim=1).transpose(0, 1)[None]
            v_seq = v_seq.repeat_interleave(repeats, dim=1).transpose(0, 1)[None]
            attn = F.scaled_dot_product_attention(q_seq, k_seq, v_seq, attn_mask=mask, is_causal=is_causal,
                                                  scale=decoder.scale)
            out[start:start + new] = attn[0].transpose(0, 1)
        return out
