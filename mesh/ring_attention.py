"""Exact ring attention for a context-parallel prefill step: pass-KV and pass-Q (the CP paper's two variants).

Who calls it: a CP-sharded attention layer, once per layer per prefill step, on every rank of the CP group at the
same time (it communicates; a rank that skips the call hangs the others). Q, K and V are this rank's shard of the
step's packed new tokens, laid out by `mesh.cp_sharding.shard_plan` (2N load-balanced chunks, padding included);
the cached prefix's K/V shard is laid out round-robin by the same plan. Promise: the output equals full causal
attention of the unsharded batch (every new token attends to its sequence's whole cached prefix and causally to
its sequence's new tokens), row for row of this rank's shard; padding rows come out as zeros.

Shapes (T_local = plan.num_local_tokens, C_local = plan.num_cached_local(rank)):
  q_local [T_local, num_heads, head_dim]; k_local, v_local [T_local, num_kv_heads, head_dim];
  cached_k_local, cached_v_local [C_local, num_kv_heads, head_dim] (required when the plan has cached tokens);
  returns [T_local, num_heads, head_dim] in q_local's dtype. Query head h reads KV head h // (num_heads //
  num_kv_heads) (GQA, the transformers layout). Arithmetic runs in float32, or float64 for float64 inputs.

pass-KV: every rank keeps its Q; the K/V blocks (new rows plus cached rows, padded to the largest rank's cache so
that every block has the same shape) travel around the ring in N-1 steps. Each step first posts the send of the
block in hand to rank+1 and the receive of the next block from rank-1, then computes attention against the block
in hand, so the transfer overlaps the compute. Partial outputs are merged with their log-sum-exp as they come.
pass-Q: the K/V stay; the Q blocks travel the same way, and each rank computes partial outputs for every visiting
Q block against its own K/V. One all-to-all then returns each partial to its Q's owner, which merges the N parts.
Masks need no communication: every rank holds the same plan, so it knows the sequence and position of every row of
every other rank's block.

The per-block kernel is `masked_block_attention` (matmul, mask, logsumexp; fine on CPU and for tests) unless the
caller passes `block_attention` (same signature). With none given, CUDA bf16/fp16 blocks use
`mesh.flash_block_attention` (fused kernels returning their LSE, no score matrix); CPU keeps the masked one. A block
attention with a true `takes_host_metadata` attribute gets the row metadata (sequence ids, positions) on the host,
where it plans its kernel calls without waiting for the GPU.
"""

from __future__ import annotations

import math
import weakref
from typing import Callable

import torch
import torch.distributed as dist

from mesh import comm
from mesh.cp_sharding import PADDING, CPShardPlan

CP_RING_MODES = ("pass-kv", "pass-q")

# (q [Tq, H, D], k [Tk, Hkv, D], v [Tk, Hkv, D], q_seq_ids [Tq], q_positions [Tq], kv_seq_ids [Tk],
#  kv_positions [Tk], scale) -> (out [Tq, H, D], lse [Tq, H]), both in the compute dtype. A row with no visible key
# must give out = 0 and lse = -inf. Key rows with seq id PADDING are never visible.
BlockAttention = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def ring_attention(q_local: torch.Tensor, k_local: torch.Tensor, v_local: torch.Tensor, plan: CPShardPlan,
                   group: dist.ProcessGroup | None, *, mode: str = "pass-kv",
                   cached_k_local: torch.Tensor | None = None, cached_v_local: torch.Tensor | None = None,
                   cached_positions: torch.Tensor | None = None, scale: float | None = None,
                   block_attention: BlockAttention | None = None) -> torch.Tensor:
    """Attention of this rank's query shard over the whole step (see the module docstring for shapes).

    group: the CP process group (its size must equal plan.cp_size); None means the default group, or no
    communication at all when plan.cp_size == 1. mode: "pass-kv" or "pass-q" (`mesh.cp_heuristic` picks one; both
    give the same result up to rounding). cached_positions: optional check that the caller's cached rows are in the
    plan's round-robin order; it must equal plan.cached_positions[rank] (the plan, not this argument, defines the
    cache layout, because masks need every rank's layout, not just the local one). scale: default 1/sqrt(head_dim).
    """
    if mode not in CP_RING_MODES:
        raise ValueError(f"ring_attention: mode must be one of {CP_RING_MODES}, got {mode!r}")
    rank, cp_size = _group_rank_and_size(plan, group)
    _validate_shapes(q_local, k_local, v_local, plan, rank, cached_k_local, cached_v_local, cached_positions)
    scale = 1.0 / math.sqrt(q_local.shape[-1]) if scale is None else scale
    attend = block_attention or _default_block_attention(q_local)
    compute_dtype = torch.promote_types(q_local.dtype, torch.float32)

    device = q_local.device
    # The plan lives on the host; a kernel that plans there gets it as is (no copy, no device sync).
    metadata_device = torch.device("cpu") if getattr(attend, "takes_host_metadata", False) else device
    q_seq = [s.to(metadata_device) for s in plan.seq_ids]
    q_pos = [p.to(metadata_device) for p in plan.positions]
    if cached_k_local is None:
        # No cached prefix anywhere (checked above): a KV block is exactly the new-token shard.
        cached_k_local = k_local.new_zeros((0, *k_local.shape[1:]))
        cached_v_local = cached_k_local
    if mode == "pass-kv":
        out = _pass_kv(q_local, k_local, v_local, cached_k_local, cached_v_local, plan, rank, cp_size, group,
                       q_seq, q_pos, scale, attend, metadata_device)
    else:
        out = _pass_q(q_local, k_local, v_local, cached_k_local, cached_v_local, plan, rank, cp_size, group,
                      q_seq, q_pos, scale, attend, compute_dtype, metadata_device)
    return out.to(q_local.dtype)


def masked_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_seq_ids: torch.Tensor,
                           q_positions: torch.Tensor, kv_seq_ids: torch.Tensor, kv_positions: torch.Tensor,
                           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention of one (Q block, KV block) pair: a query sees a key of the same sequence at a position <= its
    own. Materialises the [heads, Tq, Tk] scores: fine for tests and CPU, the place a flash kernel plugs in."""
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    num_q, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group_size = num_heads // num_kv_heads
    grouped_q = q.to(compute_dtype).view(num_q, num_kv_heads, group_size, head_dim)
    scores = torch.einsum("qhgd,khd->hgqk", grouped_q, k.to(compute_dtype)) * scale  # [Hkv, G, Tq, Tk]
    is_visible = ((q_seq_ids[:, None] == kv_seq_ids[None, :]) & (kv_seq_ids[None, :] != PADDING)
                  & (kv_positions[None, :] <= q_positions[:, None]))
    scores = scores.masked_fill(~is_visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf on rows that see nothing
    probs = torch.exp(scores - _finite_or_zero(lse)[..., None])
    out = torch.einsum("hgqk,khd->qhgd", probs, v.to(compute_dtype)).reshape(num_q, num_heads, head_dim)
    return out, lse.permute(2, 0, 1).reshape(num_q, num_heads)


def _default_block_attention(q: torch.Tensor) -> BlockAttention:
    """masked_block_attention on CPU; the fused-kernel block attention for CUDA bf16/fp16 (that module decides, and
    holds the process-wide override `set_default_backend`)."""
    from mesh.flash_block_attention import select_block_attention  # imports this module: lazy, no cycle

    return select_block_attention(q)


def merge_partials(out_a: torch.Tensor | None, lse_a: torch.Tensor | None, out_b: torch.Tensor,
                   lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two softmax-attention partials over disjoint key sets: out [T, H, D], lse [T, H]. Stable:
    weights are exp(lse - max), and a row that saw no key in either part stays out = 0, lse = -inf."""
    if out_a is None:
        return out_b, lse_b
    lse_max = _finite_or_zero(torch.maximum(lse_a, lse_b))
    weight_a, weight_b = torch.exp(lse_a - lse_max), torch.exp(lse_b - lse_max)
    total = weight_a + weight_b
    out = (weight_a[..., None] * out_a + weight_b[..., None] * out_b) / _nonzero_or_one(total)[..., None]
    return out, lse_max + torch.log(total)


def _pass_kv(q, k, v, cached_k, cached_v, plan, rank, cp_size, group, q_seq, q_pos, scale, attend,
             metadata_device):
    device = q.device
    max_cached = plan.max_cached_local
    # One contiguous buffer [2, rows, Hkv, D] per block so each ring step is a single send and a single receive.
    block = torch.zeros((2, plan.num_local_tokens + max_cached, *k.shape[1:]), dtype=k.dtype, device=device)
    block[0, :k.shape[0]] = k
    block[1, :v.shape[0]] = v
    block[0, k.shape[0]:k.shape[0] + cached_k.shape[0]] = cached_k
    block[1, v.shape[0]:v.shape[0] + cached_v.shape[0]] = cached_v
    out = lse = None
    for step in range(cp_size):
        source = (rank - step) % cp_size  # the rank whose K/V is in hand at this step
        pending = None
        if step < cp_size - 1:
            incoming = torch.empty_like(block)
            pending = _post_ring_exchange(block, incoming, rank, cp_size, group)
        kv_seq, kv_pos = _key_metadata(plan, source, max_cached, metadata_device)
        block_out, block_lse = attend(q, block[0], block[1], q_seq[rank], q_pos[rank], kv_seq, kv_pos, scale)
        out, lse = merge_partials(out, lse, block_out, block_lse)
        if pending is not None:
            _wait_all(pending)
            block = incoming
    return out


def _pass_q(q, k, v, cached_k, cached_v, plan, rank, cp_size, group, q_seq, q_pos, scale, attend, compute_dtype,
            metadata_device):
    device = q.device
    keys, values = torch.cat([k, cached_k]), torch.cat([v, cached_v])
    kv_seq, kv_pos = _key_metadata(plan, rank, cached_k.shape[0], metadata_device)
    num_rows, num_heads, head_dim = q.shape
    # partials[j] = (out | lse) of rank j's queries against this rank's K/V; the lse rides in an extra column so
    # the return trip is one all-to-all.
    partials = torch.empty((cp_size, num_rows, num_heads, head_dim + 1), dtype=compute_dtype, device=device)
    q_block = q.contiguous()
    for step in range(cp_size):
        source = (rank - step) % cp_size  # the rank whose queries are in hand at this step
        pending = None
        if step < cp_size - 1:
            incoming = torch.empty_like(q_block)
            pending = _post_ring_exchange(q_block, incoming, rank, cp_size, group)
        block_out, block_lse = attend(q_block, keys, values, q_seq[source], q_pos[source], kv_seq, kv_pos, scale)
        partials[source, ..., :head_dim] = block_out
        partials[source, ..., head_dim] = block_lse
        if pending is not None:
            _wait_all(pending)
            q_block = incoming
    if cp_size > 1:
        returned = torch.empty_like(partials)
        # returned[j]: rank j's partial for my queries.
        comm.all_to_all_single(returned, partials, group=group, kind="cp_all_to_all")
    else:
        returned = partials
    return _merge_many(returned[..., :head_dim], returned[..., head_dim])


def _merge_many(outs: torch.Tensor, lses: torch.Tensor) -> torch.Tensor:
    """outs [N, T, H, D], lses [N, T, H] -> merged out [T, H, D]."""
    lse_max = _finite_or_zero(lses.amax(dim=0))
    weights = torch.exp(lses - lse_max)
    total = weights.sum(dim=0)
    return (weights[..., None] * outs).sum(dim=0) / _nonzero_or_one(total)[..., None]


def _key_metadata(plan: CPShardPlan, rank: int, num_cached_rows: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence ids and positions of the key rows rank `rank` contributes: its new-token shard, then its cached
    rows, then PADDING rows up to `num_cached_rows` cached slots. Built once per (plan, rank, rows, device) and
    reused by every layer of the step: the same tensors each time, so a block attention can cache what it
    derives from them, and no layer pays the host work (or copy) again."""
    per_plan = _KEY_METADATA.setdefault(plan, {})
    key = (rank, num_cached_rows, str(device))
    if key not in per_plan:
        per_plan[key] = _build_key_metadata(plan, rank, num_cached_rows, device)
    return per_plan[key]


# plan -> {(rank, rows, device): (seq ids, positions)}; entries go when the step's plan is garbage-collected.
_KEY_METADATA: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _build_key_metadata(plan: CPShardPlan, rank: int, num_cached_rows: int,
                        device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    num_pad = num_cached_rows - plan.cached_seq_ids[rank].numel()
    pad = torch.full((num_pad,), PADDING, dtype=torch.long)
    seq = torch.cat([plan.seq_ids[rank], plan.cached_seq_ids[rank], pad])
    pos = torch.cat([plan.positions[rank], plan.cached_positions[rank], torch.zeros_like(pad)])
    return seq.to(device), pos.to(device)


def _post_ring_exchange(send: torch.Tensor, recv: torch.Tensor, rank: int, cp_size: int,
                        group: dist.ProcessGroup | None) -> list:
    """Posts send -> rank+1 and recv <- rank-1 (group ranks) and returns at once; the caller waits later."""
    return comm.exchange(send, recv, group=group, send_peer=(rank + 1) % cp_size, recv_peer=(rank - 1) % cp_size,
                         kind="cp_ring")


def _wait_all(works: list) -> None:
    for work in works:
        work.wait()


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    # lse is -inf on rows with no visible key; shifting by 0 there keeps exp() at exactly 0 instead of NaN.
    return torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _nonzero_or_one(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x == 0, torch.ones((), dtype=x.dtype, device=x.device), x)


def _group_rank_and_size(plan: CPShardPlan, group: dist.ProcessGroup | None) -> tuple[int, int]:
    if plan.cp_size == 1 and (group is None or dist.get_world_size(group) == 1):
        return 0, 1
    if not dist.is_initialized():
        raise RuntimeError(f"ring_attention: plan.cp_size={plan.cp_size} needs an initialised torch.distributed "
                           "process group (init_process_group, then pass the CP group)")
    size = dist.get_world_size(group)
    if size != plan.cp_size:
        raise ValueError(f"ring_attention: the process group has {size} ranks but plan.cp_size={plan.cp_size}; "
                         "pass the CP group the plan was built for")
    return dist.get_rank(group), size


def _validate_shapes(q, k, v, plan, rank, cached_k, cached_v, cached_positions) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("ring_attention: q_local, k_local, v_local must be [tokens_local, heads, head_dim], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    rows = plan.num_local_tokens
    if q.shape[0] != rows or k.shape[0] != rows or v.shape[0] != rows:
        raise ValueError(f"ring_attention: the plan gives each rank {rows} rows (padding included), got q "
                         f"{q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}; build the inputs with cp_sharding.shard")
    if k.shape != v.shape or k.shape[2] != q.shape[2]:
        raise ValueError(f"ring_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must match each other and "
                         f"q's head_dim {q.shape[2]}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"ring_attention: num_kv_heads={k.shape[1]} must divide num_heads={q.shape[1]}")
    if (cached_k is None) != (cached_v is None):
        raise ValueError("ring_attention: pass both cached_k_local and cached_v_local, or neither")
    if cached_k is None:
        if plan.num_cached_tokens:
            raise ValueError(f"ring_attention: the plan has {plan.num_cached_tokens} cached tokens "
                             "(context_lens) but cached_k_local/cached_v_local were not given")
        return
    expected = (plan.num_cached_local(rank), *k.shape[1:])
    if tuple(cached_k.shape) != expected or tuple(cached_v.shape) != expected:
        raise ValueError(f"ring_attention: rank {rank} holds {expected[0]} cached rows in the plan's round-robin "
                         f"layout, so cached K/V must be {expected}; got {tuple(cached_k.shape)}, "
                         f"{tuple(cached_v.shape)} (build them with cp_sharding.shard_cache)")
    if cached_positions is not None and not torch.equal(cached_positions.cpu().long(), plan.cached_positions[rank]):
        raise ValueError(f"ring_attention: cached_positions on rank {rank} differ from the plan's round-robin "
                         "layout (position p of a sequence on rank p % cp_size, ordered by sequence then position)")
