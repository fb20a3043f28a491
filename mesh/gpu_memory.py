"""How many KV-cache blocks fit on the GPU: the cache gets what `gpu_memory_fraction` of the device leaves after
the weights (already loaded), the step activations and the CUDA graphs, reported once at start-up.

Who calls it: a decode replica before allocating its cache (`plan_kv_cache_on_device`, then
`mesh.kv_cache.allocate_kv_cache(model, plan.num_blocks, plan.block_size)`); benchmarks. `plan_kv_cache` is the
pure arithmetic (tested on CPU); `plan_kv_cache_on_device` reads the device's free memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mesh.config import ModelConfig

GIB = 2 ** 30


@dataclass(frozen=True, kw_only=True)
class KVCachePlan:
    num_blocks: int
    block_size: int
    block_bytes: int  # one block over all layers (K and V)
    total_bytes: int  # the device's memory
    in_use_bytes: int  # taken before the cache (weights, the framework's context, other processes)
    activation_bytes: int  # kept free for step activations and CUDA graph pools
    gpu_memory_fraction: float

    @property
    def cache_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def describe(self) -> str:
        """The start-up report line."""
        return (f"KV cache: {self.num_blocks} blocks x {self.block_size} tokens = {self.num_tokens} tokens, "
                f"{self.cache_bytes / GIB:.2f} GiB ({self.block_bytes / 2**20:.3f} MiB a block); device "
                f"{self.total_bytes / GIB:.1f} GiB x gpu_memory_fraction {self.gpu_memory_fraction} with "
                f"{self.in_use_bytes / GIB:.2f} GiB in use and {self.activation_bytes / GIB:.2f} GiB kept for "
                f"activations")


def kv_block_bytes(config: ModelConfig, block_size: int, dtype: torch.dtype, num_layers: int | None = None) -> int:
    element_size = torch.empty((), dtype=dtype).element_size()
    layers = config.num_layers if num_layers is None else num_layers
    return layers * 2 * block_size * config.num_kv_heads * config.head_dim * element_size


def activation_bytes(config: ModelConfig, *, max_num_seqs: int, max_prefill_tokens: int, dtype: torch.dtype) -> int:
    """A generous bound on what a step allocates besides the cache: the widest prefill activations (hidden,
    fused QKV, gate/up, SiLU output, attention output) for max_prefill_tokens, the float32 logits of the largest
    decode bucket (each captured bucket keeps its own), plus 512 MiB for allocator slack and library workspaces."""
    element_size = torch.empty((), dtype=dtype).element_size()
    widths = (3 * config.hidden_size + (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
              + 3 * config.intermediate_size + config.num_heads * config.head_dim)
    prefill = max_prefill_tokens * widths * element_size
    logits = 2 * max_num_seqs * config.vocab_size * (4 + element_size)
    return prefill + logits + 512 * 2 ** 20


def plan_kv_cache(config: ModelConfig, *, block_size: int, dtype: torch.dtype, gpu_memory_fraction: float,
                  total_bytes: int, in_use_bytes: int, activation_reserve_bytes: int) -> KVCachePlan:
    """num_blocks = (total * fraction - in use - activations) // block bytes; ValueError naming the shortfall
    when not even one block fits."""
    if not 0 < gpu_memory_fraction <= 1:
        raise ValueError(f"gpu_memory_fraction must be in (0, 1], got {gpu_memory_fraction}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    block_bytes = kv_block_bytes(config, block_size, dtype)
    budget = int(total_bytes * gpu_memory_fraction) - in_use_bytes - activation_reserve_bytes
    num_blocks = budget // block_bytes if budget > 0 else 0
    if num_blocks < 1:
        raise ValueError(
            f"no room for the KV cache: gpu_memory_fraction {gpu_memory_fraction} of {total_bytes / GIB:.1f} GiB "
            f"leaves {budget / GIB:.2f} GiB after {in_use_bytes / GIB:.2f} GiB in use and "
            f"{activation_reserve_bytes / GIB:.2f} GiB for activations; one block needs {block_bytes} bytes. Raise "
            f"gpu_memory_fraction or lower max_num_seqs / the prefill token budget")
    return KVCachePlan(num_blocks=num_blocks, block_size=block_size, block_bytes=block_bytes,
                       total_bytes=total_bytes, in_use_bytes=in_use_bytes, activation_bytes=activation_reserve_bytes,
                       gpu_memory_fraction=gpu_memory_fraction)


def plan_kv_cache_on_device(config: ModelConfig, *, block_size: int, dtype: torch.dtype, gpu_memory_fraction: float,
                            max_num_seqs: int, max_prefill_tokens: int, device: Any = "cuda") -> KVCachePlan:
    """The plan from the device's memory as it is now (call it after the weights are loaded)."""
    device = torch.device(device)
    torch.cuda.synchronize(device)
    free_bytes, total_bytes = torch.cuda.mem_get_info(device)
    reserve = activation_bytes(config, max_num_seqs=max_num_seqs, max_prefill_tokens=max_prefill_tokens, dtype=dtype)
    return plan_kv_cache(config, block_size=block_size, dtype=dtype, gpu_memory_fraction=gpu_memory_fraction,
                         total_bytes=total_bytes, in_use_bytes=total_bytes - free_bytes,
                         activation_reserve_bytes=reserve)
