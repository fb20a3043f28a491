"""Optional per-layer checksum (a debug aid, off by default).

When a reservation asks for it, the sender appends one extra chunk to each layer: an int64 tensor holding the
CRC-32 of that layer's chunks as sent; the receiver recomputes it over the blocks once everything landed.
Device tensors are copied to the host to be hashed, which is slow: debugging only.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch

from kv_transfer.buffers import byte_view


def layer_checksum(chunks: Sequence[torch.Tensor]) -> int:
    crc = 0
    for chunk in chunks:
        crc = zlib.crc32(byte_view(chunk).cpu().numpy(), crc)
    return crc


def checksum_tensor(value: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int64, device=device)


def empty_checksum_tensor(device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.full((1,), -1, dtype=torch.int64, device=device)
