"""How many paged KV-cache blocks a decode replica allocates, decided once at start-up on every rank.

Precedence (documented in README's cluster.yaml table):
  1. `decode.num_kv_blocks` set in cluster.yaml: exactly that many, on CPU and GPU alike;
  2. unset, GPU tier: what `decode.gpu_memory_fraction` of the rank's GPU leaves after the weights (already loaded)
     and an activation reserve (`mesh.gpu_memory`'s arithmetic, applied to this rank's shard: its layers, its KV
     heads); every rank of a multi-rank replica computes its own and the replica takes the smallest, since rank 0's
     block table is used on every rank;
  3. unset, CPU tier: CPU_DEFAULT_NUM_KV_BLOCKS.

Who calls it: decode rank actors (decode_tier/replica.py for rank 0, decode_tier/rank_worker.py for the others),
after loading their shard and before allocating the cache: `size_kv_cache` on each, then `agree_on_size` over
the control channel (collective: every rank calls it, in the same place of its bring-up).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from mesh.gpu_memory import activation_bytes, plan_kv_cache
from mesh.model import CausalLM
from mesh.rank_group import RankGroup

CPU_DEFAULT_NUM_KV_BLOCKS = 1024


@dataclass(frozen=True, kw_only=True)
class KVCacheSize:
    num_blocks: int
    source: str  # "num_kv_blocks" (set in cluster.yaml), "gpu_memory_fraction" or "cpu default"
    description: str  # the start-up report line

    def __post_init__(self) -> None:
        if self.num_blocks < 1:
            raise ValueError(f"KVCacheSize.num_blocks must be >= 1, got {self.num_blocks}")


def size_kv_cache(model: CausalLM, *, num_kv_blocks: int | None, gpu_memory_fraction: float, block_size: int,
                  max_num_seqs: int, memory_info: tuple[int, int] | None = None,
                  max_step_tokens: int | None = None) -> KVCacheSize:
    """This rank's choice (see the module docstring). `max_step_tokens`: the most tokens one engine step feeds
    (decode rows plus local-prefill chunks; None: max_num_seqs, decode only), sizing the activation reserve.
    `memory_info`: (free, total) bytes of the rank's GPU as
    `torch.cuda.mem_get_info` reports them (default: read now; tests pass numbers). Raises ValueError when the
    fraction leaves no room for even one block."""
    if num_kv_blocks is not None:
        return KVCacheSize(num_blocks=num_kv_blocks, source="num_kv_blocks",
                           description=f"KV cache: {num_kv_blocks} blocks x {block_size} tokens "
                                       f"(decode.num_kv_blocks)")
    if model.device.type != "cuda" and memory_info is None:
        return KVCacheSize(num_blocks=CPU_DEFAULT_NUM_KV_BLOCKS, source="cpu default",
                           description=f"KV cache: {CPU_DEFAULT_NUM_KV_BLOCKS} blocks x {block_size} tokens "
                                       f"(CPU default; set decode.num_kv_blocks to change it)")
    if memory_info is None:
        torch.cuda.synchronize(model.device)  # weights fully in place before reading what is free
        memory_info = torch.cuda.mem_get_info(model.device)
    free_bytes, total_bytes = memory_info
    # gpu_memory's arithmetic counts the whole model's layers and KV heads; a rank holds its stage's layers and its
    # tp share of the heads, so it is handed a config of exactly that shard.
    shard = dataclasses.replace(model.config, num_layers=model.num_layers, num_kv_heads=model.num_kv_heads_local)
    # A step has one row per running sequence plus, with local prefill, prompt-chunk rows up to max_step_tokens;
    # the reserve's prefill term covers those rows.
    reserve = activation_bytes(model.config, max_num_seqs=max_num_seqs,
                               max_prefill_tokens=max(max_num_seqs, max_step_tokens or 0), dtype=model.dtype)
    plan = plan_kv_cache(shard, block_size=block_size, dtype=model.dtype, gpu_memory_fraction=gpu_memory_fraction,
                         total_bytes=total_bytes, in_use_bytes=total_bytes - free_bytes,
                         activation_reserve_bytes=reserve)
    return KVCacheSize(num_blocks=plan.num_blocks, source="gpu_memory_fraction",
                       description=plan.describe() + " (decode.gpu_memory_fraction; decode.num_kv_blocks unset)")


def agree_on_size(group: RankGroup | None, mine: KVCacheSize) -> KVCacheSize:
    """Collective over the replica's control channel: every rank gets the smallest rank's size (the block table is
    shared, so every rank must hold the same number of blocks). One-rank replicas (group None) keep their own."""
    if group is None:
        return mine
    sizes = group.gather(mine)
    smallest = min(sizes, key=lambda size: size.num_blocks) if sizes is not None else None
    chosen = group.broadcast(smallest)
    if chosen.num_blocks == mine.num_blocks:
        return mine
    return dataclasses.replace(chosen, description=f"{chosen.description} (the smallest rank's; this rank alone "
                                                   f"had room for {mine.num_blocks})")
