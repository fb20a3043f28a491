"""One replica on one GPU at full speed: decode against the memory floor, prefill against the matrix peak, and
Hugging Face transformers on the same weights and workloads (issue 12).

    python benchmarks/engine_speed.py --out DIR [--models llama-3.2-1b,llama-3-8b] [--time-budget-s 300]

One process, one GPU. Weights are random bf16 drawn directly on the GPU in the presets' shapes
(mesh.gpu_weights.random_tensors: an 8B safetensors file would take many minutes to write on a CPU). Per model:
- decode (mesh.gpu_graphs.DecodeGraphs, CUDA graph per batch): time per step = per output token of every sequence,
  at each batch with `--context` tokens cached per sequence; the step includes its host work and the token fetch.
  Floor = (weight bytes a step reads + KV bytes read) / measured copy bandwidth (bytes read + written).
  Batches up to 8 are captured as fused/unfused x programmatic dependent launch on/off and keep the fastest
  (`--fused`, `--pdl` force one); the JSON and the tables carry each variant's replay time, the per-projection
  GEMV tuning (cuBLAS against the Triton tiles) and, for `--breakdown-batches`, the profiler's device time by
  kernel kind (under PDL a kernel's record includes its wait for the previous one: the records overlap).
- prefill (GpuDecoder.prefill, one prompt of N tokens, KV written to a paged cache): tokens/s and MFU =
  (2 x matmul params x N + causal attention 2 x N^2 x heads x head_dim per layer) / time / measured bf16 peak.
- transformers generate (sdpa, bf16) on the same weights: time per output token and time to first token, each
  twice over the same shapes. Seen on torch 2.11 / H200: SDPA picks cuDNN attention, whose per-call plan building
  for a shape not seen before takes ~2.6 ms of host time per layer, so the first pass (every decode step meets a
  new KV length) runs ~5x slower than the warm repeat; both are reported.
Prints the tables last and writes engine_speed.json (+ engine_speed.png when matplotlib is there) under --out.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._gpu_ceilings import copy_bandwidth, matmul_peak, time_cuda_ms, time_graph_ms  # noqa: E402
from benchmarks._report import command_line, machine_info, print_table, write_json  # noqa: E402
from mesh.config import ModelConfig  # noqa: E402
from mesh.gpu_decoder import GpuDecoder  # noqa: E402
from mesh.gpu_graphs import DecodeGraphs, num_splits_for  # noqa: E402
from mesh.gpu_weights import checkpoint_views, random_tensors  # noqa: E402
from mesh.presets import PRESETS  # noqa: E402

BLOCK_SIZE = 16
DEVICE = "cuda"  # "cpu" only for --device cpu: a dry run of the script itself, numbers meaningless


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    parser.add_argument("--out", default="engine_speed_results", help="folder for engine_speed.json / .png")
    parser.add_argument("--models", default="llama-3.2-1b,llama-3-8b")
    parser.add_argument("--decode-batches", type=ints, default=[1, 16, 64, 256])
    parser.add_argument("--context", type=int, default=1024, help="cached tokens per sequence at decode")
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--prefill-tokens", type=ints, default=[2048, 8192, 32768])
    parser.add_argument("--hf-decode-batches", type=ints, default=[1, 16, 64, 256],
                        help="batches for transformers (256 is skipped for models over 4B parameters: its "
                             "DynamicCache concatenation needs twice the cache)")
    parser.add_argument("--hf-new-tokens", type=int, default=8)
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--fused", choices=("auto", "on", "off"), default="auto",
                        help="fused decode for batches <= 8: measured against unfused (auto), forced on or off")
    parser.add_argument("--pdl", choices=("auto", "on", "off"), default="auto",
                        help="programmatic dependent launch of the Triton kernels: measured (auto), on or off")
    parser.add_argument("--breakdown-batches", type=ints, default=[1],
                        help="decode batches whose graph replay is profiled kernel by kernel")
    parser.add_argument("--device", default="cuda", help="cuda; cpu = dry run of the script on a tiny preset")
    parser.add_argument("--time-budget-s", type=float, default=math.inf,
                        help="skip the remaining transformers runs once the run is older than this")
    return parser.parse_args()


def model_config(name: str, args: argparse.Namespace) -> dict:
    """The preset, with enough positions for the longest prefill (the 8B preset's own limit is 8K)."""
    hf_config = dict(PRESETS[name])
    needed = max(args.prefill_tokens + [args.context + args.decode_steps + 16])
    hf_config["max_position_embeddings"] = max(hf_config["max_position_embeddings"], needed)
    return hf_config


def allocate_cache(config: ModelConfig, num_blocks: int) -> list[torch.Tensor]:
    shape = (num_blocks, 2, BLOCK_SIZE, config.num_kv_heads, config.head_dim)
    # Random, not zeros: zeros can run faster than real data and hide unwritten rows.
    return [torch.randn(shape, dtype=torch.bfloat16, device=DEVICE) for _ in range(config.num_layers)]


def decode_run(decoder: GpuDecoder, cache: list[torch.Tensor], batch: int, args: argparse.Namespace,
               bandwidth: float) -> dict:
    config = decoder.config
    blocks_per_seq = -(-(args.context + args.decode_steps + 8) // BLOCK_SIZE)
    tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(batch)]
    switch = {"auto": None, "on": True, "off": False}
    graphs = DecodeGraphs(decoder, cache, max_num_seqs=batch, buckets=(batch,), fused=switch[args.fused],
                          pdl=switch[args.pdl])
    capture_start = time.perf_counter()
    graphs.capture()  # batch <= 8: tunes the fused kernels and keeps the faster of fused / unfused
    capture_s = time.perf_counter() - capture_start
    request_ids = [f"r{i}" for i in range(batch)]
    tokens = torch.randint(0, config.vocab_size, (batch,)).tolist()
    position = args.context
    step_times, contexts = [], []
    for step in range(args.decode_steps + 3):
        start = time.perf_counter()
        _, greedy = graphs.step(request_ids, tokens, [position] * batch, tables)
        tokens = greedy.tolist()  # the one synchronisation of a step
        if step >= 3:  # warm-up steps excluded
            step_times.append(time.perf_counter() - start)
            contexts.append(position + 1)
        position += 1
    graph_ms = time_cuda_ms(lambda: graphs.replay(batch), repeats=10, warmup=2)
    step_ms = statistics.median(step_times) * 1e3
    kv_token_bytes = config.num_layers * 2 * config.num_kv_heads * config.head_dim * 2
    weight_bytes = decoder.weights.bytes_read_per_step()
    kv_bytes = batch * statistics.mean(contexts) * kv_token_bytes
    floor_ms = (weight_bytes + kv_bytes) / bandwidth * 1e3
    splits = graphs.num_splits[batch]
    choice = graphs.choices.get(batch, {})
    breakdown = kernel_breakdown(graphs, batch, graph_ms) if batch in args.breakdown_batches else None
    is_fused, is_pdl = graphs.is_fused[batch], graphs.is_pdl[batch]
    del graphs
    return {"batch": batch, "context": args.context, "step_ms": step_ms, "graph_replay_ms": graph_ms,
            "floor_ms": floor_ms, "x_floor": step_ms / floor_ms, "graph_x_floor": graph_ms / floor_ms,
            "tokens_per_s": batch / (step_ms / 1e3), "weight_bytes": weight_bytes, "kv_bytes": kv_bytes,
            "num_splits": splits, "capture_s": capture_s, "is_fused": is_fused,
            "fused_replay_ms": choice.get("fused_ms"), "unfused_replay_ms": choice.get("plain_ms"),
            "gemv": choice.get("gemv"), "variants_ms": choice.get("variants_ms"), "is_pdl": is_pdl,
            "variant_errors": choice.get("errors"), "kernels": breakdown}


_KERNEL_KINDS = (("_fused_gemv", "triton gemv"), ("_paged_decode", "paged attention"),
                 ("_merge_splits", "split merge"), ("_rope", "rotary + cache write"), ("_add_rms", "add + rmsnorm"),
                 ("_silu", "silu * up"), ("argmax", "argmax"), ("embedding", "embedding"), ("index", "embedding"),
                 ("memset", "memset"), ("fill", "memset"), ("gemv", "cublas"), ("gemm", "cublas"), ("nvjet", "cublas"),
                 ("cutlass", "cublas"), ("sm90", "cublas"), ("cast", "cast"), ("copy", "cast"))


def kernel_breakdown(graphs: DecodeGraphs, batch: int, replay_ms: float, repeats: int = 5) -> dict | None:
    """Device time per decode step by kernel kind, from the profiler's kernel records of `repeats` graph replays:
    what the kernels themselves take, and the rest of the replay (launch gaps, kernel ramp-up and tails)."""
    if DEVICE != "cuda":
        return None
    try:
        from torch.profiler import ProfilerActivity, profile

        graphs.replay(batch)
        synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(repeats):
                graphs.replay(batch)
            synchronize()
        kinds: dict[str, dict] = {}
        top = []
        for item in prof.key_averages():
            us = getattr(item, "device_time_total", None)
            if us is None:
                us = getattr(item, "cuda_time_total", 0.0)
            if not us or item.count == 0:
                continue
            name = item.key
            kind = next((k for pattern, k in _KERNEL_KINDS if pattern in name.lower()), "other")
            entry = kinds.setdefault(kind, {"us": 0.0, "launches": 0.0})
            entry["us"] += us / repeats
            entry["launches"] += item.count / repeats
            top.append({"kernel": name[:100], "kind": kind, "us": us / repeats, "launches": item.count / repeats})
        kernel_us = sum(k["us"] for k in kinds.values())
        top.sort(key=lambda row: -row["us"])
        return {"kinds": kinds, "kernel_us": kernel_us, "replay_us": replay_ms * 1e3,
                "gaps_us": replay_ms * 1e3 - kernel_us, "launches": sum(k["launches"] for k in kinds.values()),
                "top": top[:12]}
    except Exception as error:  # the profiler is a diagnostic: never lose the run for it
        return {"error": f"{type(error).__name__}: {str(error)[:300]}"}


def attention_kernels(decoder: GpuDecoder, cache: list[torch.Tensor], batches: list[int],
                      args: argparse.Namespace, bandwidth: float) -> list[dict]:
    """One layer's decode attention at each batch, `--context` tokens per sequence: the Triton paged kernel (reads
    each sequence's blocks in place) against gathering the blocks into a padded batch for SDPA (the reference
    model's decode path), both replayed from CUDA graphs as the decode step runs them. Chooses the kernel by
    measurement rather than by assumption."""
    import torch.nn.functional as F

    config = decoder.config
    blocks_per_seq = -(-(args.context + args.decode_steps + 8) // BLOCK_SIZE)
    layer = cache[0]
    rows = []
    for batch in batches:
        tables = torch.arange(batch * blocks_per_seq, dtype=torch.int32, device=DEVICE).view(batch, blocks_per_seq)
        seq_lens = torch.full((batch,), args.context, dtype=torch.long, device=DEVICE)
        q = torch.randn(batch, config.num_heads, config.head_dim, dtype=torch.bfloat16, device=DEVICE)
        splits = num_splits_for(batch, config.num_kv_heads, _num_sms())  # what the decode graphs use
        paged_ms = time_graph_ms(lambda: decoder.ops.paged_decode_attention(q, layer, tables, seq_lens,
                                                                              decoder.scale, splits))
        used = -(-args.context // BLOCK_SIZE)
        mask = (torch.arange(used * BLOCK_SIZE, device=DEVICE) < args.context)[None, None, None, :]
        repeats = config.num_heads // config.num_kv_heads

        def gather_sdpa():
            kv = layer[tables[:, :used].long()]  # [B, used, 2, block, Hkv, D]
            k = kv[:, :, 0].reshape(batch, -1, config.num_kv_heads, config.head_dim)
            v = kv[:, :, 1].reshape(batch, -1, config.num_kv_heads, config.head_dim)
            k = k.repeat_interleave(repeats, dim=2).transpose(1, 2)
            v = v.repeat_interleave(repeats, dim=2).transpose(1, 2)
            return F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask, scale=decoder.scale)

        gather_ms = time_graph_ms(gather_sdpa, calls_per_graph=2, repeats=5)
        kv_bytes = batch * args.context * 2 * config.num_kv_heads * config.head_dim * 2
        rows.append({"batch": batch, "splits": splits, "paged_us": paged_ms * 1e3, "gather_sdpa_us": gather_ms * 1e3,
                     "kv_bytes": kv_bytes, "paged_bytes_per_s": kv_bytes / (paged_ms / 1e3),
                     "paged_x_floor": paged_ms / (kv_bytes / bandwidth * 1e3)})
    return rows


def _num_sms() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count if DEVICE == "cuda" else 1


def prefill_flops(decoder: GpuDecoder, num_tokens: int) -> float:
    config = decoder.config
    matmuls = 2 * num_tokens * decoder.weights.matmul_params_per_token() + 2 * config.hidden_size * config.vocab_size
    attention = config.num_layers * 2 * num_tokens ** 2 * config.num_heads * config.head_dim
    return float(matmuls + attention)


def prefill_run(decoder: GpuDecoder, num_tokens: int, peak: float) -> dict:
    config = decoder.config
    num_blocks = -(-num_tokens // BLOCK_SIZE)
    cache = allocate_cache(config, num_blocks)
    table = [list(range(num_blocks))]
    ids = torch.randint(0, config.vocab_size, (num_tokens,), device=DEVICE)
    positions = torch.arange(num_tokens, device=DEVICE)
    ms = time_cuda_ms(lambda: decoder.prefill(ids, positions, [num_tokens], None, table, cache),
                      repeats=2 if num_tokens >= 16384 else 4, warmup=1)
    flops = prefill_flops(decoder, num_tokens)
    del cache
    return {"tokens": num_tokens, "ms": ms, "tokens_per_s": num_tokens / (ms / 1e3), "flops": flops,
            "tflop_per_s": flops / (ms / 1e3) / 1e12, "mfu": flops / (ms / 1e3) / peak,
            "attention_backend": decoder.prefill_attention_backend}


def hf_runs(name: str, hf_config: dict, decoder: GpuDecoder, args: argparse.Namespace, started: float) -> dict:
    from benchmarks._hf_timing import build_hf_model, hf_generate_timing

    results: dict = {"decode": [], "prefill": [], "skipped": []}
    model = build_hf_model(hf_config, checkpoint_views(decoder.config, decoder.weights), device=DEVICE)
    num_params = sum(p.numel() for p in model.parameters())
    vocab = decoder.config.vocab_size
    hf_generate_timing(model, batch=1, context=16, new_tokens=3, vocab=vocab)  # warm-up
    for batch in args.hf_decode_batches:
        if batch == 256 and num_params > 4e9:
            results["skipped"].append(f"decode batch {batch}: DynamicCache growth needs 2x the cache")
            continue
        if time.perf_counter() - started > args.time_budget_s:
            results["skipped"].append(f"decode batch {batch}: time budget")
            continue
        try:
            # Twice over the same shapes: the first pass meets every KV length for the first time (cuDNN SDPA
            # builds a plan per new shape, which dominates its decode step), the second reuses those plans.
            timing = hf_generate_timing(model, batch=batch, context=args.context,
                                        new_tokens=args.hf_new_tokens + 1, vocab=vocab)
            warm = hf_generate_timing(model, batch=batch, context=args.context,
                                      new_tokens=args.hf_new_tokens + 1, vocab=vocab)
        except Exception as error:  # e.g. out of memory: report it, keep the other runs
            results["skipped"].append(f"decode batch {batch}: {type(error).__name__}: {str(error)[:200]}")
            empty_cache()
            continue
        results["decode"].append({"batch": batch, **timing, "warm_tpot_ms": warm["tpot_ms"],
                                  "warm_ttft_ms": warm["ttft_ms"]})
        print(f"[{name}] transformers decode batch {batch}: {timing['tpot_ms']:.2f} ms/token new lengths, "
              f"{warm['tpot_ms']:.2f} warm", flush=True)
    for tokens in args.prefill_tokens:
        if time.perf_counter() - started > args.time_budget_s:
            results["skipped"].append(f"prefill {tokens}: time budget")
            continue
        try:
            timing = hf_generate_timing(model, batch=1, context=tokens, new_tokens=1, vocab=vocab)
            warm = hf_generate_timing(model, batch=1, context=tokens, new_tokens=1, vocab=vocab)
        except Exception as error:
            results["skipped"].append(f"prefill {tokens}: {type(error).__name__}: {str(error)[:200]}")
            empty_cache()
            continue
        results["prefill"].append({"tokens": tokens, "ms": timing["ttft_ms"], "warm_ms": warm["ttft_ms"]})
        print(f"[{name}] transformers prefill {tokens}: {timing['ttft_ms']:.1f} ms, {warm['ttft_ms']:.1f} warm",
              flush=True)
    del model
    return results


def bench_model(name: str, args: argparse.Namespace, ceilings: dict, started: float) -> dict:
    hf_config = model_config(name, args)
    config = ModelConfig.from_hf_dict(hf_config)
    build_start = time.perf_counter()
    decoder = GpuDecoder.from_tensors(config, random_tensors(hf_config, seed=0, device=DEVICE))
    synchronize()
    result: dict = {"model": name, "build_s": time.perf_counter() - build_start, "ops": decoder.ops.name,
                    "weight_bytes_per_step": decoder.weights.bytes_read_per_step(), "decode": [], "prefill": []}
    print(f"[{name}] weights on the GPU in {result['build_s']:.1f} s; ops {decoder.ops.name}", flush=True)
    blocks_per_seq = -(-(args.context + args.decode_steps + 8) // BLOCK_SIZE)
    cache = allocate_cache(config, max(args.decode_batches) * blocks_per_seq)
    for batch in args.decode_batches:
        run = decode_run(decoder, cache, batch, args, ceilings["copy"]["bytes_per_s"])
        result["decode"].append(run)
        print(f"[{name}] decode batch {batch}: {run['step_ms']:.3f} ms/step (graph {run['graph_replay_ms']:.3f}), "
              f"floor {run['floor_ms']:.3f} ms, x{run['x_floor']:.2f}", flush=True)
    try:
        result["attention_kernels"] = attention_kernels(decoder, cache, args.decode_batches, args,
                                                        ceilings["copy"]["bytes_per_s"])
    except Exception as error:
        result["attention_kernels"] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    del cache
    gc.collect()
    empty_cache()
    for tokens in args.prefill_tokens:
        run = prefill_run(decoder, tokens, ceilings["matmul"]["flop_per_s"])
        result["prefill"].append(run)
        print(f"[{name}] prefill {tokens}: {run['ms']:.1f} ms, MFU {run['mfu']:.1%} ({run['attention_backend']})",
              flush=True)
    gc.collect()
    empty_cache()
    if not args.no_hf:
        try:
            result["transformers"] = hf_runs(name, hf_config, decoder, args, started)
        except Exception as error:  # report, and keep the rest of the run
            result["transformers"] = {"error": f"{type(error).__name__}: {error}"}
            print(f"[{name}] transformers failed: {error}", flush=True)
    del decoder
    gc.collect()
    empty_cache()
    return result


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def empty_cache() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def tables(document: dict) -> None:
    decode_rows, prefill_rows = [], []
    for model in document["models"]:
        hf = model.get("transformers", {})
        hf_decode = {r["batch"]: r for r in hf.get("decode", [])}
        hf_prefill = {r["tokens"]: r for r in hf.get("prefill", [])}
        for run in model["decode"]:
            ref = hf_decode.get(run["batch"])
            cold = ref["tpot_ms"] if ref else math.nan
            warm = ref.get("warm_tpot_ms", math.nan) if ref else math.nan
            decode_rows.append([model["model"], run["batch"], run["step_ms"], run["graph_replay_ms"], run["floor_ms"],
                                run["x_floor"], run["tokens_per_s"], cold, warm, cold / run["step_ms"],
                                warm / run["step_ms"]])
        for run in model["prefill"]:
            ref = hf_prefill.get(run["tokens"])
            cold = ref["ms"] if ref else math.nan
            warm = ref.get("warm_ms", math.nan) if ref else math.nan
            prefill_rows.append([model["model"], run["tokens"], run["ms"], run["tokens_per_s"], run["tflop_per_s"],
                                 100 * run["mfu"], cold, warm, cold / run["ms"], warm / run["ms"]])
    attention_rows = [[model["model"], r["batch"], r["splits"], r["paged_us"], r["gather_sdpa_us"],
                       r["paged_bytes_per_s"] / 1e12, r["paged_x_floor"]]
                      for model in document["models"] for r in model.get("attention_kernels", [])
                      if isinstance(r, dict)]
    c = document["ceilings"]
    print(f"\nceilings: copy {c['copy']['bytes_per_s'] / 1e12:.2f} TB/s (read + write), bf16 matmul "
          f"{c['matmul']['size']}^3 "
          f"{c['matmul']['flop_per_s'] / 1e12:.0f} TFLOP/s; device {document['device']}")
    print_table(f"decode, {document['args']['context']} tokens of context per sequence (ms per step = per output "
                "token; HF: transformers generate, first pass over new KV lengths and warm repeat)",
                ["model", "batch", "ms/step", "graph ms", "floor ms", "x floor", "tok/s", "HF ms/tok", "HF warm",
                 "HF / ours", "HF warm / ours"], decode_rows)
    print_table("decode attention, one layer (Triton paged kernel vs gather + SDPA)",
                ["model", "batch", "splits", "paged us", "gather+sdpa us", "paged TB/s", "paged x floor"],
                attention_rows)
    gemv_rows, fused_rows, kernel_rows = [], [], []
    for model in document["models"]:
        for run in model["decode"]:
            variants = run.get("variants_ms") or {}
            if variants:
                fused_rows.append([model["model"], run["batch"]]
                                  + [variants.get(k, math.nan) for k in ("fused+pdl", "fused", "unfused+pdl",
                                                                          "unfused")]
                                  + [("fused" if run["is_fused"] else "unfused") + ("+pdl" if run["is_pdl"] else "")])
            for row in run.get("gemv") or []:
                gemv_rows.append([model["model"], run["batch"], row["projection"], f"{row['n']}x{row['k']}",
                                  row["cublas_us"], row["cublas_bytes_per_s"] / 1e12, row["plain_choice"],
                                  row["plain_best_us"], row["plain_bytes_per_s"] / 1e12, row.get("tile", "-"),
                                  row.get("us", math.nan)])
            kernels = run.get("kernels") or {}
            for kind, entry in sorted((kernels.get("kinds") or {}).items(), key=lambda item: -item[1]["us"]):
                kernel_rows.append([model["model"], run["batch"], kind, entry["launches"], entry["us"]])
            if "kinds" in kernels:
                label = "(replay - kernels; < 0: records overlap, PDL)" if run.get("is_pdl") else \
                    "(gaps: replay - kernels)"
                kernel_rows.append([model["model"], run["batch"], label, kernels["launches"], kernels["gaps_us"]])
    print_table("decode step replay by variant (ms, padded rows; pdl = programmatic dependent launch)",
                ["model", "batch", "fused+pdl", "fused", "unfused+pdl", "unfused", "kept"], fused_rows)
    print_table("decode projections, one call, us (unfused step: best of cuBLAS and Triton tiles on the bare "
                "product; fused step: best tile on the call with its norm/SiLU prologue and residual epilogue)",
                ["model", "batch", "proj", "N x K", "cublas us", "cublas TB/s", "unfused pick", "us", "TB/s",
                 "fused tile", "fused us"], gemv_rows)
    print_table("decode step by kernel kind (profiler, per step)", ["model", "batch", "kind", "launches", "us"],
                kernel_rows)
    print_table("prefill, one prompt", ["model", "tokens", "ms", "tok/s", "TFLOP/s", "MFU %", "HF ms", "HF warm",
                                        "HF / ours", "HF warm / ours"], prefill_rows)


def plot(document: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for model in document["models"]:
        left.plot([r["batch"] for r in model["decode"]], [r["x_floor"] for r in model["decode"]], "o-",
                  label=model["model"])
        right.plot([r["tokens"] for r in model["prefill"]], [100 * r["mfu"] for r in model["prefill"]], "o-",
                   label=model["model"])
    left.set(xscale="log", xlabel="batch", ylabel="decode step / memory floor", title="decode (lower is better)")
    right.set(xscale="log", xlabel="prompt tokens", ylabel="MFU %", title="prefill")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    global DEVICE
    args = parse_args()
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("engine_speed needs a CUDA GPU (or --device cpu for a dry run of the script)")
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if DEVICE == "cuda":
        ceilings = {"copy": copy_bandwidth(), "matmul": matmul_peak()}
        device_name = torch.cuda.get_device_name(0)
    else:
        ceilings = {"copy": copy_bandwidth(2 ** 24, "cpu"), "matmul": matmul_peak(256, "cpu")}
        device_name = "cpu (dry run)"
    document = {"command": command_line(), "machine": machine_info(), "device": device_name,
                "torch": torch.__version__, "args": vars(args), "ceilings": ceilings, "models": []}
    try:
        import transformers

        document["transformers"] = transformers.__version__
    except ImportError:
        document["transformers"] = None
        args.no_hf = True
    for name in args.models.split(","):
        try:
            document["models"].append(bench_model(name, args, ceilings, started))
        except Exception as error:  # keep the other model's figures; the error is in the JSON
            import traceback

            traceback.print_exc()
            document.setdefault("errors", {})[name] = f"{type(error).__name__}: {str(error)[:500]}"
            gc.collect()
            empty_cache()
        write_json(out / "engine_speed.json", document)  # keep what is done if a later model fails
    document["elapsed_s"] = time.perf_counter() - started
    write_json(out / "engine_speed.json", document)
    document["plot"] = plot(document, out / "engine_speed.png")
    tables(document)


if __name__ == "__main__":
    main()
