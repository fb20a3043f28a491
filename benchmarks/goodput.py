"""Goodput: the highest Poisson request rate at which a cluster still serves >= 90% of requests within both latency
targets (TTFT and TPOT), for one or more cluster.yaml files, and the ratio between them.

Each --config is started as `pdcluster serve` would start it (orchestrator.serve.RunningCluster, router on a free
port, in this process) and driven by an open-loop client in a separate process (benchmarks/_goodput_client.py):
requests arrive with exponential gaps at the rate under test, with input and output lengths drawn from a
distribution (chat-like default: inputs around 1024 tokens, outputs around 256, lognormal), random prompt tokens,
exactly max_tokens generated (ignore_eos). Rates are swept in the given order until one misses the attainment
target, then bisected between the best passing and the lowest failing rate. Every configuration sees the same
requests (same seed).

    python benchmarks/goodput.py                                           # the embedded default, chat lengths
    python benchmarks/goodput.py --config disagg.yaml --config colocated.yaml --rates 1,2,4,8
    python benchmarks/goodput.py --input-len 64 --output-len 16 --ttft-slo-ms 1000 --tpot-slo-ms 100 --rates 1,2,4

Prints a table per configuration and the goodput ratio of the first to each other one, writes --out (JSON: the
command, machine, SLO, workload, every rate's figures) and the PNG of attainment against rate beside it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import multiprocessing
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable (benchmarks, orchestrator, ...)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._goodput_client import run_open_loop
from benchmarks._goodput_report import Slo, format_table, goodput_rate, next_rate, plot, rate_summary
from benchmarks._goodput_workload import DISTRIBUTIONS, LengthDistribution, make_workload
from benchmarks._report import command_line, machine_info, write_json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", default=[], metavar="CLUSTER_YAML",
                        help="a cluster.yaml to measure (repeat for several; default: the embedded default)")
    parser.add_argument("--name", action="append", default=[],
                        help="label of each --config in the same order (default: the file's stem)")
    parser.add_argument("--rates", default="0.5,1,2,4,8", help="comma-separated rates (req/s) to sweep, ascending")
    parser.add_argument("--bisect-steps", type=int, default=2,
                        help="rates measured between the best passing and the lowest failing one")
    parser.add_argument("--duration-s", type=float, default=30.0, help="arrivals span this long at each rate")
    parser.add_argument("--min-requests", type=int, default=20, help="at least this many requests per rate")
    parser.add_argument("--max-requests", type=int, default=2000, help="at most this many requests per rate")
    parser.add_argument("--warmup-requests", type=int, default=4, help="sent one by one before the sweep")
    parser.add_argument("--input-len", type=int, default=1024, help="mean prompt tokens")
    parser.add_argument("--output-len", type=int, default=256, help="mean generated tokens")
    parser.add_argument("--length-dist", choices=DISTRIBUTIONS, default="lognormal",
                        help="distribution of both lengths around their means")
    parser.add_argument("--sigma", type=float, default=0.4, help="lognormal: sigma of the log-length")
    parser.add_argument("--spread", type=float, default=0.5, help="uniform: mean x [1 - spread, 1 + spread]")
    parser.add_argument("--ttft-slo-ms", type=float, default=1000.0)
    parser.add_argument("--tpot-slo-ms", type=float, default=25.0)
    parser.add_argument("--attainment", type=float, default=0.9, help="share of requests that must meet both")
    parser.add_argument("--request-timeout-s", type=float, default=300.0, help="client deadline of one request")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="stop sweeping a configuration once its share of this budget is spent (what was "
                             "measured is still reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--title", default="", help="title of the PNG")
    parser.add_argument("--out", default="out/benchmarks/goodput.json", help="JSON path; the PNG goes beside it")
    parser.add_argument("--plot-only", action="store_true",
                        help="draw the PNG of an existing --out JSON and print its tables; run nothing")
    args = parser.parse_args(argv)
    try:
        args.rate_list = sorted(float(r) for r in args.rates.split(",") if r.strip())
    except ValueError:
        parser.error(f"--rates must be numbers separated by commas, got {args.rates!r}")
    if not args.rate_list or any(r <= 0 for r in args.rate_list):
        parser.error("--rates needs at least one rate, every one > 0")
    if args.name and len(args.name) != len(args.config):
        parser.error(f"--name given {len(args.name)} time(s) for {len(args.config)} --config")
    for name in ("input_len", "output_len", "min_requests", "max_requests"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.duration_s <= 0 or args.bisect_steps < 0 or args.warmup_requests < 0:
        parser.error("--duration-s must be > 0, --bisect-steps and --warmup-requests >= 0")
    return args


def _load(path: str | None):
    from orchestrator.config import load_config

    config = load_config(path)
    return dataclasses.replace(config, router=dataclasses.replace(config.router, port=0))


def _lengths(args, max_context: int) -> tuple[LengthDistribution, LengthDistribution]:
    """Both distributions, clipped so that the longest prompt plus the longest output fits the context."""
    shape = dict(kind=args.length_dist, sigma=args.sigma, spread=args.spread)
    max_output = min(max_context // 4, max(args.output_len * 4, args.output_len + 1))
    outputs = LengthDistribution(mean=min(args.output_len, max_output), maximum=max_output, **shape)
    max_input = max_context - max_output
    if max_input < 1:
        raise SystemExit(f"the model's context ({max_context} tokens) leaves no room for prompts")
    inputs = LengthDistribution(mean=min(args.input_len, max_input), maximum=max_input, **shape)
    return inputs, outputs


def _config_summary(config) -> dict:
    def tier(t):
        return {"replicas": t.replicas, "mesh": dataclasses.asdict(t.mesh), "resources": t.resources,
                **{k: getattr(t, k) for k in ("max_batch_tokens", "max_batch_seqs", "max_num_seqs", "num_kv_blocks")},
                **{k: getattr(t, k) for k in ("mode", "local_prefill_tokens", "max_step_tokens") if hasattr(t, k)}}

    return {"model": config.model.name, "dtype": config.model.dtype, "router_policy": config.router.policy,
            "kv_transfer": config.kv_transfer.backend, "prefill": tier(config.prefill), "decode": tier(config.decode),
            **({"mode": config.mode} if hasattr(config, "mode") else {})}


def measure_config(args, path: str | None, name: str, slo: Slo, pool, budget_s: float | None) -> dict:
    """Start the cluster of `path`, sweep and bisect the rates, stop it. Returns its JSON section."""
    from mesh.config import ModelConfig
    from orchestrator.deploy import ensure_model
    from orchestrator.serve import RunningCluster

    config = _load(path)
    ensure_model(config, out=sys.stderr)
    model = ModelConfig.from_dir(config.model.path)
    inputs, outputs = _lengths(args, model.max_position_embeddings)
    section = {"name": name, "path": path or "(embedded default)", "config": _config_summary(config),
               "workload": {"inputs": dataclasses.asdict(inputs), "outputs": dataclasses.asdict(outputs)},
               "rates": []}
    started = time.monotonic()
    print(f"== {name}: starting {section['path']}", file=sys.stderr, flush=True)
    with RunningCluster(config) as cluster:
        section["start_s"] = round(time.monotonic() - started, 1)
        if args.warmup_requests:
            warm = make_workload(rate_rps=1.0, num_requests=args.warmup_requests, inputs=inputs, outputs=outputs,
                                 vocab_size=model.vocab_size, seed=args.seed + 1)
            for p in warm:  # one at a time: compiles, caches and graphs are built before the timed rates
                pool.submit(run_open_loop, cluster.address, [(p.index, 0.0, p.token_ids, p.max_tokens)],
                            timeout_s=args.request_timeout_s).result()
        bisect_left = args.bisect_steps
        while True:
            rate = next_rate(section["rates"], args.rate_list, bisect_steps_left=bisect_left)
            if rate is None:
                break
            if any(not r["meets_slo"] for r in section["rates"]):
                bisect_left -= 1
            if budget_s is not None and time.monotonic() - started > budget_s:
                section["budget_exhausted_before_rate"] = rate
                print(f"   time budget spent; {rate:g} req/s not measured", file=sys.stderr, flush=True)
                break
            num = max(args.min_requests, min(args.max_requests, round(rate * args.duration_s)))
            workload = make_workload(rate_rps=rate, num_requests=num, inputs=inputs, outputs=outputs,
                                     vocab_size=model.vocab_size, seed=args.seed)
            run = pool.submit(run_open_loop, cluster.address,
                              [(p.index, p.arrival_s, p.token_ids, p.max_tokens) for p in workload],
                              timeout_s=args.request_timeout_s).result()
            row = rate_summary(rate, run, slo)
            section["rates"].append(row)
            print(f"   {rate:g} req/s: {num} requests, attainment {row['attainment']:.0%}, TTFT p90 "
                  f"{row['ttft_ms_p90']:.0f} ms, TPOT p90 {row['tpot_ms_p90']:.1f} ms, {row['num_failed']} failed",
                  file=sys.stderr, flush=True)
    section["goodput_rps"] = goodput_rate(section["rates"])
    section["wall_s"] = round(time.monotonic() - started, 1)
    return section


def report(data: dict, out: Path) -> None:
    slo = Slo(**data["slo"])
    for config in data["configs"]:
        print(format_table(config["name"], config["rates"], slo))
        print()
    first = data["configs"][0]
    for other in data["configs"][1:]:
        ratio = first["goodput_rps"] / other["goodput_rps"] if other["goodput_rps"] else float("inf")
        print(f"goodput ratio {first['name']} / {other['name']}: {first['goodput_rps']:g} / "
              f"{other['goodput_rps']:g} req/s = {ratio:.2f}x")
    try:
        plot(data, out.with_suffix(".png"))
        print(f"wrote {out} and {out.with_suffix('.png')}")
    except ImportError:
        print(f"wrote {out}; no PNG: matplotlib is missing (pip install \"pdcluster[bench]\", then --plot-only)")


def main(argv: list[str] | None = None) -> int:
    import json

    args = parse_args(argv)
    out = Path(args.out)
    if args.plot_only:
        report(json.loads(out.read_text()), out)
        return 0
    slo = Slo(ttft_ms=args.ttft_slo_ms, tpot_ms=args.tpot_slo_ms, attainment=args.attainment)
    paths = args.config or [None]
    names = args.name or [Path(p).stem if p else "default" for p in paths]
    started = time.monotonic()
    data = {"command": command_line(), "machine": machine_info(), "slo": dataclasses.asdict(slo),
            "title": args.title or f"goodput, {args.input_len}/{args.output_len} tokens in/out",
            "sweep": {"rates": args.rate_list, "bisect_steps": args.bisect_steps, "duration_s": args.duration_s,
                      "min_requests": args.min_requests, "seed": args.seed},
            "configs": []}
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no Ray or router state in the clients
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        for index, (path, name) in enumerate(zip(paths, names)):
            budget = None
            if args.time_budget_s is not None:  # what is left, shared by the configurations still to run
                budget = (args.time_budget_s - (time.monotonic() - started)) / (len(paths) - index)
            data["configs"].append(measure_config(args, path, name, slo, pool, budget))
            out.parent.mkdir(parents=True, exist_ok=True)
            write_json(out, data)  # after every configuration: a later failure keeps what was measured
    if len(paths) > 1:
        first = data["configs"][0]["goodput_rps"]
        data["ratios"] = {f"{data['configs'][0]['name']}/{c['name']}": (first / c["goodput_rps"]
                                                                         if c["goodput_rps"] else None)
                          for c in data["configs"][1:]}
    write_json(out, data)
    report(data, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
