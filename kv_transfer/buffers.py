"""Tensors as raw bytes, the form transports move them in.

Every dtype (bfloat16 included, which numpy and `__cuda_array_interface__` do not know) is reinterpreted as a
flat uint8 view of the same memory: no copy, and writes through the view land in the original tensor.
"""

from __future__ import annotations

import torch


def byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """A 1-D uint8 view of a contiguous tensor's memory."""
    if not tensor.is_contiguous():
        raise ValueError(f"transport tensors must be contiguous, got shape {tuple(tensor.shape)} strides {tensor.stride()}")
    return tensor.detach().reshape(-1).view(torch.uint8)


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def wire_buffer(tensor: torch.Tensor):
    """What ucxx reads from / writes into: a numpy view for host memory (buffer protocol), the uint8 CUDA
    tensor itself for device memory (ucxx takes `__cuda_array_interface__`). Both alias the tensor."""
    view = byte_view(tensor)
    if view.device.type == "cpu":
        return view.numpy()
    if view.device.type == "cuda":
        return view
    raise ValueError(f"unsupported device for KV transfer: {view.device}")
