"""Picks, by measurement on the device, the tile of mesh.triton_gemv's kernel for each projection of a GpuDecoder
at a given number of rows, and times cuBLAS (F.linear) on the same shapes for the record.

Who calls it: `mesh.gpu_graphs.DecodeGraphs.capture` (once per fusable bucket, before capturing it) and
benchmarks/engine_speed.py (which reports the table). It promises: `decoder.gemv_tiles[(name, rows)]` (the fused
step's tile) is set for every projection whose fused call ran on at least one candidate tile, and
`decoder.plain_gemv_tiles[(name, rows)]` (the unfused step's: a tile where the bare Triton product beat cuBLAS,
else None) for every projection, and `decoder.down_silu_prologue[rows]` (the fused down projection computes SiLU*up
in its prologue, or after a separate SiLU*up kernel, whichever measured faster); the returned rows say what each choice measured. Timings are CUDA-graph replays of one call per layer over every layer's own weight (the weights of one
layer would sit in L2 on repeats and flatter the result).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from mesh.cuda_timing import median_replay_ms

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
    per_call_us = median_replay_ms(graph, repeats) * 1e3 / len(calls)
    del graph
    return per_call_us


def _weights(decoder: Any, name: str) -> list[torch.Tensor]:
    w = decoder.weights
    if name == "lm_head":
        return [w.lm_head]
    return [getattr(layer, name) for layer in w.layers]


def _calls(decoder: Any, name: str, rows: int, generator: torch.Generator) -> tuple[dict, dict]:
    """(fused call kwargs, plain call kwargs) of fused_linear for one projection, on random inputs (never zeros:
    METHOD, zeros can run faster): the fused step's prologue/epilogue, and the unfused step's bare product."""
    device, dtype = decoder.device, decoder.dtype
    weight = _weights(decoder, name)[0]
    num_out, k = weight.shape
    hidden = decoder.config.hidden_size

    def randn(*shape):
        return torch.randn(shape, generator=generator, device=device).to(dtype)

    norm = (torch.ones(k, device=device, dtype=dtype), torch.full((rows,), float(k), device=device), decoder.eps)
    residual = (randn(rows, hidden), torch.zeros(rows, device=device))
    x = randn(rows, k)
    if name in ("qkv", "gate_up"):
        return {"x": x, "norm": norm}, {"x": x}
    if name == "o":
        return {"x": x, "residual": residual}, {"x": x}
    if name == "down":
        gate_up = randn(rows, 2 * k)
        return {"x": gate_up, "silu_input": True, "residual": residual}, {"x": x}
    return ({"x": x, "norm": norm, "out_dtype": torch.float32}, {"x": x, "out_dtype": torch.float32})


def tune_decode_gemv(decoder: Any, rows: int, candidates: Sequence[Any] | None = None) -> list[dict]:
    """Measures, for every projection at `rows` rows: cuBLAS and every candidate tile on the bare product (the
    unfused step's choice, stored in decoder.plain_gemv_tiles: a tile, or None for cuBLAS), and every candidate
    on the fused step's exact call (stored in decoder.gemv_tiles). Returns one dict per projection with the times
    (us per call) and the tiles that failed to compile or run."""
    from mesh.triton_gemv import candidate_tiles, fused_gemv

    candidates = list(candidates or candidate_tiles(rows))
    generator = torch.Generator(device=decoder.device).manual_seed(rows)
    report = []
    for name in PROJECTIONS:
        weights = _weights(decoder, name)
        num_out, k = weights[0].shape
        fused_kwargs, plain_kwargs = _calls(decoder, name, rows, generator)
        num_bytes = weights[0].numel() * weights[0].element_size()
        row: dict = {"projection": name, "rows": rows, "n": num_out, "k": k, "weight_bytes": num_bytes,
                     "failed": [], "plain_us": {}, "fused_us": {}}
        x, out_dtype = plain_kwargs["x"], plain_kwargs.get("out_dtype")
        row["cublas_us"] = graph_time_us([lambda w=w: F.linear(x, w).to(out_dtype or w.dtype) for w in weights])
        kinds = {"plain": plain_kwargs, "fused": fused_kwargs}
        if name == "down":  # the alternative fused down: the SiLU*up kernel, then the product with its epilogue
            kinds["fused_silu_kernel"] = {**fused_kwargs, "silu_input": False}
            row["fused_silu_kernel_us"] = {}

        def call(w, kind, tile):
            args = {k: v for k, v in kinds[kind].items() if k != "x"}
            x_in = kinds[kind]["x"]
            if kind == "fused_silu_kernel":
                return lambda: fused_gemv(decoder.ops.silu_mul(x_in), w, tile=tile, **args)
            return lambda: fused_gemv(x_in, w, tile=tile, **args)

        for tile in candidates:
            label = f"{tile.block_n}x{tile.block_k}w{tile.num_warps}"
            for kind in kinds:
                try:
                    us = graph_time_us([call(w, kind, tile) for w in weights])
                except Exception as error:  # a tile that does not fit this GPU: try the others
                    row["failed"].append(f"{kind} {label}: {type(error).__name__}: {str(error)[:120]}")
                    continue
                row[f"{kind}_us"][label] = (us, tile)
        fused_options = [(us, tile, label, kind == "fused") for kind in kinds if kind != "plain"
                         for label, (us, tile) in row[f"{kind}_us"].items()]
        if fused_options:
            us, tile, label, is_prologue = min(fused_options, key=lambda option: option[0])
            decoder.gemv_tiles[(name, rows)] = tile
            if name == "down":
                decoder.down_silu_prologue[rows] = is_prologue
                label += "" if is_prologue else " +silu kernel"
            row.update(tile=label, us=us, bytes_per_s=num_bytes / (us / 1e6))
        plain = min(row["plain_us"].items(), key=lambda item: item[1][0], default=None)
        if plain is not None and plain[1][0] < row["cublas_us"]:
            decoder.plain_gemv_tiles[(name, rows)] = plain[1][1]
            row.update(plain_choice=plain[0], plain_best_us=plain[1][0])
        else:
            decoder.plain_gemv_tiles[(name, rows)] = None
            row.update(plain_choice="cublas", plain_best_us=row["cublas_us"])
        row["cublas_bytes_per_s"] = num_bytes / (row["cublas_us"] / 1e6)
        row["plain_bytes_per_s"] = num_bytes / (row["plain_best_us"] / 1e6)
        for kind in kinds:  # JSON: times only
            row[f"{kind}_us"] = {label: us for label, (us, _) in row[f"{kind}_us"].items()}
        report.append(row)
    return report
