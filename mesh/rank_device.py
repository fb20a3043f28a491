"""Which device a tier rank computes on, and which collective backend its model process group uses.

Who calls it: the tier rank actors (prefill_tier, decode_tier), once at start-up, with the GPU ids Ray assigned to
the actor (`ray.get_gpu_ids()`; empty for a CPU tier). Ray restricts `CUDA_VISIBLE_DEVICES` of an actor that asks
for `num_gpus` to its own GPUs, so the assigned GPU is usually `cuda:0` inside the actor; this module maps the id
through `CUDA_VISIBLE_DEVICES` so it stays right when Ray is told not to set it. Torch only at import; the two
helpers at the end ask Ray lazily, and only inside a rank actor.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch


def rank_device(gpu_ids: Sequence, *, use_gpu: bool, visible_devices: str | None = None) -> torch.device:
    """The torch device of a rank: CPU unless `use_gpu` (the tier's resources ask for num_gpus), else the first of
    the GPU ids Ray assigned it (one GPU per rank is the design; asking for more only reserves them).
    `visible_devices`: the value of CUDA_VISIBLE_DEVICES (default: this process's). Raises RuntimeError when a GPU
    is wanted but none was assigned or this torch cannot use it, naming the likely cause."""
    if not use_gpu:
        return torch.device("cpu")
    if not gpu_ids:
        raise RuntimeError("the tier asks for GPUs (resources.num_gpus) but Ray assigned this rank none")
    if not torch.cuda.is_available():
        raise RuntimeError(f"Ray assigned GPU(s) {list(gpu_ids)} to this rank but torch {torch.__version__} sees no "
                           f"CUDA device (a CPU build of torch, or no driver on this node)")
    if visible_devices is None:
        visible_devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    index = local_cuda_index(gpu_ids[0], visible_devices)
    if index >= torch.cuda.device_count():
        raise RuntimeError(f"GPU {gpu_ids[0]} maps to cuda:{index}, but torch sees {torch.cuda.device_count()} "
                           f"device(s)")
    return torch.device("cuda", index)


def local_cuda_index(gpu_id, visible_devices: str | None) -> int:
    """The CUDA ordinal, inside this process, of the GPU Ray calls `gpu_id`: its position in CUDA_VISIBLE_DEVICES
    (Ray sets it to the actor's own GPUs, so usually 0), or the id itself when nothing is hidden."""
    wanted = str(gpu_id).strip()
    if visible_devices is None or not visible_devices.strip():
        return int(wanted)
    visible = [entry.strip() for entry in visible_devices.split(",")]
    if wanted not in visible:
        raise RuntimeError(f"Ray assigned GPU {wanted} but CUDA_VISIBLE_DEVICES={visible_devices!r} hides it")
    return visible.index(wanted)


def collective_backend(device: torch.device) -> str:
    """The torch.distributed backend of a rank's model collectives: NCCL between GPUs, Gloo between CPU ranks (the
    control channel is Gloo either way, mesh/rank_group.py)."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def bind_thread(device: torch.device) -> None:
    """Make `device` current on the calling thread (CUDA's current device is per thread): call it on every thread
    that launches work or records events for the rank: its compute thread and its event loop."""
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(device)


def device_identity(device: torch.device) -> str:
    """What tells GPUs apart across processes (each actor sees its own GPU as cuda:0): the GPU's UUID; "cpu" on the
    host. Reported in the tier stats so an operator (and the GPU test) can see which physical GPU a rank holds."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return str(getattr(torch.cuda.get_device_properties(device), "uuid", f"cuda:{device.index}"))


# model.dtype in cluster.yaml -> torch dtype
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def node_host() -> str:
    """The address other ranks and tiers reach this process on: PDCLUSTER_KV_HOST (a one-machine deployment keeps
    traffic on loopback, orchestrator/deploy.py sets it), else this node's IP as Ray sees it."""
    host = os.environ.get("PDCLUSTER_KV_HOST")
    if host:
        return host
    import ray  # only the actor's own node knows its address

    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


def actor_device(use_gpu: bool) -> torch.device:
    """This rank actor's device: the GPU Ray assigned it when the tier asks for num_gpus, else the CPU."""
    if not use_gpu:
        return torch.device("cpu")
    import ray  # only the actor knows which GPU it was given

    return rank_device(ray.get_gpu_ids(), use_gpu=True)
