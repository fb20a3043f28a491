"""Block attention for `mesh.ring_attention` on fused GPU kernels that return their log-sum-exp (no score matrix).

Who calls it: `ring_attention`, once per (Q block, KV block) pair of a context-parallel prefill step, through
`select_block_attention` (CUDA + bf16/fp16 picks `FlashBlockAttention`; CPU keeps `masked_block_attention`).
Promise: the same (out [Tq, H, D], lse [Tq, H]) as `masked_block_attention` (float32; rows that see no key give
out = 0, lse = -inf) up to the kernel's rounding, without ever holding a [Tq, Tk] matrix.

How the mask becomes kernel calls. The block comes with each row's sequence id and position, not a mask. Query
rows are cut into runs (one sequence, consecutive positions: a load-balanced chunk), key rows into runs (one
sequence, increasing positions: a chunk pair, or the round-robin cached rows). For a query run at positions
[a, a + m), a key of its sequence at position p < a is visible to every row (the "full" keys: the cached prefix,
earlier chunks), a key at p >= a + m to none, and keys inside [a, a + m) form the "diagonal". In the 2N-chunk
layout the diagonal is either empty or exactly the run's own chunk, so each query run is at most three calls,
each on disjoint query rows (no merging): rows before the diagonal see the full keys; rows on the diagonal see
full + diagonal keys with a lower-right causal mask (row i of m sees all full keys and diagonal keys up to i);
rows after it see full + diagonal keys unmasked. Any other shape (several diagonal pieces: not produced by
`mesh.cp_sharding`) falls back to `masked_block_attention` for that run alone.

Varlen batches loop over their sequences' runs: one to three kernel calls per chunk, so many short sequences mean
many small launches (correct, not fast).

The plan (which rows, which key ranges, which mask) is host work on tensors as long as the block; it is computed
once per step and reused by every layer (ring_attention hands all layers the same metadata tensors), because
redone per layer it costs more host time than the GPU spends on a short step and starves the GPU (measured: a
CP2 step of 1% new tokens over a 128K cache took 4 s instead of 0.2 s).

Backends (`FlashBlockAttention(backend=...)`):
- "flash": torch.ops.aten._scaled_dot_product_flash_attention (FlashAttention-2). Its is_causal is lower-right
  aligned (what torch.nn.attention.bias.causal_lower_right dispatches to); GQA without expanding K/V (expanded
  instead if the op refuses unequal head counts).
- "cudnn": torch.ops.aten._scaled_dot_product_cudnn_attention(compute_log_sumexp=True). Its is_causal is
  top-left aligned, so a lower-right call with more keys than queries runs as two calls (the leading keys
  unmasked, the square tail causal) merged through their LSE. K/V heads are expanded for GQA (once per run).
- "efficient": torch.ops.aten._efficient_attention_forward (custom_mask_type 2 = lower-right causal). K/V heads
  expanded.
- "math": plain matmuls in float32 (any device and dtype): the reference the CPU tests check the run logic with.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from mesh.cp_sharding import PADDING

BACKENDS = ("flash", "cudnn", "efficient", "math")
# Chosen by measurement (benchmarks/cp_scaling.py, H200, torch 2.11, bf16, 32/8 heads, head_dim 128, 16K causal
# block): cudnn 601-608 TFLOP/s, flash 331-342, efficient 166-167. cuDNN's fused attention is Hopper-tuned; older
# GPUs keep FlashAttention-2, which was not measured against it here.
HOPPER_BACKEND = "cudnn"
DEFAULT_CUDA_BACKEND = "flash"
_FUSED_DTYPES = (torch.bfloat16, torch.float16)
_forced_backend: str | None = None
_NO_NATIVE_GQA: set[str] = set()  # fused backends seen rejecting fewer KV heads than query heads


def set_default_backend(backend: str | None) -> None:
    """Process-wide: make `select_block_attention` return FlashBlockAttention(backend=backend) on every device
    (None restores the automatic choice). For benchmarks and deployments that pick a kernel by measurement."""
    global _forced_backend
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"set_default_backend: backend must be one of {BACKENDS} or None, got {backend!r}")
    _forced_backend = backend


def select_block_attention(q: torch.Tensor):
    """The block attention ring_attention uses for query blocks like `q` when the caller passes none: the forced
    backend if any, else for CUDA bf16/fp16 with a head_dim the fused kernels take (multiple of 8, at most 256)
    FlashBlockAttention with HOPPER_BACKEND on compute capability 9.x and DEFAULT_CUDA_BACKEND on other GPUs,
    else mesh.ring_attention.masked_block_attention (CPU, float32/64)."""
    if _forced_backend is not None:
        return FlashBlockAttention(backend=_forced_backend)
    head_dim = q.shape[-1]
    if q.is_cuda and q.dtype in _FUSED_DTYPES and head_dim % 8 == 0 and head_dim <= 256:
        is_hopper = torch.cuda.get_device_capability(q.device)[0] == 9
        return FlashBlockAttention(backend=HOPPER_BACKEND if is_hopper else DEFAULT_CUDA_BACKEND)
    from mesh.ring_attention import masked_block_attention  # ring_attention imports this module lazily: no cycle

    return masked_block_attention


@dataclass(frozen=True, kw_only=True)
class FlashBlockAttention:
    """A `mesh.ring_attention.BlockAttention`: call it as (q, k, v, q_seq_ids, q_positions, kv_seq_ids,
    kv_positions, scale) -> (out, lse). Reads the row metadata on the host: ring_attention passes it there
    (`takes_host_metadata`), so planning the calls never waits for the GPU."""

    backend: str = DEFAULT_CUDA_BACKEND
    # Above this many unit-stride key pieces overlapping one query run, the run uses the masked fallback.
    max_diagonal_pieces: int = 8
    takes_host_metadata: bool = field(default=True, init=False)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"FlashBlockAttention: backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.max_diagonal_pieces < 1:
            raise ValueError(f"FlashBlockAttention: max_diagonal_pieces must be >= 1, got {self.max_diagonal_pieces}")

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_seq_ids: torch.Tensor,
                 q_positions: torch.Tensor, kv_seq_ids: torch.Tensor, kv_positions: torch.Tensor,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        num_q, num_heads, head_dim = q.shape
        if num_heads % k.shape[1] != 0:
            raise ValueError(f"FlashBlockAttention: num_kv_heads={k.shape[1]} must divide num_heads={num_heads}")
        compute_dtype = torch.promote_types(q.dtype, torch.float32)
        out = torch.zeros((num_q, num_heads, head_dim), dtype=compute_dtype, device=q.device)
        lse = torch.full((num_q, num_heads), float("-inf"), dtype=compute_dtype, device=q.device)
        for run in _cached_block_plan(q_seq_ids, q_positions, kv_seq_ids, kv_positions, self.max_diagonal_pieces):
            if isinstance(run, _MaskedRun):
                self._masked_run(q, k, v, run, scale, out, lse)
                continue
            keys, values = _gather_rows(k, v, run.key_ranges)
            if self._needs_expanded_kv(q, keys):  # once per run, not once per kernel call
                keys, values = _expand_kv(keys, num_heads), _expand_kv(values, num_heads)
            for piece in run.pieces:
                piece_out, piece_lse = self.attend_rows(q[piece.row_start:piece.row_stop], keys[:piece.num_keys],
                                                        values[:piece.num_keys], is_causal=piece.is_causal,
                                                        scale=scale)
                out[piece.row_start:piece.row_stop] = piece_out
                lse[piece.row_start:piece.row_stop] = piece_lse
        return out, lse

    def _needs_expanded_kv(self, q: torch.Tensor, k: torch.Tensor) -> bool:
        if k.shape[1] == q.shape[1] or self.backend == "math":
            return False
        return self.backend != "flash" or self.backend in _NO_NATIVE_GQA

    def _masked_run(self, q, k, v, run: _MaskedRun, scale, out, lse) -> None:
        from mesh.ring_attention import masked_block_attention

        rows = slice(run.row_start, run.row_stop)
        device_rows = run.key_rows.to(k.device)
        run_out, run_lse = masked_block_attention(
            q[rows], k[device_rows], v[device_rows], torch.full((rows.stop - rows.start,), run.seq, device=q.device),
            run.q_positions.to(q.device), torch.full((run.key_rows.numel(),), run.seq, device=q.device),
            run.key_positions.to(q.device), scale)
        out[rows] = run_out
        lse[rows] = run_lse

    # ---- the kernels -----------------------------------------------------------------------------------------------

    def attend_rows(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of every query row over every key row, [m, H, D] x [n, Hkv, D] -> (out [m, H, D] in the
        kernel's dtype, lse [m, H] float32); is_causal = lower-right causal (row i sees keys 0 .. n - m + i),
        which needs n >= m."""
        if is_causal and k.shape[0] < q.shape[0]:
            raise ValueError(f"attend_rows: a lower-right causal call needs at least as many keys as queries, got "
                             f"{k.shape[0]} keys for {q.shape[0]} queries")
        if self.backend == "math":
            return _math_kernel(q, k, v, is_causal, scale)
        if self.backend == "cudnn" and is_causal and k.shape[0] > q.shape[0]:
            # cuDNN's causal mask is top-left aligned: run the leading keys unmasked and the square tail causal.
            num_lead = k.shape[0] - q.shape[0]
            lead_out, lead_lse = self._fused(q, k[:num_lead], v[:num_lead], False, scale)
            tail_out, tail_lse = self._fused(q, k[num_lead:], v[num_lead:], True, scale)
            return _merge_two(lead_out, lead_lse, tail_out, tail_lse)
        return self._fused(q, k, v, is_causal, scale)

    def _fused(self, q, k, v, is_causal, scale) -> tuple[torch.Tensor, torch.Tensor]:
        num_heads = q.shape[1]
        if k.shape[1] != num_heads and not self._needs_expanded_kv(q, k):
            try:  # FlashAttention-2 reads KV head h // group itself, without the expanded copy
                return self._fused_call(q, k, v, is_causal, scale)
            except RuntimeError:  # a build whose op insists on equal head counts: expand from now on
                _NO_NATIVE_GQA.add(self.backend)
        return self._fused_call(q, _expand_kv(k, num_heads), _expand_kv(v, num_heads), is_causal, scale)

    def _fused_call(self, q, k, v, is_causal, scale) -> tuple[torch.Tensor, torch.Tensor]:
        num_q, num_heads, _ = q.shape
        if self.backend == "efficient":
            result = torch.ops.aten._efficient_attention_forward(
                q[None], k[None], v[None], None, None, None, None, None, 0.0, 2 if is_causal else 0, True,
                scale=scale)
            run_out, run_lse = result[0][0], result[1][0]  # [m, H, D]; lse [H, m rounded up to 32]
            return run_out, run_lse[:, :num_q].transpose(0, 1).float()
        # [1, H, L, D] views of the [L, H, D] rows: the layout SDPA itself hands these kernels.
        q4, k4, v4 = (x.transpose(0, 1)[None] for x in (q, k, v))
        if self.backend == "flash":
            result = torch.ops.aten._scaled_dot_product_flash_attention(q4, k4, v4, 0.0, is_causal, False,
                                                                        scale=scale)
        else:
            result = torch.ops.aten._scaled_dot_product_cudnn_attention(q4, k4, v4, None, True, 0.0, is_causal,
                                                                        False, scale=scale)
        run_out, run_lse = result[0][0].transpose(0, 1), result[1][0]
        return run_out, run_lse.reshape(num_heads, -1)[:, :num_q].transpose(0, 1).float()


# ---- planning (host side, pure) ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Piece:
    """Query rows [row_start, row_stop) against the first num_keys gathered keys of their run."""

    row_start: int
    row_stop: int
    num_keys: int
    is_causal: bool  # lower-right


@dataclass(frozen=True)
class _FusedRun:
    """One query run: the key row ranges to gather (full keys first, the diagonal last) and its pieces."""

    key_ranges: tuple[tuple[int, int], ...]
    pieces: tuple[_Piece, ...]


@dataclass(frozen=True, eq=False)
class _MaskedRun:
    """A query run with an odd layout: masked attention over every key row of its sequence (host tensors)."""

    row_start: int
    row_stop: int
    seq: int
    q_positions: torch.Tensor
    key_rows: torch.Tensor
    key_positions: torch.Tensor


_PLAN_CACHE: OrderedDict = OrderedDict()
_PLAN_CACHE_SIZE = 16  # a step meets (query rank, key rank) pairs; its layers repeat them


def _cached_block_plan(q_seq, q_pos, kv_seq, kv_pos, max_diagonal_pieces: int) -> tuple:
    """plan_block(...) of these metadata tensors, computed once for all the layers of a step: ring_attention hands
    every layer the same tensor objects. Keyed by identity and version counter (an in-place change misses), and
    the entry holds the tensors, so an id cannot be reused while it is cached."""
    tensors = (q_seq, q_pos, kv_seq, kv_pos)
    key = (max_diagonal_pieces, *((id(t), t._version) for t in tensors))
    hit = _PLAN_CACHE.get(key)
    if hit is not None:
        _PLAN_CACHE.move_to_end(key)
        return hit[1]
    plan = plan_block(*(t.cpu() for t in tensors), max_diagonal_pieces=max_diagonal_pieces)
    _PLAN_CACHE[key] = (tensors, plan)
    while len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
        _PLAN_CACHE.popitem(last=False)
    return plan


def plan_block(q_seq: torch.Tensor, q_pos: torch.Tensor, kv_seq: torch.Tensor, kv_pos: torch.Tensor, *,
               max_diagonal_pieces: int = 8) -> tuple:
    """The kernel calls of one block (module docstring), from host metadata: a tuple of _FusedRun / _MaskedRun
    covering every query row that sees a key; rows in no run see none."""
    key_runs = _key_runs_by_sequence(kv_seq, kv_pos)
    runs = []
    for row_start, row_stop, seq in _runs(q_seq, q_pos, is_unit_stride=True):
        first_pos = int(q_pos[row_start])
        planned = _plan_query_run(first_pos, row_stop - row_start, key_runs.get(seq, []), kv_pos,
                                  max_diagonal_pieces)
        if planned is None:
            key_rows = (kv_seq == seq).nonzero().flatten()
            runs.append(_MaskedRun(row_start, row_stop, seq, q_pos[row_start:row_stop], key_rows,
                                   kv_pos[key_rows]))
            continue
        full_ranges, diagonal, diagonal_start, diagonal_stop = planned
        num_full = sum(stop - start for start, stop in full_ranges)
        if diagonal is None:
            if num_full:
                runs.append(_FusedRun(tuple(full_ranges), (_Piece(row_start, row_stop, num_full, False),)))
            continue
        num_all = num_full + (diagonal[1] - diagonal[0])
        on_start = row_start + (diagonal_start - first_pos)
        on_stop = row_start + (diagonal_stop - first_pos)
        pieces = []
        if num_full and on_start > row_start:  # rows before the diagonal see the full keys only
            pieces.append(_Piece(row_start, on_start, num_full, False))
        pieces.append(_Piece(on_start, on_stop, num_all, True))
        if on_stop < row_stop:  # rows after it see every gathered key
            pieces.append(_Piece(on_stop, row_stop, num_all, False))
        runs.append(_FusedRun((*full_ranges, diagonal), tuple(pieces)))
    return tuple(runs)


def _runs(seq: torch.Tensor, pos: torch.Tensor, *, is_unit_stride: bool) -> list[tuple[int, int, int]]:
    """(row_start, row_stop, seq_id) of maximal runs of one sequence whose positions step by exactly 1
    (is_unit_stride) or just increase; padding rows (seq PADDING) belong to no run."""
    num_rows = seq.numel()
    if num_rows == 0:
        return []
    continues = seq[1:] == seq[:-1]
    continues &= (pos[1:] == pos[:-1] + 1) if is_unit_stride else (pos[1:] > pos[:-1])
    starts = torch.cat([torch.zeros(1, dtype=torch.long), (~continues).nonzero().flatten() + 1])
    stops = torch.cat([starts[1:], torch.tensor([num_rows])])
    seq_of_run = seq[starts]
    return [(start, stop, s) for start, stop, s in zip(starts.tolist(), stops.tolist(), seq_of_run.tolist())
            if s != PADDING]


def _key_runs_by_sequence(kv_seq: torch.Tensor, kv_pos: torch.Tensor) -> dict[int, list[tuple[int, int]]]:
    runs: dict[int, list[tuple[int, int]]] = {}
    for start, stop, seq in _runs(kv_seq, kv_pos, is_unit_stride=False):
        runs.setdefault(seq, []).append((start, stop))
    return runs


def _plan_query_run(first_pos: int, num_rows: int, key_runs: list[tuple[int, int]], kv_pos: torch.Tensor,
                    max_diagonal_pieces: int):
    """For the query run at positions [first_pos, first_pos + num_rows): (full key row ranges, the diagonal key
    row range or None, its first position, its stop position), or None when the diagonal is not one piece."""
    end_pos = first_pos + num_rows
    full_ranges: list[tuple[int, int]] = []
    diagonals: list[tuple[int, int, int]] = []  # (row_start, row_stop, first position)
    for start, stop in key_runs:
        low, high = int(kv_pos[start]), int(kv_pos[stop - 1])
        if high < first_pos:
            full_ranges.append((start, stop))
            continue
        if low >= end_pos:
            continue
        pieces = _runs(torch.zeros(stop - start, dtype=torch.long), kv_pos[start:stop], is_unit_stride=True)
        if len(pieces) > max_diagonal_pieces:
            return None
        for piece_start, piece_stop, _ in pieces:
            row0, row1 = start + piece_start, start + piece_stop
            piece_low = int(kv_pos[row0])
            num_before = min(max(first_pos - piece_low, 0), row1 - row0)  # keys at positions < first_pos
            num_inside = min(max(end_pos - piece_low, 0), row1 - row0)  # keys at positions < end_pos
            if num_before:
                full_ranges.append((row0, row0 + num_before))
            if num_inside > num_before:
                diagonals.append((row0 + num_before, row0 + num_inside, piece_low + num_before))
    if not diagonals:
        return full_ranges, None, None, None
    if len(diagonals) > 1:
        return None
    row0, row1, diagonal_start = diagonals[0]
    return full_ranges, (row0, row1), diagonal_start, diagonal_start + (row1 - row0)


def _gather_rows(k: torch.Tensor, v: torch.Tensor,
                 ranges: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V rows of the ranges in order: a view when they are one contiguous stretch, else one copy."""
    merged: list[list[int]] = []
    for start, stop in ranges:
        if merged and merged[-1][1] == start:
            merged[-1][1] = stop
        else:
            merged.append([start, stop])
    if len(merged) == 1:
        start, stop = merged[0]
        return k[start:stop], v[start:stop]
    return (torch.cat([k[start:stop] for start, stop in merged]),
            torch.cat([v[start:stop] for start, stop in merged]))


# ---- kernel helpers --------------------------------------------------------------------------------------------------

def _expand_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    group = num_heads // x.shape[1]
    return x if group == 1 else x.repeat_interleave(group, dim=1)  # query head h reads KV head h // group


def _math_kernel(q, k, v, is_causal, scale) -> tuple[torch.Tensor, torch.Tensor]:
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    num_q, num_heads, head_dim = q.shape
    keys = _expand_kv(k, num_heads).to(compute_dtype)
    values = _expand_kv(v, num_heads).to(compute_dtype)
    scores = torch.einsum("qhd,khd->hqk", q.to(compute_dtype), keys) * scale
    if is_causal:
        offset = k.shape[0] - num_q
        is_visible = torch.arange(k.shape[0], device=q.device)[None, :] <= (
            torch.arange(num_q, device=q.device)[:, None] + offset)
        scores = scores.masked_fill(~is_visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [H, m]; every row sees >= 1 key here
    out = torch.einsum("hqk,khd->qhd", torch.exp(scores - lse[..., None]), values)
    return out, lse.transpose(0, 1)


def _merge_two(out_a, lse_a, out_b, lse_b) -> tuple[torch.Tensor, torch.Tensor]:
    """LSE merge of two partials over disjoint keys where every row saw keys in both (finite LSEs)."""
    lse = torch.logaddexp(lse_a, lse_b)
    weight_a, weight_b = torch.exp(lse_a - lse)[..., None], torch.exp(lse_b - lse)[..., None]
    return weight_a * out_a.float() + weight_b * out_b.float(), lse
