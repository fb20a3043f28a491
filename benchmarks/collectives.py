"""Collectives at decode sizes on two GPUs: NCCL against the direct-access one-shot / two-shot all-reduce and the
direct all-to-all (mesh/dda.py), and what that buys a TP2 decode step of the Llama-3-8B shape (issue 10).

    python benchmarks/collectives.py --out benchmarks/results/collectives.json [--quick] [--skip-tpot]

Two processes, one GPU each, NCCL world. Every latency is a CUDA graph of `--calls` back-to-back calls replayed
`--replays` times, each replay timed with CUDA events, median replay / calls (mesh/dda_timing.py); each
configuration is measured twice (runs 1 and 2) so the spread is visible. Inputs are random bf16, rotated over
several buffers. Rank 0's figures are reported (both ranks wait for each other inside every call).

TP2 decode: mesh/gpu_decoder.py is the one-GPU path (engineer G's); this script builds the TP2 step from the same
operations (mesh.triton_decode.TritonOps + torch matmuls) with each rank's shard of random weights: per layer
add+RMSNorm, QKV (16 of 32 query heads, 4 of 8 KV heads), rotary + cache write, paged attention over `--context`
cached tokens, O projection, all-reduce, add+RMSNorm, gate/up, SiLU*up, down, all-reduce; then the final norm, this
rank's half of the LM head and an NCCL all-gather of the logits (the same in every variant). One CUDA graph per
variant and batch: `nccl` (torch.distributed all-reduce), `dda` (mesh.collectives: the start-up table picks the
algorithm by size), and `none` (no all-reduce: the floor communication could reach). TPOT = median step time.
Prints the tables last and writes the JSON (+ PNG beside it when matplotlib is there).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import command_line, machine_info, print_table, write_json  # noqa: E402
from mesh.cuda_timing import median_replay_ms  # noqa: E402

NUM_GPUS = 2
KIB = 1 << 10
ALL_REDUCE_SIZES = tuple(4 * KIB << i for i in range(15))  # 4 KiB .. 64 MiB
ALL_TO_ALL_SIZES = tuple(64 * KIB << i for i in range(7))  # 64 KiB .. 4 MiB
QUICK_ALL_REDUCE_SIZES = (4 * KIB, 16 * KIB, 64 * KIB, 128 * KIB, 256 * KIB, 512 * KIB, 1 << 20, 4 << 20, 16 << 20)
QUICK_ALL_TO_ALL_SIZES = (64 * KIB, 512 * KIB, 4 << 20)
# "one-shot" is the low-latency kernel up to DirectAccessGroup.ll_max_bytes, "one-shot-barrier" above it
ALL_REDUCE_ALGORITHMS = ("nccl", "one-shot", "one-shot-barrier", "two-shot")
# Llama-3-8B, split over two ranks
HIDDEN, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, INTERMEDIATE, VOCAB = 4096, 32, 8, 128, 14336, 128256
BLOCK_SIZE = 16


# ---- the sweep -------------------------------------------------------------------------------------------------

def sweep(dda, args) -> dict:
    from mesh.dda_timing import time_all_reduce, time_all_to_all

    quick = args.quick
    ar_sizes = QUICK_ALL_REDUCE_SIZES if quick else ALL_REDUCE_SIZES
    a2a_sizes = QUICK_ALL_TO_ALL_SIZES if quick else ALL_TO_ALL_SIZES
    rows = []
    for run in (1, 2):
        for size in ar_sizes:
            for algorithm in ALL_REDUCE_ALGORITHMS:
                us = _guarded(time_all_reduce, dda, algorithm, size, calls=args.calls, replays=args.replays)
                rows.append({"op": "all_reduce", "algorithm": algorithm, "bytes": size, "run": run, "us": us})
        for size in a2a_sizes:
            for algorithm in ("nccl", "direct"):
                us = _guarded(time_all_to_all, dda, algorithm, size, calls=args.calls, replays=args.replays)
                rows.append({"op": "all_to_all", "algorithm": algorithm, "bytes": size, "run": run, "us": us})
    return {"rows": rows}


def _guarded(timer, *args, **kwargs) -> float:
    """A failing variant (a kernel that does not compile, say) costs its row, not the run: NaN, message printed."""
    try:
        return timer(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - reported, and the other variants still measured
        print(f"{timer.__name__}{args[1:3]}: {type(error).__name__}: {error}", flush=True)
        return float("nan")


# ---- TP2 decode step -------------------------------------------------------------------------------------------

def _tp_weights(num_layers: int, rank: int, device: str) -> dict:
    """This rank's shard of random bf16 weights (scaled so activations stay finite over many layers)."""
    generator = torch.Generator(device=device).manual_seed(1234 + rank)
    heads, kv_heads, inter = NUM_HEADS // NUM_GPUS, NUM_KV_HEADS // NUM_GPUS, INTERMEDIATE // NUM_GPUS

    def rand(*shape):
        return (torch.randn(*shape, device=device, generator=generator) * shape[-1] ** -0.5).to(torch.bfloat16)

    layers = [{"input_norm": torch.ones(HIDDEN, dtype=torch.bfloat16, device=device),
               "post_norm": torch.ones(HIDDEN, dtype=torch.bfloat16, device=device),
               "qkv": rand((heads + 2 * kv_heads) * HEAD_DIM, HIDDEN), "o": rand(HIDDEN, heads * HEAD_DIM),
               "gate_up": rand(2 * inter, HIDDEN), "down": rand(HIDDEN, inter)} for _ in range(num_layers)]
    return {"layers": layers, "norm": torch.ones(HIDDEN, dtype=torch.bfloat16, device=device),
            "lm_head": rand(VOCAB // NUM_GPUS, HIDDEN)}


def _decode_step(ops, weights, state, caches, all_reduce, group) -> None:
    """One TP decode step on this rank; writes the gathered logits into state["logits"]."""
    heads, kv_heads = NUM_HEADS // NUM_GPUS, NUM_KV_HEADS // NUM_GPUS
    h = state["h"]
    h.copy_(state["h0"])  # every replay starts from the same residual stream
    num_rows = h.shape[0]
    delta = None
    for layer, cache in zip(weights["layers"], caches):
        x = ops.add_rms_norm(h, delta, layer["input_norm"], 1e-5)
        qkv = F.linear(x, layer["qkv"])
        q, _ = ops.rope_and_store(qkv, state["positions"], state["slots"], state["cos"], state["sin"], cache, heads,
                                  kv_heads)
        attn = ops.paged_decode_attention(q, cache, state["block_tables"], state["seq_lens"], HEAD_DIM ** -0.5,
                                          state["num_splits"])
        o = F.linear(attn.view(num_rows, heads * HEAD_DIM), layer["o"])
        all_reduce(o)
        x = ops.add_rms_norm(h, o, layer["post_norm"], 1e-5)
        delta = F.linear(ops.silu_mul(F.linear(x, layer["gate_up"])), layer["down"])
        all_reduce(delta)
    x = ops.add_rms_norm(h, delta, weights["norm"], 1e-5)
    local = F.linear(x, weights["lm_head"])
    dist.all_gather_into_tensor(state["logits"], local.contiguous(), group=group)


def tp_decode(collectives, args, rank: int, device: str) -> list[dict]:
    from mesh.gpu_graphs import num_splits_for
    from mesh.gpu_ops import rope_tables
    from mesh.layers import rope_inverse_frequencies
    from mesh.triton_decode import TritonOps

    group = collectives.group
    weights = _tp_weights(args.layers, rank, device)
    inv_freq = rope_inverse_frequencies(HEAD_DIM, 500000.0, None)
    cos, sin = rope_tables(inv_freq, args.context + 16, torch.bfloat16, device)
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    results = []
    for batch in args.batches:
        blocks_per_seq = -(-(args.context + 1) // BLOCK_SIZE)
        num_blocks = batch * blocks_per_seq
        caches = [torch.randn(num_blocks, 2, BLOCK_SIZE, NUM_KV_HEADS // NUM_GPUS, HEAD_DIM, device=device,
                              dtype=torch.bfloat16) for _ in range(args.layers)]
        tables = torch.arange(num_blocks, dtype=torch.int32, device=device).view(batch, blocks_per_seq)
        position = args.context  # the new token; `context` tokens already cached
        state = {"h0": torch.randn(batch, HIDDEN, device=device).to(torch.bfloat16),
                 "h": torch.empty(batch, HIDDEN, dtype=torch.bfloat16, device=device),
                 "positions": torch.full((batch,), position, dtype=torch.long, device=device),
                 "slots": (tables[:, position // BLOCK_SIZE].long() * BLOCK_SIZE + position % BLOCK_SIZE),
                 "seq_lens": torch.full((batch,), position + 1, dtype=torch.long, device=device),
                 "block_tables": tables, "cos": cos, "sin": sin,
                 "num_splits": num_splits_for(batch, NUM_KV_HEADS // NUM_GPUS, num_sms),
                 "logits": torch.empty(batch * NUM_GPUS, VOCAB // NUM_GPUS, dtype=torch.bfloat16, device=device)}
        variants = {"nccl": lambda t: dist.all_reduce(t, group=group), "dda": collectives.all_reduce,
                    "none": lambda t: None}
        if collectives.dda is not None:  # the table's choice, and one-shot whatever the table says
            variants["one-shot"] = lambda t: collectives.dda.all_reduce(t, "one-shot")
        message_bytes = batch * HIDDEN * 2
        for run in (1, 2):
            for name, all_reduce in variants.items():
                step_ms = _time_step(lambda: _decode_step(TritonOps, weights, state, caches, all_reduce, group),
                                     args.replays_tpot, group)
                algorithm = {"nccl": "nccl", "none": "-", "one-shot": "one-shot"}.get(name) \
                    or collectives.all_reduce_algorithm(state["h"])
                results.append({"batch": batch, "context": args.context, "variant": name, "run": run,
                                "allreduce_bytes": message_bytes, "algorithm": algorithm, "tpot_ms": step_ms})
        caches = state = None  # free this batch's cache before the next one is drawn
        torch.cuda.empty_cache()
    return results


def _time_step(step, replays: int, group) -> float:
    step()  # compile / warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    dist.barrier(group=group)
    step_ms = median_replay_ms(graph, replays)
    del graph
    return step_ms


# ---- processes -------------------------------------------------------------------------------------------------

def _rank_main(rank: int, port: int, args, out_path: str) -> None:
    from mesh.collectives import install
    from mesh.collectives_config import CollectivesConfig
    from mesh.dda import DirectAccessGroup

    torch.cuda.set_device(rank)
    device = f"cuda:{rank}"
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=NUM_GPUS,
                            device_id=torch.device("cuda", rank))
    document: dict = {}
    try:
        dda = DirectAccessGroup.create(dist.group.WORLD, buffer_bytes=2 * max(ALL_REDUCE_SIZES))
        document["sweep"] = sweep(dda, args)
        if not args.skip_tpot:
            group = dist.new_group(list(range(NUM_GPUS)), backend="nccl")
            collectives = install(group, CollectivesConfig())
            document["startup_table"] = collectives.table.as_dict()
            document["tpot"] = tp_decode(collectives, args, rank, device)
        dist.barrier()
    finally:
        if rank == 0:
            Path(out_path).write_text(json.dumps(document))
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _median_by(rows: list[dict], keys: tuple[str, ...], value: str) -> dict[tuple, list[float]]:
    grouped: dict[tuple, list[float]] = {}
    for row in rows:
        grouped.setdefault(tuple(row[k] for k in keys), []).append(row[value])
    return grouped


def report(document: dict) -> None:
    rows = document["sweep"]["rows"]
    by = _median_by(rows, ("op", "algorithm", "bytes"), "us")
    for op, algorithms in (("all_reduce", ALL_REDUCE_ALGORITHMS), ("all_to_all", ("nccl", "direct"))):
        sizes = sorted({r["bytes"] for r in rows if r["op"] == op})
        table = []
        for size in sizes:
            runs = [by.get((op, a, size)) for a in algorithms]
            cells = [f"{min(r):.1f}/{max(r):.1f}" if r else "-" for r in runs]
            best_direct = min((min(r) for a, r in zip(algorithms, runs) if r and a != "nccl"), default=float("nan"))
            nccl = min(by[(op, "nccl", size)])
            table.append([_size(size), *cells, f"{nccl / best_direct:.2f}x"])
        print_table(f"{op}: microseconds per call, runs 1/2 (CUDA graph of calls, 2 x H200)",
                    ["size", *algorithms, "nccl / best direct"], table)
    if "tpot" in document:
        by = _median_by(document["tpot"], ("batch", "variant"), "tpot_ms")
        algorithm = {(r["batch"], r["variant"]): r["algorithm"] for r in document["tpot"]}
        table = []
        for batch in sorted({r["batch"] for r in document["tpot"]}):
            nccl, dda, none = (by[(batch, v)] for v in ("nccl", "dda", "none"))
            forced = by.get((batch, "one-shot"), [float("nan")])
            table.append([batch, f"{min(nccl):.3f}/{max(nccl):.3f}", f"{min(dda):.3f}/{max(dda):.3f}",
                          algorithm[(batch, "dda")], f"{min(forced):.3f}", f"{min(none):.3f}",
                          f"{min(nccl) / min(dda):.3f}x"])
        print_table("TP2 decode TPOT (ms), Llama-3-8B shape, CUDA graph per step, runs 1/2",
                    ["batch", "nccl", "dda (table)", "table's algorithm", "one-shot", "no all-reduce", "nccl / dda"],
                    table)
        print(f"start-up crossover table: {document.get('startup_table')}")


def plot(path: Path, document: dict) -> Path:
    """Latency against size per algorithm (log-log), as benchmarks/plot_results.py draws its figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = document["sweep"]["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, op in zip(axes, ("all_reduce", "all_to_all")):
        by = _median_by([r for r in rows if r["op"] == op], ("algorithm", "bytes"), "us")
        for algorithm in sorted({a for a, _ in by}):
            points = sorted((size, min(us)) for (a, size), us in by.items() if a == algorithm)
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=algorithm)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("bytes per rank")
        axis.set_ylabel("microseconds per call")
        axis.set_title(f"{op}, 2 GPUs, CUDA graph")
        axis.legend(fontsize=8)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _size(num_bytes: int) -> str:
    return f"{num_bytes >> 20} MiB" if num_bytes >= 1 << 20 else f"{num_bytes >> 10} KiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/collectives.json")
    parser.add_argument("--quick", action="store_true", help="fewer sizes (a first look)")
    parser.add_argument("--skip-tpot", action="store_true")
    parser.add_argument("--calls", type=int, default=50, help="collective calls per captured graph")
    parser.add_argument("--replays", type=int, default=10)
    parser.add_argument("--replays-tpot", type=int, default=20)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 64])
    args = parser.parse_args(argv)
    if torch.cuda.device_count() < NUM_GPUS:
        print(f"needs {NUM_GPUS} CUDA GPUs, found {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        partial = os.path.join(tmp, "rank0.json")
        try:
            mp.spawn(_rank_main, args=(_free_port(), args, partial), nprocs=NUM_GPUS, join=True)
        except Exception as error:  # noqa: BLE001 - what rank 0 measured before the failure is still written
            print(f"a rank failed: {error}", file=sys.stderr)
        if not Path(partial).exists():
            return 1
        document = json.loads(Path(partial).read_text())
    document = {"command": command_line(), "machine": machine_info(),
                "device": torch.cuda.get_device_name(0), "num_gpus": NUM_GPUS, **document}
    path = write_json(args.out, document)
    try:
        print(f"figure: {plot(path, document)}")
    except ImportError as error:  # the figure is optional (matplotlib)
        print(f"(no PNG: {error})")
    report(document)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
