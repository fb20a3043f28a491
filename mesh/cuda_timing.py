"""Device time of a captured CUDA graph: the one timing rule the engine's capture-time choices, the collectives'
start-up sweep and the benchmarks share, so their figures compare.

Who calls it: mesh/gpu_graphs.py (fused/PDL variant choice), mesh/gpu_gemv_tuning.py (tile choice),
mesh/dda_timing.py (crossover sweep) and benchmarks/collectives.py. CUDA only.
"""

from __future__ import annotations

import statistics

import torch


def median_replay_ms(graph: torch.cuda.CUDAGraph, replays: int = 7) -> float:
    """Median device milliseconds of one replay of `graph`, each timed alone with CUDA events after one untimed
    replay (which pages in whatever the first replay touches)."""
    graph.replay()
    times = []
    for _ in range(replays):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)
