"""Choosing pass-KV or pass-Q ring attention for a CP prefill step (the idea of the CP paper's Alg. 1 and 5).

Who calls it: the prefill tier, once per step, when its config says `cp_mode: auto` (`resolve_cp_mode`); the result
is passed as `mode=` to `mesh.ring_attention.ring_attention` for every layer of that step. Pure arithmetic: no
torch, no communication. Both variants give the same output, so the choice only moves latency.

The cost model (one CP rank's view; N = cp_size, T new tokens, P cached tokens, C = peak_flops, B = bandwidth, e =
dtype_bytes, H / H_kv = the heads one rank computes, after any TP split, D = head_dim):

- Attention work. A new token attends to its whole cached prefix and causally to the new tokens before it:
  F = 4 * D * H * T * (P + T / 2) FLOPs (two matmuls, 2 FLOPs per multiply-add). The load-balanced 2N-chunk
  sharding spreads it evenly, so each of the N ring steps of each rank computes t_step = F / (N^2 * C).
- pass-KV sends, at each of N-1 steps, one rank's K and V (new plus cached rows): 2 * (T + P) / N * H_kv * D * e
  bytes, taking t_kv; the transfer overlaps the step's compute, so a step costs max(t_step, t_kv).
  Latency: t_step + (N-1) * max(t_step, t_kv).
- pass-Q sends one rank's Q block per step, T / N * H * D * e bytes (t_q), and afterwards returns every partial
  output (with its log-sum-exp) to its owner in an all-to-all that nothing hides: (N-1) * T / N * H * (D * e + 4)
  bytes (t_a2a). Latency: t_step + (N-1) * max(t_step, t_q) + t_a2a.

We pick the smaller latency (pass-KV on a tie: no all-to-all, and it is the variant full prefill is tuned for). The
paper's rules fall out of this comparison:
- pass-KV whenever its communication hides under compute (t_kv <= t_step). With no cache this reads
  T >= N * C * H_kv * e / (H * B): long full prefills always pick pass-KV. Pass-Q cannot beat it there: it computes
  the same and adds the all-to-all.
- Otherwise the exposed transfers decide. The pass-KV message is smaller than the pass-Q one when
  T / (T + P) >= 2 * H_kv / H (the paper's KV-cache miss-rate threshold, 12.5% for 128 query / 8 KV heads): a
  large share of new tokens favours pass-KV, a few new tokens against a long cache favour pass-Q (its messages
  scale with T, pass-KV's with T + P). The all-to-all term moves the crossover towards pass-KV, as the paper's
  refined Alg. 5 does.
"""

from __future__ import annotations

from dataclasses import dataclass

CP_MODES = ("auto", "pass-kv", "pass-q")
_LSE_BYTES = 4  # the log-sum-exp travels in float32 next to each partial output row


@dataclass(frozen=True, kw_only=True)
class CPLatencyEstimate:
    """Modelled attention latency of one layer under each variant, in seconds, and the per-step terms."""

    pass_kv_s: float
    pass_q_s: float
    step_compute_s: float
    kv_transfer_s: float
    q_transfer_s: float
    all_to_all_s: float

    @property
    def is_kv_transfer_hidden(self) -> bool:
        return self.kv_transfer_s <= self.step_compute_s

    @property
    def mode(self) -> str:
        return "pass-kv" if self.pass_kv_s <= self.pass_q_s else "pass-q"


def estimate_cp_latency(num_new_tokens: int, num_cached_tokens: int, *, num_heads: int, num_kv_heads: int,
                        head_dim: int, cp_size: int, peak_flops: float, bandwidth_bytes_per_s: float,
                        dtype_bytes: int = 2, num_attention_pairs: float | None = None) -> CPLatencyEstimate:
    """The cost model of the module docstring. `num_attention_pairs` (query, key) pairs that attention computes,
    summed over sequences; default T * (P + T / 2), exact for one sequence (see `choose_cp_mode_for_batch`)."""
    _validate(num_new_tokens, num_cached_tokens, num_heads, num_kv_heads, head_dim, cp_size, peak_flops,
              bandwidth_bytes_per_s, dtype_bytes)
    new, cached, n = num_new_tokens, num_cached_tokens, cp_size
    if num_attention_pairs is None:
        num_attention_pairs = new * (cached + new / 2)
    flops = 4 * head_dim * num_heads * num_attention_pairs
    step_compute_s = flops / (n * n * peak_flops)
    kv_transfer_s = 2 * (new + cached) / n * num_kv_heads * head_dim * dtype_bytes / bandwidth_bytes_per_s
    q_transfer_s = new / n * num_heads * head_dim * dtype_bytes / bandwidth_bytes_per_s
    all_to_all_s = ((n - 1) * new / n * num_heads * (head_dim * dtype_bytes + _LSE_BYTES)
                    / bandwidth_bytes_per_s)
    if n == 1:  # nothing travels: both variants are the same local attention
        kv_transfer_s = q_transfer_s = all_to_all_s = 0.0
    pass_kv_s = step_compute_s + (n - 1) * max(step_compute_s, kv_transfer_s)
    pass_q_s = step_compute_s + (n - 1) * max(step_compute_s, q_transfer_s) + all_to_all_s
    return CPLatencyEstimate(pass_kv_s=pass_kv_s, pass_q_s=pass_q_s, step_compute_s=step_compute_s,
                             kv_transfer_s=kv_transfer_s, q_transfer_s=q_transfer_s, all_to_all_s=all_to_all_s)


def choose_cp_mode(num_new_tokens: int, num_cached_tokens: int, *, num_heads: int, num_kv_heads: int,
                   head_dim: int, cp_size: int, peak_flops: float, bandwidth_bytes_per_s: float,
                   dtype_bytes: int = 2) -> str:
    """"pass-kv" or "pass-q" for a step of T = num_new_tokens new tokens over P = num_cached_tokens cached ones.

    Pass the heads one CP rank computes (after TP), that rank's measured attention throughput in FLOP/s, and the
    measured point-to-point bandwidth between neighbouring CP ranks in bytes/s. Reasoning (module docstring):
    pass-KV when its K/V transfer hides under the attention of a ring step, or when new tokens are a large share
    of the total (T / (T + P) above about 2 * H_kv / H, so the K/V message is the smaller one); pass-Q when few
    new tokens meet a long cache and the K/V of T + P tokens cannot hide behind the little compute of T queries.
    """
    return estimate_cp_latency(
        num_new_tokens, num_cached_tokens, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        cp_size=cp_size, peak_flops=peak_flops, bandwidth_bytes_per_s=bandwidth_bytes_per_s,
        dtype_bytes=dtype_bytes,
    ).mode


def choose_cp_mode_for_batch(query_lens: list[int], context_lens: list[int], **hardware_and_model) -> str:
    """`choose_cp_mode` for a fused batch: T and P are the sums, and the attention work is counted per sequence
    (tokens of different sequences do not attend to each other, so the sums alone would overstate compute and
    favour pass-KV). Keyword arguments as for `choose_cp_mode`."""
    if len(query_lens) != len(context_lens) or not query_lens:
        raise ValueError(f"choose_cp_mode_for_batch: need one context_len per sequence, got {len(query_lens)} "
                         f"query_lens and {len(context_lens)} context_lens")
    pairs = sum(t * (p + t / 2) for t, p in zip(query_lens, context_lens))
    return estimate_cp_latency(sum(query_lens), sum(context_lens), num_attention_pairs=pairs,
                               **hardware_and_model).mode


def resolve_cp_mode(cp_mode: str, num_new_tokens: int, num_cached_tokens: int, **hardware_and_model) -> str:
    """The config's `cp_mode` ("auto", "pass-kv" or "pass-q") for one step: a fixed mode is returned as is,
    "auto" asks `choose_cp_mode` with the keyword arguments it takes."""
    validate_cp_mode(cp_mode)
    if cp_mode != "auto":
        return cp_mode
    return choose_cp_mode(num_new_tokens, num_cached_tokens, **hardware_and_model)


def validate_cp_mode(cp_mode: str) -> None:
    if cp_mode not in CP_MODES:
        raise ValueError(f"cp_mode must be one of {', '.join(CP_MODES)}; got {cp_mode!r}")


def _validate(num_new_tokens, num_cached_tokens, num_heads, num_kv_heads, head_dim, cp_size, peak_flops,
              bandwidth_bytes_per_s, dtype_bytes) -> None:
    if num_new_tokens < 1:
        raise ValueError(f"choose_cp_mode: num_new_tokens must be >= 1, got {num_new_tokens}")
    if num_cached_tokens < 0:
        raise ValueError(f"choose_cp_mode: num_cached_tokens must be >= 0, got {num_cached_tokens}")
    for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                        ("cp_size", cp_size), ("dtype_bytes", dtype_bytes)):
        if value < 1:
            raise ValueError(f"choose_cp_mode: {name} must be >= 1, got {value}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"choose_cp_mode: num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
    for name, value in (("peak_flops", peak_flops), ("bandwidth_bytes_per_s", bandwidth_bytes_per_s)):
        if not value > 0:
            raise ValueError(f"choose_cp_mode: {name} must be > 0 (a measured rate), got {value}")
