"""Graph-timed latency of one collective call, as a captured decode step pays it (no launch gaps, no host).

Who calls it: `mesh.collectives.measure_table` (the start-up crossover sweep) and benchmarks/collectives.py. Each
function is a collective over `dda.group` (every rank calls it with the same arguments) and returns this rank's
median microseconds per call.

How: `calls` calls are captured in one CUDA graph (inputs rotate over a few random buffers, so no call reads what
the previous one just wrote to the same address and the sums stay finite), the graph is replayed once to warm up,
then each of `replays` replays is timed with CUDA events; the median replay over `calls` is the figure.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

from mesh.cuda_timing import median_replay_ms

_ROTATION_BYTES = 256 << 20  # at most this much input memory per timing


def _graph_time_us(run_call: Callable[[int], None], *, calls: int, replays: int, group: Any) -> float:
    torch.cuda.synchronize()  # nothing of the previous timing in flight: each starts from a quiet group
    dist.barrier(group=group)
    for i in range(2):  # compiles kernels, creates NCCL's communicator: outside the capture
        run_call(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            run_call(i)
    graph.replay()
    torch.cuda.synchronize()
    dist.barrier(group=group)
    per_call_us = median_replay_ms(graph, replays) * 1000.0 / calls
    del graph
    return per_call_us


def _inputs(num_bytes: int, dtype: torch.dtype, calls: int, world_size: int) -> list[torch.Tensor]:
    element_size = torch.empty((), dtype=dtype).element_size()
    num_elements = max(world_size, num_bytes // element_size // world_size * world_size)
    count = max(2, min(calls, _ROTATION_BYTES // max(1, num_bytes)))
    device = torch.device("cuda", torch.cuda.current_device())
    return [torch.randn(num_elements, device=device).to(dtype) for _ in range(count)]


def time_all_reduce(dda: Any, algorithm: str, num_bytes: int, *, dtype: torch.dtype = torch.bfloat16,
                    calls: int = 20, replays: int = 5) -> float:
    """Microseconds per all-reduce of `num_bytes`: `algorithm` "nccl" or any of mesh.dda.ALGORITHMS."""
    tensors = _inputs(num_bytes, dtype, calls, dda.world_size)

    def run_call(i: int) -> None:
        tensor = tensors[i % len(tensors)]
        if algorithm == "nccl":
            dist.all_reduce(tensor, group=dda.group)
        else:
            dda.all_reduce(tensor, algorithm)

    return _graph_time_us(run_call, calls=calls, replays=replays, group=dda.group)


def time_all_to_all(dda: Any, algorithm: str, num_bytes: int, *, dtype: torch.dtype = torch.bfloat16,
                    calls: int = 20, replays: int = 5) -> float:
    """Microseconds per equal-split all-to-all whose input is `num_bytes` per rank: "nccl" or "direct"."""
    inputs = _inputs(num_bytes, dtype, calls, dda.world_size)
    outputs = [torch.empty_like(t) for t in inputs]

    def run_call(i: int) -> None:
        k = i % len(inputs)
        if algorithm == "nccl":
            dist.all_to_all_single(outputs[k], inputs[k], group=dda.group)
        else:
            dda.all_to_all_single(outputs[k], inputs[k])

    return _graph_time_us(run_call, calls=calls, replays=replays, group=dda.group)
