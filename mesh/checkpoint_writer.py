"""Writes a safetensors file one tensor at a time, so a multi-GB checkpoint never sits in memory whole.

Who calls it: `mesh.presets.make_model`. The file is a standard safetensors file (8-byte little-endian header
length, JSON header with dtype/shape/data_offsets, then the tensors' bytes back to back), readable by
`safetensors.safe_open` and by transformers.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Iterable

import torch

_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def write_safetensors_streaming(path: str | Path, specs: Iterable[tuple[str, tuple[int, ...]]],
                                make_tensor: Callable[[str, tuple[int, ...]], torch.Tensor],
                                dtype: torch.dtype) -> None:
    """`specs`: (name, shape) in file order; `make_tensor(name, shape)` is called once per tensor, in that order,
    and its result is cast to `dtype` and written immediately."""
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"write_safetensors_streaming: dtype {dtype} not supported; use one of "
                         f"{list(_SAFETENSORS_DTYPES)}")
    specs = list(specs)
    element_size = torch.empty((), dtype=dtype).element_size()
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in specs:
        num_bytes = element_size * _numel(shape)
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + num_bytes]}
        offset += num_bytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # keep the data 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for name, shape in specs:
            tensor = make_tensor(name, shape).to(dtype).contiguous()
            if tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"make_tensor({name!r}) returned shape {tuple(tensor.shape)}, expected {shape}")
            f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
