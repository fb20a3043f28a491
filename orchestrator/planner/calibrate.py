"""`pdcluster calibrate`: measure this machine's ceilings with torch and return them as a `GpuSpec`.

Who calls it: `orchestrator.planner.cli.run_calibrate`, which saves the result for `pdcluster plan --hardware`.
What it measures: a square matrix product (bf16 on GPU, float32 on CPU), a device-to-device copy (bytes read +
written, as the decode model uses them), causal scaled-dot-product attention, the fixed time of one small kernel
(replayed from a CUDA graph on GPU; one op's dispatch on CPU), pinned host <-> device copies (GPU),
and, with two or more devices (or `world_size >= 2` on CPU, through Gloo), all-reduce bus bandwidth, small
all-reduce latency and send/recv bandwidth between ranks 0 and 1, one process per rank. Figures it cannot measure
(the UCX KV link, the inter-node network) are set from the nearest measured one and left out of `measured`, so a
reader knows which numbers are assumptions. On CPU the same code runs with small sizes: the file is valid and
testable in CI, though a CPU's figures only describe a CPU.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

from orchestrator.planner.hardware import GpuSpec

_ACCELERATOR_TYPES = (("H200", "H200"), ("H100", "H100"), ("A100", "A100"), ("L40S", "L40S"))


@dataclass(frozen=True, kw_only=True)
class CalibrationSizes:
    matmul_size: int
    copy_bytes: int
    attention_tokens: int
    attention_heads: int
    head_dim: int
    collective_bytes: int
    repeats: int

    @classmethod
    def for_device(cls, device_type: str, *, is_quick: bool) -> CalibrationSizes:
        if device_type == "cuda":
            if is_quick:
                return cls(matmul_size=4096, copy_bytes=256 * 2**20, attention_tokens=4096, attention_heads=32,
                           head_dim=128, collective_bytes=64 * 2**20, repeats=5)
            return cls(matmul_size=8192, copy_bytes=2**30, attention_tokens=8192, attention_heads=32, head_dim=128,
                       collective_bytes=256 * 2**20, repeats=10)
        if is_quick:
            return cls(matmul_size=256, copy_bytes=8 * 2**20, attention_tokens=256, attention_heads=4, head_dim=64,
                       collective_bytes=2**20, repeats=2)
        return cls(matmul_size=1024, copy_bytes=64 * 2**20, attention_tokens=1024, attention_heads=8, head_dim=64,
                   collective_bytes=16 * 2**20, repeats=5)


def _timer(device) -> Callable[[Callable[[], object], int], float]:
    """Seconds per call of `fn`, after one warm-up call (CUDA events on GPU, perf_counter on CPU)."""
    import torch

    def run(fn, repeats: int) -> float:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / 1e3 / repeats
        began = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - began) / repeats

    return run


def measure_matmul_flops(device, sizes: CalibrationSizes) -> float:
    import torch

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = sizes.matmul_size
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = _timer(device)(lambda: torch.mm(a, b), sizes.repeats)
    return 2 * n**3 / seconds


def measure_copy_bytes_per_s(device, sizes: CalibrationSizes) -> float:
    import torch

    source = torch.empty(sizes.copy_bytes, dtype=torch.uint8, device=device).fill_(1)
    target = torch.empty_like(source)
    seconds = _timer(device)(lambda: target.copy_(source), sizes.repeats)
    return 2 * sizes.copy_bytes / seconds  # read + written


def measure_attention_flops(device, sizes: CalibrationSizes) -> float:
    import torch
    import torch.nn.functional as F

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = (1, sizes.attention_heads, sizes.attention_tokens, sizes.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    seconds = _timer(device)(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), sizes.repeats)
    t = sizes.attention_tokens
    return 4 * sizes.attention_heads * sizes.head_dim * t * (t / 2) / seconds  # causal: half the pairs


def measure_host_link_bytes_per_s(device, sizes: CalibrationSizes) -> float:
    import torch

    host = torch.empty(sizes.copy_bytes, dtype=torch.uint8).pin_memory()
    target = torch.empty(sizes.copy_bytes, dtype=torch.uint8, device=device)
    seconds = _timer(device)(lambda: target.copy_(host, non_blocking=True), sizes.repeats)
    return sizes.copy_bytes / seconds


def measure_kernel_latency_s(device, *, num_kernels: int = 200, repeats: int = 5) -> float:
    """Fixed time of one kernel run back to back with others: `num_kernels` one-element adds captured in a CUDA graph
    and replayed (so launch cost is the graph's, as in the engine's decode step); on CPU, one small op's dispatch."""
    import torch

    x = torch.zeros(1, device=device)

    def many() -> None:
        for _ in range(num_kernels):
            x.add_(1)

    if device.type != "cuda":
        return _timer(device)(many, repeats) / num_kernels
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        many()  # warm-up outside the capture
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        many()
    return _timer(device)(graph.replay, repeats) / num_kernels


# --- collectives, one process per rank ----------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collective_worker(rank: int, world_size: int, backend: str, port: int, num_bytes: int, repeats: int,
                       result_path: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        timer = _timer(device)

        def timed(fn) -> float:
            dist.barrier()
            return timer(fn, repeats)

        dtype = torch.bfloat16 if backend == "nccl" else torch.float32
        big = torch.ones(num_bytes // dtype.itemsize, dtype=dtype, device=device)
        small = torch.ones(16 * 1024 // dtype.itemsize, dtype=dtype, device=device)
        allreduce_s = timed(lambda: dist.all_reduce(big))
        latency_s = timed(lambda: dist.all_reduce(small))
        if rank == 0:
            send_s = timed(lambda: dist.send(big, dst=1))
        elif rank == 1:
            send_s = timed(lambda: dist.recv(big, src=0))
        else:
            send_s = timed(lambda: None)
        if rank == 0:
            bus = num_bytes / allreduce_s * 2 * (world_size - 1) / world_size
            with open(result_path, "w") as f:
                f.write(f"{bus} {latency_s} {num_bytes / send_s}\n")
    finally:
        dist.destroy_process_group()


def measure_collectives(device_type: str, world_size: int, sizes: CalibrationSizes) -> tuple[float, float, float]:
    """(all-reduce bus bytes/s, 16 KiB all-reduce seconds, send/recv bytes/s) over `world_size` processes."""
    import torch.multiprocessing as mp

    backend = "nccl" if device_type == "cuda" else "gloo"
    with tempfile.TemporaryDirectory() as folder:
        result = os.path.join(folder, "result")
        mp.spawn(_collective_worker, nprocs=world_size, join=True,
                 args=(world_size, backend, _free_port(), sizes.collective_bytes, sizes.repeats, result))
        with open(result) as f:
            bus, latency, p2p = (float(x) for x in f.read().split())
    return bus, latency, p2p


# --- the whole run ------------------------------------------------------------------------------------------------

def _accelerator_type(device_name: str) -> str | None:
    for marker, ray_name in _ACCELERATOR_TYPES:
        if marker in device_name.upper():
            if ray_name == "A100" and "80GB" in device_name.upper().replace(" ", ""):
                return "A100-80G"
            return ray_name
    return None


def _physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def calibrate(*, device: str = "auto", name: str | None = None, world_size: int | None = None,
              is_quick: bool = False, log: Callable[[str], None] = lambda line: None) -> GpuSpec:
    """Measures this machine (see the module docstring). `world_size`: processes for the collectives (default:
    every GPU; 1 on CPU, which skips them). `log` receives one line per measurement."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"calibrate: device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("calibrate: --device cuda but torch sees no CUDA device")
    dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    sizes = CalibrationSizes.for_device(device, is_quick=is_quick)
    num_devices = torch.cuda.device_count() if device == "cuda" else 1
    world_size = (num_devices if device == "cuda" else 1) if world_size is None else world_size
    if world_size < 1 or (device == "cuda" and world_size > num_devices):
        raise ValueError(f"calibrate: world size {world_size} must be between 1 and the {num_devices} device(s)")
    device_name = torch.cuda.get_device_name(dev) if device == "cuda" else "cpu"

    figures: dict[str, float] = {}
    measured = ["memory_bytes"]
    figures["matmul_flops"] = measure_matmul_flops(dev, sizes)
    log(f"matmul: {figures['matmul_flops'] / 1e12:.3g} TFLOP/s")
    figures["hbm_bytes_per_s"] = measure_copy_bytes_per_s(dev, sizes)
    log(f"copy: {figures['hbm_bytes_per_s'] / 1e9:.3g} GB/s (read + written)")
    figures["attention_flops"] = measure_attention_flops(dev, sizes)
    log(f"attention: {figures['attention_flops'] / 1e12:.3g} TFLOP/s")
    figures["kernel_latency_s"] = measure_kernel_latency_s(dev)
    log(f"kernel: {figures['kernel_latency_s'] * 1e6:.2f} us each, back to back")
    measured += ["matmul_flops", "hbm_bytes_per_s", "attention_flops", "kernel_latency_s"]
    if device == "cuda":
        figures["host_link_bytes_per_s"] = measure_host_link_bytes_per_s(dev, sizes)
        measured.append("host_link_bytes_per_s")
        log(f"host -> device: {figures['host_link_bytes_per_s'] / 1e9:.3g} GB/s")
    else:
        figures["host_link_bytes_per_s"] = figures["hbm_bytes_per_s"] / 2  # host memory is the device's memory
    if world_size >= 2:
        bus, latency, p2p = measure_collectives(device, world_size, sizes)
        figures.update(allreduce_bus_bytes_per_s=bus, collective_latency_s=latency, p2p_bytes_per_s=p2p)
        measured += ["allreduce_bus_bytes_per_s", "collective_latency_s", "p2p_bytes_per_s"]
        log(f"all-reduce over {world_size}: bus {bus / 1e9:.3g} GB/s, 16 KiB in {latency * 1e6:.0f} us; "
            f"send/recv {p2p / 1e9:.3g} GB/s")
    else:
        # One device: no link to measure. A neighbour is assumed to be reached at the copy rate (CPU: shared
        # memory) so the file stays usable for single-rank plans; these fields are not marked measured.
        one_way = figures["hbm_bytes_per_s"] / 2
        figures.update(allreduce_bus_bytes_per_s=one_way, collective_latency_s=100e-6, p2p_bytes_per_s=one_way)
        log("collectives: one device, not measured (assumed from the copy rate)")
    figures["kv_link_bytes_per_s"] = figures["p2p_bytes_per_s"]
    figures["internode_bytes_per_s"] = 40e9 if device == "cuda" else figures["p2p_bytes_per_s"]
    memory = torch.cuda.get_device_properties(dev).total_memory if device == "cuda" else _physical_memory_bytes()
    return GpuSpec(
        name=name or (device_name.replace(" ", "-") if device == "cuda" else "cpu"),
        memory_bytes=int(memory),
        gpus_per_node=max(1, num_devices),
        accelerator_type=_accelerator_type(device_name) if device == "cuda" else None,
        is_gpu=device == "cuda",
        source=(f"measured by pdcluster calibrate on {device_name} with torch {torch.__version__}"
                f"{' (quick sizes)' if is_quick else ''}; KV link and inter-node link assumed"),
        measured=tuple(measured),
        **figures,
    )
