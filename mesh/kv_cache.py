"""Allocation of the paged KV cache in the format every package shares (docs/internals.md):
one tensor per layer, `[num_blocks, 2, block_size, num_kv_heads_local, head_dim]`, K at index 0 and V at 1.

Who calls it: the decode engine (its whole cache) and tests; the prefill tier for its scratch cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from mesh.model import CausalLM


def kv_cache_block_bytes(model: CausalLM, block_size: int, dtype: torch.dtype | None = None) -> int:
    """Bytes one block takes over all layers of this rank: the unit the decode tier sizes its pool in."""
    element_size = torch.empty((), dtype=dtype or model.dtype).element_size()
    return model.num_layers * 2 * block_size * model.num_kv_heads_local * model.head_dim * element_size


def allocate_kv_cache(model: CausalLM, num_blocks: int, block_size: int, dtype: torch.dtype | None = None,
                      device: Any = None) -> list[torch.Tensor]:
    """Zeroed per-layer cache tensors; dtype and device default to the model's."""
    if num_blocks < 1 or block_size < 1:
        raise ValueError(f"allocate_kv_cache: num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
    shape = (num_blocks, 2, block_size, model.num_kv_heads_local, model.head_dim)
    return [torch.zeros(shape, dtype=dtype or model.dtype, device=device or model.device)
            for _ in range(model.num_layers)]
