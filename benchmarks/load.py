"""Load and resources: many concurrent streams, router overhead, memory over a soak, deadlines honoured.

Runs the embedded default cluster (one prefill and one decode replica on a local Ray, the gRPC router in this
process, exactly as `pdcluster serve` runs it) with only the capacity raised so that --streams streams fit at once
(router.max_inflight, decode.num_kv_blocks, decode.max_num_seqs; printed at start and kept in the JSON). The
clients run in a separate process (benchmarks/_load_client.py). Phases:

  1. streams:   --streams concurrent streams (short prompt, --max-tokens each); every one must complete; failures
                are counted by gRPC status code. Router overhead per request = the router's TTFT minus the prefill
                tier's own time for it (queue + forward + KV transfer, as the prefill replica measured them).
  2. deadlines: batches of long generations with a short gRPC deadline (--deadline-s); every one must end
                DEADLINE_EXCEEDED, and then the decode KV pool must be full again and both tiers idle.
  3. soak:      a steady closed-loop load (--soak-concurrency streams) for --soak-s while the RSS of the router
                process and of every replica process is sampled every --sample-s; start/end/max, the slope in MiB
                per minute over the whole soak and over its second half, and a verdict per process.

    python benchmarks/load.py                                  # 1000 streams, 10-minute soak
    python benchmarks/load.py --streams 1000 --soak-s 120      # shorter soak

Prints tables, writes --out/load.json (command line, machine, configuration, figures, checks) and exits 1 when a
check fails (a failed stream, a deadline not honoured, a pool left short, a process whose memory keeps growing).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import math
import multiprocessing
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable (benchmarks, orchestrator, ...)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _load_figures as figures
from benchmarks._actor_probe import ActorProbe
from benchmarks._load_client import StreamSpec, run_closed_loop, run_streams
from benchmarks._processes import CpuMeter, MemorySampler, rss_source
from benchmarks._report import Progress, command_line, machine_info, write_json

DEFAULT_PROMPT = "load stream {i:05d}: hello there"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000, help="concurrent streams in phase 1")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per stream (phase 1 and the soak)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt template; {i} is the stream's index")
    parser.add_argument("--stream-timeout-s", type=float, default=900.0,
                        help="client deadline of each phase-1 / soak stream (a stream past it counts as failed)")
    parser.add_argument("--max-num-seqs", type=int, default=None,
                        help="decode.max_num_seqs (default: --streams, so every stream decodes in every step)")
    parser.add_argument("--idle-s", type=float, default=5.0,
                        help="seconds of no traffic over which each process's idle CPU use is measured")
    parser.add_argument("--baseline-requests", type=int, default=20,
                        help="requests sent one at a time first: the router overhead on an idle cluster")
    parser.add_argument("--soak-s", type=float, default=600.0, help="soak duration (0 skips the soak)")
    parser.add_argument("--soak-concurrency", type=int, default=16, help="streams kept in flight during the soak")
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between memory samples")
    parser.add_argument("--growth-limit-mib-per-min", type=float, default=1.0,
                        help="a process whose RSS slope stays above this is GROWING")
    parser.add_argument("--deadline-requests", type=int, default=16, help="requests per deadline batch")
    parser.add_argument("--deadline-s", default="0.05,1.0",
                        help="comma-separated client deadlines, one batch each (short: cut during reserve/prefill; "
                             "longer: cut mid-decode)")
    parser.add_argument("--deadline-max-tokens", type=int, default=900,
                        help="max_tokens of the deadline requests (long enough to outlive every deadline)")
    parser.add_argument("--drain-timeout-s", type=float, default=10.0,
                        help="how long the tiers may take to be idle with full KV pools after a phase; shorter than "
                             "kv_transfer.lease_s, so a reservation freed only by its lease expiring fails the check")
    parser.add_argument("--progress-s", type=float, default=5.0, help="seconds between progress lines")
    parser.add_argument("--out", default="out/benchmarks", help="folder for load.json")
    args = parser.parse_args(argv)
    args.deadlines_s = [float(d) for d in args.deadline_s.split(",") if d.strip()]
    for name in ("streams", "max_tokens", "baseline_requests", "soak_concurrency", "deadline_requests", "deadline_max_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.soak_s < 0 or args.idle_s < 0 or args.sample_s <= 0 or any(d <= 0 for d in args.deadlines_s):
        parser.error("--soak-s and --idle-s must be >= 0, --sample-s and every --deadline-s > 0")
    return args


def benchmark_config(args):
    """The embedded default with the router on a free port and capacity for --streams streams at once.
    Returns (config, sizing) where sizing says what was raised and why."""
    from mesh.tokenizer import load_tokenizer
    from orchestrator.config import load_config
    from orchestrator.deploy import ensure_model

    default = load_config()
    ensure_model(default, out=sys.stderr)
    tokenizer = load_tokenizer(default.model.path)
    num_prompts = max(args.streams, args.deadline_requests, args.soak_concurrency)
    prompt_tokens = max(len(tokenizer.encode(args.prompt.format(i=i))) for i in range(num_prompts))
    block_size = default.decode.block_size

    def blocks(max_tokens: int) -> int:
        return math.ceil((prompt_tokens + max_tokens) / block_size)  # what one reservation takes (engine.py)

    needed = {"streams": args.streams * blocks(args.max_tokens),
              "deadlines": args.deadline_requests * blocks(args.deadline_max_tokens),
              "soak": args.soak_concurrency * blocks(args.max_tokens)}
    num_kv_blocks = max(default.decode.num_kv_blocks, math.ceil(max(needed.values()) * 1.25))
    max_inflight = max(default.router.max_inflight, args.streams + args.soak_concurrency)
    max_num_seqs = args.max_num_seqs or max(default.decode.max_num_seqs, args.streams)
    config = dataclasses.replace(
        default,
        router=dataclasses.replace(default.router, port=0, max_inflight=max_inflight),
        decode=dataclasses.replace(default.decode, num_kv_blocks=num_kv_blocks, max_num_seqs=max_num_seqs),
    )
    sizing = {
        "prompt_tokens_max": prompt_tokens,
        "kv_blocks_needed": needed,
        "changed_from_default": {
            "router.port": [default.router.port, 0],
            "router.max_inflight": [default.router.max_inflight, max_inflight],
            "decode.num_kv_blocks": [default.decode.num_kv_blocks, num_kv_blocks],
            "decode.max_num_seqs": [default.decode.max_num_seqs, max_num_seqs],
        },
        "unchanged": {"prefill.max_batch_seqs": default.prefill.max_batch_seqs,
                      "prefill.max_batch_tokens": default.prefill.max_batch_tokens,
                      "router.replica_timeout_s": default.router.replica_timeout_s,
                      "kv_transfer.lease_s": default.kv_transfer.lease_s,
                      "decode.block_size": block_size,
                      "resources_per_rank": {"prefill": default.prefill.resources, "decode": default.decode.resources}},
    }
    return config, sizing


def replica_pids(cluster) -> dict[str, int]:
    """{label: pid} of every rank of every replica (rank 0 is the replica itself)."""
    import ray

    pids = {}
    for tier in ("prefill", "decode"):
        for handle in cluster.deployment.replicas(tier):
            for rank, actor in enumerate([handle.actor, *handle.workers]):
                label = handle.replica_id + (f"-rank{rank}" if rank else "")
                pids[label] = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
    return pids


def ray_daemon_pids() -> dict[str, int]:
    """Ray's own raylet and GCS server of the local instance, when this Ray exposes them (private API: shown for
    information, an empty dict otherwise)."""
    try:
        import ray

        processes = ray._private.worker._global_node.all_processes
        return {f"ray {kind}": info.process.pid for kind in ("raylet", "gcs_server")
                for info in processes.get(kind, [])[:1]}
    except Exception:
        return {}


def wait_until_idle(cluster, timeout_s: float) -> dict:
    """Polls status until every decode pool is full and no replica has queued, running or waiting work.
    Returns {"is_idle", "seconds", "replicas": [the last status of each replica, trimmed]}."""
    started = time.monotonic()
    while True:
        replicas = trimmed_status(cluster)
        is_idle = all(r["num_queued"] == 0 and r["num_running"] == 0 and r["kv_free"] == r["kv_total"]
                      for r in replicas)
        elapsed = time.monotonic() - started
        if is_idle or elapsed >= timeout_s:
            return {"is_idle": is_idle, "seconds": elapsed, "replicas": replicas}
        time.sleep(0.2)


def trimmed_status(cluster) -> list[dict]:
    status = cluster.status()
    return [{"id": r["id"], "state": r["state"], **r["load"], "kv_free": r["kv_blocks"]["num_free"],
             "kv_total": r["kv_blocks"]["num_total"], "failures": r.get("failures", 0),
             "restarts": r.get("restarts", 0)} for tier in ("prefill", "decode") for r in status[tier]]


def run_soak(cluster, clients, spec: StreamSpec, args, memory_pids: dict[str, int]):
    sampler = MemorySampler(memory_pids)
    sampler.sample()
    progress = Progress("soak memory", every_s=max(30.0, args.progress_s))
    future = clients.submit(run_closed_loop, cluster.address, spec, concurrency=args.soak_concurrency,
                            duration_s=args.soak_s, timeout_s=args.stream_timeout_s,
                            progress_every_s=max(15.0, args.progress_s))
    while not future.done():
        concurrent.futures.wait([future], timeout=args.sample_s)
        point = sampler.sample()
        progress.maybe("RSS MiB: " + ", ".join(f"{label} {value:.0f}" for label, value in point.items()))
    return future.result(), sampler


def run_phases(cluster, clients, args, document: dict) -> list[str]:
    """Every phase against the running cluster; fills `document`. Returns the labels of the processes whose
    memory the verdict covers (the router and the replicas)."""
    stream_spec = StreamSpec(prompt_template=args.prompt, max_tokens=args.max_tokens)
    deadline_spec = StreamSpec(prompt_template=args.prompt, max_tokens=args.deadline_max_tokens)
    address = cluster.address
    client_pid = clients.submit(os.getpid).result()
    replicas = replica_pids(cluster)
    daemons = ray_daemon_pids()
    memory_pids = {"router": os.getpid(), **replicas}
    # CPU: the router's process (it is also the Ray driver) and its event-loop thread on their own, so a saturated
    # router loop shows even when the process has other busy threads (gRPC, Ray's core worker).
    cpu_targets = {"router process": (os.getpid(), None), "router loop thread": (os.getpid(), cluster._thread.native_id),
                   "load generator (client)": (client_pid, None),
                   **{label: (pid, None) for label, pid in {**replicas, **daemons}.items()}}
    document["processes"] = {"router": os.getpid(), "client": client_pid, **replicas, **daemons}
    print(f"load: cluster at {address}; processes {document['processes']}", file=sys.stderr, flush=True)
    document["memory_mib"] = {"at_start": MemorySampler({**memory_pids, **daemons}).sample()}
    document["cpu"] = {}

    warm = clients.submit(run_streams, address, stream_spec, 4, timeout_s=120.0, phase="warm-up").result()
    document["warm_up_codes"] = figures.code_counts(r["code"] for r in warm["results"])

    if args.idle_s > 0:  # what the processes burn with no request at all (polling threads, health checks)
        meter = CpuMeter(cpu_targets).start()
        time.sleep(args.idle_s)
        document["cpu"]["idle"] = meter.stop()

    print(f"load: baseline: {args.baseline_requests} requests one at a time", file=sys.stderr, flush=True)
    actors = {h.replica_id: h.actor for tier in ("prefill", "decode") for h in cluster.deployment.replicas(tier)}
    document["replica_answer_ms"] = {}
    meter = CpuMeter(cpu_targets).start()
    with ActorProbe(actors) as probe:
        baseline = clients.submit(run_closed_loop, address, stream_spec, concurrency=1,
                                  num_requests=args.baseline_requests, timeout_s=120.0, phase="baseline").result()
    document["cpu"]["baseline"] = meter.stop()
    document["replica_answer_ms"]["baseline"] = probe.summary()
    document["baseline"] = figures.phase_figures(baseline)

    print(f"load: phase 1: {args.streams} concurrent streams", file=sys.stderr, flush=True)
    document["load_average_before_streams"] = os.getloadavg()
    meter = CpuMeter(cpu_targets).start()
    with ActorProbe(actors) as probe:
        streams = clients.submit(run_streams, address, stream_spec, args.streams, timeout_s=args.stream_timeout_s,
                                 progress_every_s=args.progress_s).result()
    document["cpu"]["streams"] = meter.stop()
    document["replica_answer_ms"]["streams"] = probe.summary()
    document["memory_mib"]["after_streams"] = MemorySampler({**memory_pids, **daemons}).sample()
    document["streams"] = figures.phase_figures(streams, num_expected=args.streams)
    document["streams"]["idle_after"] = wait_until_idle(cluster, args.drain_timeout_s)

    document["deadlines"] = []
    lease_s = cluster.config.kv_transfer.lease_s
    for deadline_s in args.deadlines_s:
        # Each batch starts from a full pool, so what it leaves behind is its own: a reservation that only its
        # lease frees (a leak the previous batch's check reported) is waited out here, and the wait is recorded.
        idle_before = wait_until_idle(cluster, lease_s + args.drain_timeout_s)
        print(f"load: phase 2: {args.deadline_requests} streams of {args.deadline_max_tokens} tokens with a "
              f"{deadline_s:g} s deadline", file=sys.stderr, flush=True)
        batch = clients.submit(run_streams, address, deadline_spec, args.deadline_requests, timeout_s=deadline_s,
                               progress_every_s=args.progress_s, phase=f"deadline {deadline_s:g}s").result()
        document["deadlines"].append({**figures.deadline_figures(batch, deadline_s,
                                                                 wait_until_idle(cluster, args.drain_timeout_s)),
                                      "idle_before": idle_before})
    if document["deadlines"]:  # each batch's leftovers (if any) are gone by the next batch's start, or by this
        waits = [batch["idle_before"] for batch in document["deadlines"][1:]]
        waits.append(wait_until_idle(cluster, lease_s + args.drain_timeout_s))
        for batch, wait in zip(document["deadlines"], waits):
            batch["idle_eventually"] = wait

    if args.soak_s > 0:
        print(f"load: phase 3: soak for {args.soak_s:.0f} s at {args.soak_concurrency} concurrent streams, "
              f"RSS every {args.sample_s:g} s", file=sys.stderr, flush=True)
        meter = CpuMeter(cpu_targets).start()
        with ActorProbe(actors) as probe:
            soak, sampler = run_soak(cluster, clients, stream_spec, args, {**memory_pids, **daemons})
        document["cpu"]["soak"] = meter.stop()
        document["replica_answer_ms"]["soak"] = probe.summary()
        document["soak"] = {**figures.phase_figures(soak), "growth_limit_mib_per_min": args.growth_limit_mib_per_min,
                            "memory": sampler.summary(args.growth_limit_mib_per_min),
                            "memory_series": sampler.series(),
                            "idle_after": wait_until_idle(cluster, args.drain_timeout_s)}
    document["final_replicas"] = trimmed_status(cluster)
    document["load_average_at_end"] = os.getloadavg()
    return list(memory_pids)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config, sizing = benchmark_config(args)
    for key, (before, after) in sizing["changed_from_default"].items():
        print(f"load: {key}: {before} -> {after}", file=sys.stderr)
    print(f"load: longest prompt {sizing['prompt_tokens_max']} tokens; KV blocks needed per phase "
          f"{sizing['kv_blocks_needed']}", file=sys.stderr, flush=True)
    if args.drain_timeout_s >= config.kv_transfer.lease_s:
        print(f"load: --drain-timeout-s must be under kv_transfer.lease_s ({config.kv_transfer.lease_s:g} s), or a "
              "reservation that only its lease frees would pass the checks", file=sys.stderr)
        return 2
    if config.ray.address is None:
        # A fresh local Ray, never another session's: with no address, ray.init() joins the newest cluster it
        # finds on this machine (and then refuses the num_cpus the deployment passes).
        os.environ["RAY_ADDRESS"] = "local"
    from orchestrator.serve import RunningCluster

    document = {"benchmark": "load", "command": command_line(), "args": vars(args), "rss_source": rss_source(),
                "sizing": sizing, "load_average_at_start": os.getloadavg()}
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no Ray or torch state from this one
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as clients, RunningCluster(config) as cluster:
        document["machine"] = machine_info()
        memory_labels = run_phases(cluster, clients, args, document)
    document["checks"] = figures.checks(document, memory_labels)
    figures.print_tables(document)
    path = write_json(Path(args.out) / "load.json", document)
    failed = [name for name, check in document["checks"].items() if not check["passed"]]
    print(f"\nload: wrote {path}; " + (f"FAILED checks: {', '.join(failed)}" if failed else "all checks passed"),
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
