"""Multi-turn chat: prefix-aware prefill routing against least-loaded, on one running cluster.

N conversations run at once; each has K turns, one after the other, and turn k's prompt is turn k-1's prompt, the
answer the cluster gave, and --user-tokens new user tokens (the first turn: --first-tokens). The cluster runs
--prefill-replicas prefill replicas with the prefix cache on (prefill.prefix_cache.max_tokens = --cache-tokens) and
one decode replica. The same workload (fresh random tokens, so nothing is cached from the run before) is run once per
policy in --policies, switching the router's prefill policy in place (`ClusterBackend.use_policy`): the replicas,
their caches and the decode tier are the same; only where follow-up turns go differs.

Figures per policy: TTFT p50/p90 (measured by the client, from sending the request to its first token) over all
turns and over follow-up turns only, the fraction of prompt tokens taken from the prefix cache (the final message's
usage.cached_prompt_tokens), how many follow-ups went to the prefill replica of the turn before, and the
least-loaded / prefix-aware TTFT ratio.

    python benchmarks/multiturn.py                                   # CPU, the tiny default model
    python benchmarks/multiturn.py --conversations 16 --turns 6
    python benchmarks/multiturn.py --preset llama-3-8b --dtype bfloat16 --gpus-per-replica 1 --ray-address auto
    python benchmarks/multiturn.py --preset llama-3-8b --num-layers 8 --dtype bfloat16 --gpus-per-replica 0.5 \
        --ray-address auto --first-tokens 2048 --user-tokens 128 --max-tokens 32   # 8B layer shape, 8 layers

Prints the table and writes --out/multiturn.json (command line, machine, configuration, per-request records).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable (benchmarks, orchestrator, ...)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import command_line, machine_info, print_table, summarize, write_json

POLICIES = ("prefix-aware", "least-loaded")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=8, help="conversations running at once")
    parser.add_argument("--turns", type=int, default=4, help="turns per conversation")
    parser.add_argument("--first-tokens", type=int, default=384, help="prompt tokens of a conversation's first turn")
    parser.add_argument("--user-tokens", type=int, default=48, help="new user tokens each later turn adds")
    parser.add_argument("--max-tokens", type=int, default=16, help="answer tokens per turn (ignore_eos)")
    parser.add_argument("--prefill-replicas", type=int, default=2)
    parser.add_argument("--cache-tokens", type=int, default=65536, help="prefill.prefix_cache.max_tokens per replica")
    parser.add_argument("--block-size", type=int, default=16, help="prefill.prefix_cache.block_size")
    parser.add_argument("--max-imbalance", type=int, default=4, help="prefill.prefix_routing.max_imbalance")
    parser.add_argument("--policies", default=",".join(POLICIES), help="prefill policies to run, in this order")
    parser.add_argument("--config", default=None, help="cluster.yaml to start from (default: the embedded one)")
    parser.add_argument("--preset", default=None,
                        help="model preset (random weights, written under --out) instead of the config's model")
    parser.add_argument("--model-dir", default=None,
                        help="an HF-format model directory to serve instead of the config's (e.g. one written by "
                             "`python -m benchmarks._goodput_gpu make-model DIR`)")
    parser.add_argument("--dtype", default=None, help="model.dtype override (float32, bfloat16)")
    parser.add_argument("--num-layers", type=int, default=None,
                        help="with --preset: keep the preset's layer shape but only this many layers (a bounded run)")
    parser.add_argument("--gpus-per-replica", type=float, default=0.0,
                        help="> 0: every rank of both tiers asks Ray for this many GPUs (a GPU cluster)")
    parser.add_argument("--ray-address", default=None, help="ray.address (default: the config's; local Ray)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--request-timeout-s", type=float, default=300.0)
    parser.add_argument("--out", default="out/benchmarks", help="folder for multiturn.json")
    args = parser.parse_args(argv)
    args.policy_list = [p.strip() for p in args.policies.split(",") if p.strip()]
    for name in ("conversations", "turns", "first_tokens", "user_tokens", "max_tokens", "prefill_replicas",
                 "cache_tokens", "block_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.policy_list:
        parser.error("--policies names no policy")
    return args


def benchmark_config(args):
    """The cluster: --config (or the embedded default) with the prefill tier, prefix cache and model from args."""
    from orchestrator.config import load_config

    config = load_config(args.config)
    model = config.model
    if args.preset:
        name = args.preset + (f"-{args.num_layers}layers" if args.num_layers else "")
        model = dataclasses.replace(model, path=str(Path(args.out).resolve() / "models" / name),
                                    preset=args.preset, name=name)
    if args.model_dir:
        path = Path(args.model_dir).resolve()
        model = dataclasses.replace(model, path=str(path), preset=None, name=path.name)
    if args.dtype:
        model = dataclasses.replace(model, dtype=args.dtype)
    prefill, decode = config.prefill, config.decode
    if args.gpus_per_replica > 0:
        gpu = {"num_cpus": 1.0, "num_gpus": args.gpus_per_replica}
        prefill = dataclasses.replace(prefill, resources=gpu)
        decode = dataclasses.replace(decode, resources=gpu)
    longest = args.first_tokens + (args.turns - 1) * (args.max_tokens + args.user_tokens) + args.max_tokens
    blocks_per_conversation = -(-longest // decode.block_size)
    # A fixed pool (also on a GPU, which may be shared with a prefill replica): room for every conversation, twice.
    decode = dataclasses.replace(decode, num_kv_blocks=max(decode.num_kv_blocks or 0,
                                                           2 * args.conversations * blocks_per_conversation))
    prefill = dataclasses.replace(
        prefill, replicas=args.prefill_replicas, policy=args.policy_list[0],
        prefix_cache=dataclasses.replace(prefill.prefix_cache, max_tokens=args.cache_tokens,
                                         block_size=args.block_size),
        prefix_routing=dataclasses.replace(prefill.prefix_routing, max_imbalance=args.max_imbalance))
    ray_section = config.ray if args.ray_address is None else dataclasses.replace(config.ray, address=args.ray_address)
    config = dataclasses.replace(config, model=model, prefill=prefill, decode=decode, ray=ray_section,
                                 router=dataclasses.replace(config.router, port=0))
    return config, longest


def run_turn(stub, prompt: list[int], args) -> dict:
    """One request over the raw gRPC API (its final usage carries cached_prompt_tokens); TTFT seen by the client."""
    from protos import generation_pb2

    request = generation_pb2.GenerateRequest(token_ids=prompt, sampling=generation_pb2.SamplingOptions(
        max_tokens=args.max_tokens, ignore_eos=True))
    started = time.perf_counter()
    ttft_s, tokens, last = None, [], None
    for response in stub.Generate(request, timeout=args.request_timeout_s):
        if ttft_s is None and response.token_ids:
            ttft_s = time.perf_counter() - started
        tokens.extend(response.token_ids)
        last = response
    return {"ttft_s": ttft_s, "e2e_s": time.perf_counter() - started, "answer": tokens,
            "prompt_tokens": len(prompt), "cached_tokens": last.usage.cached_prompt_tokens,
            "prefill_replica": last.prefill_replica, "server_ttft_ms": last.timings.ttft_ms,
            "prefill_ms": last.timings.prefill_ms}


def run_policy(address: str, policy: str, args, vocab_size: int, seed: int) -> list[dict]:
    """Every conversation in its own thread, its turns one after the other. Returns one record per request."""
    import grpc

    from protos import generation_pb2_grpc

    records: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(args.conversations)

    def conversation(index: int) -> None:
        rng = random.Random(seed * 1_000_003 + index)
        draw = lambda n: [rng.randrange(3, min(vocab_size, 256)) for _ in range(n)]  # noqa: E731
        prompt = draw(args.first_tokens)
        previous_replica = None
        try:
            with grpc.insecure_channel(address) as channel:
                stub = generation_pb2_grpc.GenerationStub(channel)
                barrier.wait()
                for turn in range(args.turns):
                    record = run_turn(stub, prompt, args)
                    record.update(policy=policy, conversation=index, turn=turn,
                                  same_replica=record["prefill_replica"] == previous_replica)
                    previous_replica = record["prefill_replica"]
                    with lock:
                        records.append(record)
                    prompt = prompt + record.pop("answer") + draw(args.user_tokens)
        except Exception as exc:  # counted and printed; the figures say how many requests completed
            with lock:
                errors.append(f"conversation {index}: {exc!r}")

    threads = [threading.Thread(target=conversation, args=(i,)) for i in range(args.conversations)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for error in errors:
        print(f"multiturn: {policy}: {error}", file=sys.stderr)
    return records


def figures(records: list[dict], num_expected: int) -> dict:
    follow_ups = [r for r in records if r["turn"] > 0]
    prompt_tokens = sum(r["prompt_tokens"] for r in records)
    return {
        "num_requests": len(records),
        "num_failed": num_expected - len(records),
        "ttft_s": summarize([r["ttft_s"] for r in records if r["ttft_s"] is not None]),
        "ttft_follow_up_s": summarize([r["ttft_s"] for r in follow_ups if r["ttft_s"] is not None]),
        "prefill_ms": summarize([r["prefill_ms"] for r in records]),
        "cached_tokens_fraction": sum(r["cached_tokens"] for r in records) / max(1, prompt_tokens),
        "follow_ups_same_replica": sum(r["same_replica"] for r in follow_ups) / max(1, len(follow_ups)),
        "prompt_tokens": prompt_tokens,
    }


def print_figures(by_policy: dict[str, dict], ratio: dict) -> None:
    rows = []
    for policy, f in by_policy.items():
        rows.append([policy, f["num_requests"], f["num_failed"], f["ttft_s"]["p50"] * 1e3, f["ttft_s"]["p90"] * 1e3,
                     f["ttft_follow_up_s"]["p50"] * 1e3, f["ttft_follow_up_s"]["p90"] * 1e3,
                     f["prefill_ms"]["p50"], f["cached_tokens_fraction"], f["follow_ups_same_replica"]])
    print_table("multi-turn chat: prefill routing policies (TTFT measured by the client)",
                ["policy", "requests", "failed", "TTFT p50 ms", "TTFT p90 ms", "follow-up p50 ms", "follow-up p90 ms",
                 "prefill p50 ms", "cached fraction", "same replica"], rows)
    if ratio:
        print_table("TTFT ratio least-loaded / prefix-aware (> 1: prefix-aware is faster)",
                    ["turns", "p50", "p90"], [["all", ratio["all_p50"], ratio["all_p90"]],
                                              ["follow-ups", ratio["follow_up_p50"], ratio["follow_up_p90"]]])


def ttft_ratio(by_policy: dict[str, dict]) -> dict:
    if not all(p in by_policy for p in POLICIES):
        return {}
    base, prefix = by_policy["least-loaded"], by_policy["prefix-aware"]
    return {"all_p50": base["ttft_s"]["p50"] / prefix["ttft_s"]["p50"],
            "all_p90": base["ttft_s"]["p90"] / prefix["ttft_s"]["p90"],
            "follow_up_p50": base["ttft_follow_up_s"]["p50"] / prefix["ttft_follow_up_s"]["p50"],
            "follow_up_p90": base["ttft_follow_up_s"]["p90"] / prefix["ttft_follow_up_s"]["p90"]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config, longest = benchmark_config(args)
    from mesh.config import ModelConfig
    from orchestrator.deploy import ensure_model

    if args.preset and args.num_layers and not (Path(config.model.path) / "config.json").exists():
        import torch

        from mesh.presets import make_model

        make_model(config.model.path, args.preset, seed=0, dtype=getattr(torch, config.model.dtype),
                   overrides={"num_hidden_layers": args.num_layers})
    ensure_model(config, out=sys.stderr)
    model_config = ModelConfig.from_dir(config.model.path)
    if longest > model_config.max_position_embeddings:
        print(f"multiturn: the last turn has {longest} tokens, more than the model's context "
              f"({model_config.max_position_embeddings}); lower --turns, --first-tokens or --user-tokens",
              file=sys.stderr)
        return 2
    if config.ray.address is None:
        os.environ["RAY_ADDRESS"] = "local"  # a fresh local Ray, never another session's (as benchmarks/load.py)
    from orchestrator.serve import RunningCluster

    num_expected = args.conversations * args.turns
    document = {"benchmark": "multiturn", "command": command_line(), "args": {k: v for k, v in vars(args).items()},
                "model": {"path_name": Path(config.model.path).name, "dtype": config.model.dtype},
                "longest_prompt_tokens": longest, "policies": {}, "records": []}
    with RunningCluster(config) as cluster:
        document["machine"] = machine_info()
        # Warm-up (not measured): every replica has run a forward and every connection is made.
        warm = argparse.Namespace(**{**vars(args), "turns": 1, "conversations": 2 * args.prefill_replicas})
        run_policy(cluster.address, "warm-up", warm, model_config.vocab_size, seed=10_000)
        for index, policy in enumerate(args.policy_list):
            cluster.backend.use_policy("prefill", policy)
            print(f"multiturn: {policy}: {args.conversations} conversations x {args.turns} turns", file=sys.stderr,
                  flush=True)
            started = time.perf_counter()
            records = run_policy(cluster.address, policy, args, model_config.vocab_size, seed=args.seed + index + 1)
            document["policies"][policy] = {**figures(records, num_expected),
                                            "wall_s": time.perf_counter() - started}
            document["records"] += records
        document["replica_stats"] = {h.replica_id: _stats(h) for h in cluster.deployment.replicas("prefill")}
    document["ttft_ratio_least_loaded_over_prefix_aware"] = ttft_ratio(document["policies"])
    print_figures(document["policies"], document["ttft_ratio_least_loaded_over_prefix_aware"])
    path = write_json(Path(args.out) / "multiturn.json", document)
    print(f"\nmultiturn: wrote {path}", flush=True)
    return 1 if any(f["num_failed"] for f in document["policies"].values()) else 0


def _stats(handle) -> dict:
    import ray

    stats = ray.get(handle.actor.get_stats.remote(), timeout=30)
    return {k: v for k, v in stats.items() if k.startswith("prefix_cache_") or k in ("num_batches",)}


if __name__ == "__main__":
    sys.exit(main())
