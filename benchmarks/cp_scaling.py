"""Context-parallel prefill on two GPUs (issue 3): CP1 vs CP2 (ring pass-KV) vs TP2 for one long prompt, and
pass-KV vs pass-Q against a persistent cache, with a Llama-3-8B-shaped model of random bf16 weights.

    python benchmarks/cp_scaling.py --out DIR [--tokens 32768,131072] [--time-budget-s 300]
    python benchmarks/cp_scaling.py --dry-run --out DIR      # CPU, Gloo, a tiny model: checks the script only

Two processes (torch.multiprocessing, one per GPU, NCCL), no torchrun. Weights are drawn on the GPU
(benchmarks/_cp_probes.random_model). Only the last token's logits are computed (logits_indices = last row), as
the prefill tier does. Each rank of a mesh times the same forward; a row reports the slowest rank.

- Kernel: every fused attention backend of mesh.flash_block_attention is checked against the math one and timed
  on a causal block; the fastest correct one runs every CP step (set_default_backend) and, through
  torch.nn.attention.sdpa_kernel, the CP1 and TP2 local attention too, so all rows use the same attention kernel.
- Prefill of N tokens, fresh prompt: CP1 (the model on one GPU; both GPUs run a copy at once, rank 0 reported,
  rank 1 kept as a cross-check), CP2 (cp=2, pass-KV ring) and TP2 (tp=2). Parallel efficiency of CP2 =
  t(CP1) / (2 * t(CP2)).
- Partial prefill on CP2: a persistent cache of --cache-tokens tokens in a RoundRobinKVStore (random K/V rows,
  restored before every run), then --new-fractions of that many new tokens, each with pass-KV and pass-Q, plus
  the mode `cp_mode: auto` picks from the measured attention rate and GPU-to-GPU bandwidth.
--configs picks the phases (CP1, CP2, TP2, partial); efficiency rows need CP1 in the same run.

FLOPs (MFU = FLOPs / (time * GPUs * 790e12), the bf16 rate measured on this machine kind):
  linear = 2 * P_linear * N, P_linear = the q/k/v/o and MLP weights of all layers (embedding lookup is no
           matmul; the LM head runs for one row and adds 2 * vocab * hidden);
  attention = 4 * L * H * D * N * (C + N / 2) for N new tokens over C cached ones (QK^T and PV, 2 FLOPs per
           multiply-add, causal half of the new-new square); for C = 0 this is 4 * N^2 / 2 * L * H * D.
Prints the tables last and writes cp_scaling.json under --out (after every phase, so a run cut short keeps
what it measured).
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._cp_probes import (choose_kernel, matmul_rate, p2p_bandwidth, random_model,  # noqa: E402
                                   time_s)
from benchmarks._report import command_line, machine_info, print_table, write_json  # noqa: E402
from mesh.attention import AttentionBatch  # noqa: E402
from mesh.config import ModelConfig  # noqa: E402
from mesh.context_parallel import CPRates  # noqa: E402
from mesh.cp_heuristic import choose_cp_mode  # noqa: E402
from mesh.flash_block_attention import set_default_backend  # noqa: E402
from mesh.parallel import MeshShape, ParallelDims  # noqa: E402
from mesh.presets import PRESETS  # noqa: E402
from mesh.round_robin_kv import RoundRobinKVStore  # noqa: E402

PEAK_FLOPS = 790e12  # bf16 matrix rate measured on an H200 of this workplace (the brief's ceiling)
CACHE_KEY = "cached-prompt"
PHASES = ("CP1", "CP2", "TP2", "partial")
# The dry run's model: the 8B preset's structure (GQA 4:1, SwiGLU) at a size two CPU cores run in seconds.
DRY_RUN_SHAPE = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 8,
                 "num_key_value_heads": 2, "vocab_size": 512, "bos_token_id": 256, "eos_token_id": 257}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    floats = lambda text: [float(x) for x in text.split(",") if x]  # noqa: E731
    parser.add_argument("--out", default=os.environ.get("OUT", "cp_scaling_results"))
    parser.add_argument("--tokens", type=ints, default=[32768, 131072])
    parser.add_argument("--cache-tokens", type=int, default=131072)
    parser.add_argument("--new-fractions", type=floats, default=[0.01, 0.05, 0.10, 1.0])
    parser.add_argument("--backends", default="flash,cudnn,efficient")
    parser.add_argument("--kernel-tokens", type=int, default=16384, help="block size of the kernel check")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs below 64K tokens (one above)")
    parser.add_argument("--time-budget-s", type=float, default=300.0,
                        help="skip what would not finish in this many seconds from the start")
    parser.add_argument("--configs", default="CP1,CP2,TP2,partial", help="which phases run, in this order")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Gloo, tiny model (checks the script)")
    args = parser.parse_args(argv)
    unknown = set(args.configs.split(",")) - set(PHASES)
    if unknown:
        parser.error(f"--configs: unknown {sorted(unknown)}; choose from {', '.join(PHASES)}")
    if args.dry_run:
        args.tokens = [t for t in args.tokens if t <= 512] or [192, 512]
        args.cache_tokens = min(args.cache_tokens, 512)
        args.backends = "math"
        args.kernel_tokens = 256
    return args


# ---- figures -----------------------------------------------------------------------------------------------------

def linear_params(config: ModelConfig) -> int:
    per_layer = (config.hidden_size * (config.q_size + 2 * config.kv_size) + config.q_size * config.hidden_size
                 + 3 * config.hidden_size * config.intermediate_size)
    return per_layer * config.num_layers


def prefill_flops(config: ModelConfig, num_new: int, num_cached: int = 0) -> dict:
    linear = 2 * linear_params(config) * num_new + 2 * config.vocab_size * config.hidden_size
    attention = (4 * config.num_layers * config.num_heads * config.head_dim * num_new
                 * (num_cached + num_new / 2))
    return {"linear": linear, "attention": attention, "total": linear + attention}


def row(label: str, config: ModelConfig, num_new: int, num_cached: int, seconds: float, num_gpus: int, **extra):
    flops = prefill_flops(config, num_new, num_cached)
    return {"config": label, "new_tokens": num_new, "cached_tokens": num_cached, "gpus": num_gpus,
            "seconds": seconds, "tokens_per_s": num_new / seconds, "flops": flops["total"],
            "attention_flop_share": flops["attention"] / flops["total"],
            "mfu_per_gpu": flops["total"] / (seconds * num_gpus * PEAK_FLOPS), **extra}


# ---- the rank processes ------------------------------------------------------------------------------------------

class Rank:
    """One of the two processes: its device, the shared deadline, and collective helpers both ranks call."""

    def __init__(self, rank: int, args: argparse.Namespace, start_time: float) -> None:
        self.rank, self.args = rank, args
        self.device = torch.device("cpu") if args.dry_run else torch.device("cuda", rank)
        self.deadline = start_time + args.time_budget_s
        self.dtype = torch.float32 if args.dry_run else torch.bfloat16
        self.document: dict = {"command": command_line(), "peak_flops": PEAK_FLOPS, "prefill": [], "partial": [],
                               "skipped": []}

    def agree(self, value):
        """Rank 0's value on both ranks (so both take the same branch)."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def has_time(self, what: str, estimate_s: float) -> bool:
        fits = self.agree(time.time() + estimate_s < self.deadline)
        if not fits:
            self.document["skipped"].append(f"{what}: estimated {estimate_s:.0f} s, past --time-budget-s")
        return fits

    def slowest(self, seconds: float) -> tuple[float, list[float]]:
        values = [None, None]
        dist.all_gather_object(values, seconds)
        return max(values), values

    def save(self) -> None:
        if self.rank == 0:
            write_json(Path(self.args.out) / "cp_scaling.json", self.document)


def prompt(num_tokens: int, vocab: int, device: torch.device, num_cached: int = 0, key=None):
    # The same ids on every rank: a mesh's ranks all take the whole step's inputs.
    ids = torch.randint(0, vocab, (num_tokens,), device=device,
                        generator=torch.Generator(device=device).manual_seed(num_tokens))
    positions = torch.arange(num_cached, num_cached + num_tokens, device=device)
    batch = AttentionBatch([num_tokens], [num_cached], None,
                           AttentionBatch.last_token_indices([num_tokens], device),
                           seq_keys=[key] if key is not None else None)
    return ids, positions, batch


def estimate_s(config: ModelConfig, num_new: int, num_cached: int, num_gpus: int, runs: int) -> float:
    # 400 TFLOP/s per GPU (below the goal of 435): the budget check errs towards skipping.
    return prefill_flops(config, num_new, num_cached)["total"] / (num_gpus * 400e12) * runs + 1.0


def repeats_for(args, num_tokens: int) -> int:
    return args.repeats if num_tokens < 65536 else 1


def run_prefill_phase(me: Rank, config: ModelConfig, label: str, shape: MeshShape | None, cp_rates: CPRates,
                      attention_scope) -> None:
    """Full prefill at every --tokens on one mesh; shape None = CP1, one model per GPU."""
    args = me.args
    num_gpus = 1 if shape is None else shape.world_size
    runs = {n: repeats_for(args, n) for n in args.tokens}
    if not me.has_time(label, estimate_s(config, args.tokens[0], 0, num_gpus, runs[args.tokens[0]])):
        return
    dims = ParallelDims.single() if shape is None else ParallelDims(shape, me.rank)
    model = random_model(config, dims, me.device, me.dtype, cp_rates)
    cp_mode = "pass-kv"
    with attention_scope():
        warm = min(args.tokens[0], 4096)
        model(*prompt(warm, config.vocab_size, me.device), cp_mode=cp_mode)  # kernels, handles, allocator
        for num_tokens in args.tokens:
            if not me.has_time(f"{label} {num_tokens}", estimate_s(config, num_tokens, 0, num_gpus, runs[num_tokens])):
                continue
            ids, positions, batch = prompt(num_tokens, config.vocab_size, me.device)
            logits = []
            dist.barrier()
            seconds = time_s(lambda: logits.append(model(ids, positions, batch, cp_mode=cp_mode)), me.device,
                             repeats=runs[num_tokens], warmup=0)
            is_finite = bool(torch.isfinite(logits[-1]).all())
            slowest, per_rank = me.slowest(seconds)
            if shape is None:  # two independent single-GPU runs: report rank 0, keep rank 1 as a cross-check
                slowest = per_rank[0]
            me.document["prefill"].append(row(label, config, num_tokens, 0, slowest, num_gpus,
                                              per_rank_seconds=per_rank, runs=runs[num_tokens],
                                              logits_finite=is_finite))
            me.save()
    del model
    gc.collect()
    if me.device.type == "cuda":
        torch.cuda.empty_cache()


def fill_store(store: RoundRobinKVStore, num_cached: int, device: torch.device, dtype: torch.dtype):
    """Random K/V rows for a cached prompt of num_cached tokens in the store's round-robin layout. Benchmark-only
    shim: it writes the store's private fields, because the public way in is a full prefill (minutes of GPU time
    per restore). Returns what `restore_store` needs."""
    num_rows = len(range(store.cp_rank, num_cached, store.cp_size))
    shape = (num_rows, store.num_kv_heads, store.head_dim)
    ks = [torch.randn(shape, device=device, dtype=dtype) for _ in range(store.num_layers)]
    vs = [torch.randn(shape, device=device, dtype=dtype) for _ in range(store.num_layers)]
    snapshot = (ks, vs, num_cached)
    restore_store(store, snapshot)
    return snapshot


def restore_store(store: RoundRobinKVStore, snapshot) -> None:
    ks, vs, num_cached = snapshot
    store._k[CACHE_KEY], store._v[CACHE_KEY] = list(ks), list(vs)
    store._lengths[CACHE_KEY] = num_cached


def run_partial_phase(me: Rank, config: ModelConfig, cp_rates: CPRates) -> None:
    """CP2 partial prefill against a persistent cache, pass-KV vs pass-Q, and auto's pick."""
    args = me.args
    num_cached = args.cache_tokens
    shape = MeshShape(cp=2)
    plan = []
    for fraction in args.new_fractions:
        num_new = max(1, round(fraction * num_cached))
        # One untimed warm-up run per mode below 100% (cheap); none at 100% (as long as a full prefill).
        plan.append((fraction, num_new, repeats_for(args, num_new) if fraction < 1 else 1, int(fraction < 1)))
    if not me.has_time("partial prefill", estimate_s(config, plan[0][1], num_cached, 2, 4)):
        return
    model = random_model(config, ParallelDims(shape, me.rank), me.device, me.dtype, cp_rates)
    store = RoundRobinKVStore.for_model(model)
    snapshot = fill_store(store, num_cached, me.device, me.dtype)
    heads = dict(num_heads=config.num_heads, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, cp_size=2,
                 peak_flops=cp_rates.peak_flops, bandwidth_bytes_per_s=cp_rates.bandwidth_bytes_per_s,
                 dtype_bytes=torch.empty((), dtype=me.dtype).element_size())
    for fraction, num_new, runs, warmup in plan:
        for mode in ("pass-kv", "pass-q"):
            estimate = estimate_s(config, num_new, num_cached, 2, runs + warmup)
            if not me.has_time(f"partial {fraction:.0%} {mode}", estimate):
                continue
            ids, positions, batch = prompt(num_new, config.vocab_size, me.device, num_cached, CACHE_KEY)

            def step():
                restore_store(store, snapshot)
                model(ids, positions, batch, cp_mode=mode, cp_store=store)

            dist.barrier()
            seconds = time_s(step, me.device, repeats=runs, warmup=warmup)
            slowest, per_rank = me.slowest(seconds)
            me.document["partial"].append(row(f"CP2 {mode}", config, num_new, num_cached, slowest, 2,
                                              new_fraction=fraction, mode=mode, per_rank_seconds=per_rank,
                                              runs=runs, auto_mode=choose_cp_mode(num_new, num_cached, **heads)))
            me.save()
    restore_store(store, snapshot)
    del model, store, snapshot
    gc.collect()
    if me.device.type == "cuda":
        torch.cuda.empty_cache()


def sdpa_scope(backend: str, device: torch.device):
    """The local (CP1, TP2) attention on the same kernel family as the CP block attention."""
    if device.type != "cuda":
        return nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
              "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]
    return lambda: sdpa_kernel([chosen])


def worker(rank: int, args: argparse.Namespace, port: int, start_time: float) -> None:
    me = Rank(rank, args, start_time)
    # Two ranks share the host: split its cores instead of letting both run a thread per core (oversubscribed
    # intra-op threads make the host-side planning of the CP steps slow).
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    if me.device.type == "cuda":
        torch.cuda.set_device(me.device)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                device_id=me.device)
    else:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        overrides = DRY_RUN_SHAPE if args.dry_run else {}
        longest = max([*args.tokens, 2 * args.cache_tokens])
        config = ModelConfig.from_hf_dict({**PRESETS["llama-3-8b"], **overrides,
                                           "max_position_embeddings": max(8192, 2 * longest)})
        me.document["machine"] = machine_info()
        me.document["model"] = {"preset": "llama-3-8b", "overrides": overrides, "linear_params":
                                linear_params(config), "layers": config.num_layers, "heads": config.num_heads,
                                "kv_heads": config.num_kv_heads, "head_dim": config.head_dim}
        if me.device.type == "cuda":
            me.document["device"] = torch.cuda.get_device_name(me.device)
            me.document["torch"] = torch.__version__
            me.document["matmul_flops_measured"] = me.agree(matmul_rate(me.device, 8192))
        bandwidth = p2p_bandwidth(me.device, 2 ** 28 if me.device.type == "cuda" else 2 ** 20)
        kernel = choose_kernel(args.backends.split(","), me.device, num_tokens=args.kernel_tokens,
                               num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
                               head_dim=config.head_dim)
        kernel = me.agree(kernel)
        bandwidth = me.agree(bandwidth)
        backend = kernel["chosen"]
        set_default_backend(backend)
        attention_rate = kernel["backends"][backend]["causal_tflops"] * 1e12
        cp_rates = CPRates(peak_flops=attention_rate, bandwidth_bytes_per_s=bandwidth)
        me.document["kernel"] = kernel
        me.document["cp_rates"] = {"attention_flops": attention_rate, "p2p_bytes_per_s": bandwidth}
        me.save()
        scope = sdpa_scope(backend, me.device)
        phases = {"CP1": lambda: run_prefill_phase(me, config, "CP1", None, cp_rates, scope),
                  "CP2": lambda: run_prefill_phase(me, config, "CP2 pass-kv", MeshShape(cp=2), cp_rates, scope),
                  "TP2": lambda: run_prefill_phase(me, config, "TP2", MeshShape(tp=2), cp_rates, scope),
                  "partial": lambda: run_partial_phase(me, config, cp_rates)}
        for name in args.configs.split(","):
            phases[name]()
        me.document["parallel_efficiency"] = [{"config": label, "tokens": tokens, "efficiency": value}
                                              for label, tokens, value in efficiency_rows(me.document["prefill"])]
        me.document["wall_s"] = time.time() - start_time
        me.save()
        dist.barrier()
        if rank == 0:
            report(me.document)
    finally:
        dist.destroy_process_group()


# ---- the report -----------------------------------------------------------------------------------------------------

def efficiency_rows(prefill: list[dict]) -> list[list]:
    by_key = {(r["config"], r["new_tokens"]): r["seconds"] for r in prefill}
    rows = []
    for (label, num_tokens), seconds in sorted(by_key.items()):
        if label == "CP1":
            for other in ("CP2 pass-kv", "TP2"):
                if (other, num_tokens) in by_key:
                    rows.append([other, num_tokens, seconds / (2 * by_key[(other, num_tokens)])])
    return rows


def report(document: dict) -> None:
    print()
    print(f"device: {document.get('device', 'cpu (dry run)')}, torch {document.get('torch', torch.__version__)}; "
          f"MFU against {PEAK_FLOPS / 1e12:.0f} TFLOP/s per GPU")
    kernel = document["kernel"]
    print_table("attention kernels (causal / full block, TFLOP/s)", ["backend", "causal", "full", "rel. error"],
                [[b, r.get("causal_tflops", float("nan")), r.get("full_tflops", float("nan")),
                  r.get("relative_error", r.get("error", "-"))] for b, r in kernel["backends"].items()])
    print(f"chosen kernel: {kernel['chosen']}; cp_rates: {document['cp_rates']}")
    header = ["config", "new tokens", "cached", "GPUs", "seconds", "tokens/s", "MFU/GPU %", "attn FLOP %"]
    print_table("prefill", header, [[r["config"], r["new_tokens"], r["cached_tokens"], r["gpus"], r["seconds"],
                                     r["tokens_per_s"], 100 * r["mfu_per_gpu"], 100 * r["attention_flop_share"]]
                                    for r in document["prefill"]])
    print_table("parallel efficiency t(CP1) / (2 t(X))", ["config", "tokens", "efficiency %"],
                [[label, tokens, 100 * value] for label, tokens, value in efficiency_rows(document["prefill"])])
    print_table("partial prefill on CP2 against a persistent cache",
                ["mode", "new %", "new tokens", "cached", "seconds", "MFU/GPU %", "auto picks"],
                [[r["mode"], 100 * r["new_fraction"], r["new_tokens"], r["cached_tokens"], r["seconds"],
                  100 * r["mfu_per_gpu"], r["auto_mode"]] for r in document["partial"]])
    for skipped in document["skipped"]:
        print(f"skipped: {skipped}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.dry_run and torch.cuda.device_count() < 2:
        raise SystemExit(f"cp_scaling: needs 2 CUDA GPUs, found {torch.cuda.device_count()} (use --dry-run on CPU)")
    # NVLink multicast stays off on the shared GPU hosts (their rule), also in the spawned ranks.
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    mp.start_processes(worker, args=(args, free_port(), time.time()), nprocs=2, join=True, start_method="spawn")


if __name__ == "__main__":
    main()
