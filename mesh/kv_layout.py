"""Where every KV element of a replica lives: per rank, which layers (PP), which KV heads (TP, replicated when tp
exceeds the KV heads) and which tokens (CP). A pure function of the mesh shape and the model, so the KV-transfer
planner can compute both sides of a transfer without asking any rank.

Who calls it: `kv_transfer` (transfer plans between unequal prefill and decode meshes) and `mesh.model` itself
(the attention layers take their KV head range from `kv_head_range`, so the model and the planner cannot disagree).

Token ownership (the `token_rule` of a rank):
- "all": cp == 1, or a cp > 1 model running a step against a paged cache (decode after a CP prefill: every cp rank
  holds and computes every token). Token p of a sequence is in the paged cache slot of `block_table[p // block]`.
- "cp": a context-parallel prefill step. The step's new tokens are split by `mesh.cp_sharding.shard_plan`
  (2 * cp chunks per sequence, cp rank i holds chunks i and 2 * cp - 1 - i; `plan.token_indices[i]`); this is what
  `layer_hook` sees on that rank. The persistent cache (`mesh.round_robin_kv.RoundRobinKVStore`) holds position p of
  a sequence on cp rank p % cp, ordered by position, both for the cached prefix and, after the step, its new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.config import ModelConfig
from mesh.parallel import MeshShape, ParallelDims, stage_layer_range


def kv_head_range(num_kv_heads: int, tp_size: int, tp_rank: int) -> range:
    """KV heads tp rank `tp_rank` holds. Split evenly when tp <= num_kv_heads; when tp is a multiple of
    num_kv_heads, ranks tp_rank * num_kv_heads // tp share (replicate) one head, next to the query heads that
    read it."""
    num_shards = min(tp_size, num_kv_heads)
    if num_kv_heads % num_shards != 0 or tp_size % num_shards != 0:
        raise ValueError(f"kv_head_range: tp={tp_size} must divide, or be a multiple of, {num_kv_heads} KV heads")
    heads_per_shard = num_kv_heads // num_shards
    shard = tp_rank * num_shards // tp_size
    return range(shard * heads_per_shard, (shard + 1) * heads_per_shard)


@dataclass(frozen=True, kw_only=True)
class RankKVLayout:
    """One rank's share of the replica's KV cache. `layers` and `kv_heads` are global indices (ranges); the rank's
    cache tensors hold exactly those, in that order (`kv_cache[i]` is layer `layers[i]`)."""

    rank: int
    pp_rank: int
    cp_rank: int
    tp_rank: int
    cp_size: int
    layers: range
    kv_heads: range
    # How many tp ranks hold the same KV heads (1 = no replication); a transfer reads from any one of them.
    kv_replicas: int
    token_rule: str  # "all" or "cp" (module docstring)


def kv_layout(shape: MeshShape | ParallelDims, config: ModelConfig) -> tuple[RankKVLayout, ...]:
    """Every rank's KV share, indexed by rank (rank = (pp_rank * cp + cp_rank) * tp + tp_rank). The token rule is
    "cp" when cp > 1 (for a prefill step; a paged-cache step on a cp > 1 mesh is "all", see the module docstring).
    Takes the mesh's shape (or any rank's ParallelDims: the answer is the same on every rank)."""
    shape = shape.shape if isinstance(shape, ParallelDims) else shape
    shape.validate(config)
    replicas = max(1, shape.tp // config.num_kv_heads)
    layouts = []
    for rank in range(shape.world_size):
        coords = shape.coords(rank)
        layouts.append(RankKVLayout(
            rank=rank, pp_rank=coords["pp"], cp_rank=coords["cp"], tp_rank=coords["tp"], cp_size=shape.cp,
            layers=stage_layer_range(config.num_layers, shape.pp, coords["pp"]),
            kv_heads=kv_head_range(config.num_kv_heads, shape.tp, coords["tp"]),
            kv_replicas=replicas, token_rule="cp" if shape.cp > 1 else "all",
        ))
    return tuple(layouts)
