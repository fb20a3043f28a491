"""Picks, by measurement on the device, the tile of mesh.triton_gemv's kernel for each projection of a GpuDecoder
at a given number of rows, and times cuBLAS (F.linear) on the same shapes for the record.

Who calls it: `mesh.gpu_graphs.DecodeGraphs.capture` (once per fused bucket, before capturing it) and
benchmarks/engine_speed.py (which reports the table). It promises: `decoder.gemv_tiles[(name, rows)]` is set for
every projection whose kernel ran on at least one candidate tile, and the returned rows say what each choice
measured. Timings are CUDA-graph replays of one call per layer over every layer's own weight (the weights of one
layer would sit in L2 on repeats and flatter the result).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

PROJECTIONS = ("qkv", "o", "gate_up", "down", "lm_head")


def graph_time_us(calls: Sequence[Callable[[], Any]], *, repeats: int = 5) -> float:
    """Device microseconds per call of `calls`, captured back to back in one CUDA graph (median of `repeats`
    replays). The calls run once eagerly first (Triton compilation, cuBLAS handles)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1e3)
    del graph
    return statistics.median(times) / len(calls)


def _weights(decoder: Any, name: str) -> list[torch.Tensor]:
    w = decoder.weights
    if name == "lm_head":
        return [w.lm_head]
    return [getattr(layer, name) for layer in w.layers]


def tune_decode_gemv(decoder: Any, rows: int, candidates: Sequence[Any] | None = None) -> list[dict]:
    """Measures every candidate tile on every projection at `rows` rows; stores the fastest in
    decoder.gemv_tiles. Returns one dict per projection: name, shape, chosen tile, its time and bandwidth, cuBLAS's
    time, and the candidates that failed to compile or run."""
    from mesh.triton_gemv import candidate_tiles, fused_gemv

    candidates = list(candidates or candidate_tiles(rows))
    device, dtype = decoder.device, decoder.dtype
    generator = torch.Generator(device=device).manual_seed(rows)
    report = []
    for name in PROJECTIONS:
        weights = _weights(decoder, name)
        num_out, k = weights[0].shape
        is_down = name == "down"
        # Random input, never zeros (METHOD: zeros can run faster); the down projection reads gate/up output.
        x = torch.randn((rows, 2 * k if is_down else k), generator=generator, device=device).to(dtype)
        num_bytes = weights[0].numel() * weights[0].element_size()
        row: dict = {"projection": name, "rows": rows, "n": num_out, "k": k, "weight_bytes": num_bytes,
                     "failed": []}
        if is_down:
            # What the unfused step runs: the SiLU*up kernel, then cuBLAS.
            row["cublas_us"] = graph_time_us([lambda w=w: F.linear(decoder.ops.silu_mul(x), w) for w in weights])
        else:
            row["cublas_us"] = graph_time_us([lambda w=w: F.linear(x, w) for w in weights])
        best = None
        for tile in candidates:
            try:
                us = graph_time_us([lambda w=w: fused_gemv(x, w, silu_input=is_down, tile=tile) for w in weights])
            except Exception as error:  # a tile that does not fit this GPU: try the others
                row["failed"].append(f"{tile}: {type(error).__name__}: {str(error)[:120]}")
                continue
            row.setdefault("candidates_us", {})[f"{tile.block_n}x{tile.block_k}w{tile.num_warps}"] = us
            if best is None or us < best[1]:
                best = (tile, us)
        if best is not None:
            decoder.gemv_tiles[(name, rows)] = best[0]
            row.update(tile=f"{best[0].block_n}x{best[0].block_k}w{best[0].num_warps}", us=best[1],
                       bytes_per_s=num_bytes / (best[1] / 1e6))
        row["cublas_bytes_per_s"] = num_bytes / (row["cublas_us"] / 1e6)
        report.append(row)
    return report
