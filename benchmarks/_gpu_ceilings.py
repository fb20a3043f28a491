"""The two ceilings a GPU benchmark compares against, measured in the same run (METHOD: measure, don't quote):
device-to-device copy bandwidth (bytes read + bytes written) and the bf16 matrix-product rate.

Who calls it: benchmarks/engine_speed.py, once at start, on the GPU it then benchmarks.
"""

from __future__ import annotations

import statistics
import time

import torch


def time_cuda_ms(fn, *, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of fn() over `repeats` runs, each timed with its own pair of CUDA events (the host
    clock when there is no GPU: the CPU dry run of the benchmark scripts)."""
    for _ in range(warmup):
        fn()
    times = []
    if not torch.cuda.is_available():
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def time_graph_ms(fn, *, calls_per_graph: int = 10, repeats: int = 20) -> float:
    """Device milliseconds of one fn() with the host out of the way: fn is captured `calls_per_graph` times back to
    back in one CUDA graph, the graph's replays are timed with events, and the median is divided by the calls.
    For small kernels whose eager launch costs more host time than their device time (the host clock when there
    is no GPU)."""
    if not torch.cuda.is_available():
        return time_cuda_ms(fn, repeats=repeats)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls_per_graph):
            fn()
    ms = time_cuda_ms(graph.replay, repeats=repeats)
    del graph
    return ms / calls_per_graph


def copy_bandwidth(num_bytes: int = 2 * 2 ** 30, device: str = "cuda") -> dict:
    """A device-to-device copy of random bytes; bandwidth counts the bytes read plus the bytes written."""
    src = torch.randint(0, 256, (num_bytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_cuda_ms(lambda: dst.copy_(src), repeats=10)
    del src, dst
    return {"bytes_copied": num_bytes, "ms": ms, "bytes_per_s": 2 * num_bytes / (ms / 1e3)}


def matmul_peak(size: int = 8192, device: str = "cuda") -> dict:
    """bf16 size^3 matrix product on random data (zeros run faster and would flatter the peak)."""
    a = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    b = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    ms = time_cuda_ms(lambda: a @ b, repeats=20)
    del a, b
    return {"size": size, "ms": ms, "flop_per_s": 2 * size ** 3 / (ms / 1e3)}
