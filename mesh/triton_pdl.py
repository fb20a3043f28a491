"""Programmatic dependent launch (PDL) for the decode step's Triton kernels: whether their launches carry the
attribute, switched around a CUDA graph capture.

Why: a batch-1 decode step is ~230 kernels of a few microseconds; between two of them the GPU drains one grid
and ramps the next (~2 us each). With PDL a kernel is launched while its predecessor still runs: it issues the
loads that do not depend on the predecessor (the weight tiles of a projection) and then blocks in
`griddepcontrol.wait` until the predecessor's grid has completed and its writes are visible.

The contract every kernel of mesh.triton_decode / mesh.triton_gemv keeps when its USE_PDL is set: nothing written
by an earlier kernel is read, and nothing is written, before `gdc_wait()`; only read-only weights may be loaded
before it. After the wait it calls `gdc_launch_dependents()` so the next kernel can start early (never before:
otherwise launches would cascade many kernels deep, each holding multiprocessor slots while it waits).

Who calls it: mesh.gpu_graphs.DecodeGraphs wraps each capture in `pdl_launches(on)`; the kernels' launch
wrappers read `is_enabled()` / `launch_options()` at launch time (a replayed graph keeps what was captured).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

_state = {"enabled": False}


def is_supported() -> bool:
    """Hopper or newer, a real GPU (not Triton's interpreter), and not switched off by PDCLUSTER_NO_PDL=1."""
    if os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("PDCLUSTER_NO_PDL") == "1":
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def is_enabled() -> bool:
    return _state["enabled"]


def launch_options() -> dict:
    """Extra keyword arguments of a Triton launch: the PDL launch attribute when enabled."""
    return {"launch_pdl": True} if _state["enabled"] else {}


@contextlib.contextmanager
def pdl_launches(enabled: bool) -> Iterator[None]:
    """Kernels launched inside carry the PDL attribute (when supported) and wait for their predecessor in-kernel."""
    previous = _state["enabled"]
    _state["enabled"] = bool(enabled) and is_supported()
    try:
        yield
    finally:
        _state["enabled"] = previous
