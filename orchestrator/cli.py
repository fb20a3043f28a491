"""The `pdcluster` command.

  pdcluster serve [CONFIG] [--port N]        run a cluster in the foreground (Ctrl-C stops it cleanly)
        [--openai PORT] [--metrics-port PORT]  with the OpenAI-compatible HTTP API / Prometheus /metrics
        [--keep-tiers]                         tiers outlive the router; a later serve re-attaches to them
  pdcluster demo [CONFIG]                    start the default cluster, stream a few requests, print figures, stop
  pdcluster generate --address H:P PROMPT    stream one completion from a running cluster
  pdcluster status --address H:P [--json]    tiers, replicas, load and free KV blocks
  pdcluster make-model DIR --preset NAME     write a model with seeded random weights in Hugging Face format
  pdcluster apply CONFIG --address H:P       change a running deployment to match the file (--dry-run: plan only)
  pdcluster launch CONFIG [--print]          start a Ray cluster for the file (ray up) and deploy on it
  pdcluster down CONFIG                      stop serving and take the launched cluster down
  pdcluster down CONFIG --tiers              only remove the tiers a --keep-tiers / detach_tiers serve left running
  pdcluster plan --preset NAME --gpu H200:8  choose each tier's mesh and replica count for latency targets
  pdcluster calibrate                        measure this machine's ceilings for the planner

Configuration problems print one line naming the key and exit with status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading

EXIT_CONFIG = 2


def load_config(path):
    from orchestrator.config import load_config as load

    return load(path)


def _load(path: str | None, port: int | None = None):
    config = load_config(path)
    if port is not None:
        if not 0 <= port <= 65535:
            from orchestrator.config import ConfigError

            raise ConfigError("router.port", f"--port {port} is not a TCP port (0-65535)")
        config = dataclasses.replace(config, router=dataclasses.replace(config.router, port=port))
    return config


def _with_endpoint(config, section: str, port: int | None, flag: str):
    """--openai / --metrics-port turn the gateway / metrics endpoint on at that port (host from the file)."""
    if port is None:
        return config
    if not 0 <= port <= 65535:
        from orchestrator.config import ConfigError

        raise ConfigError(f"{section}.port", f"{flag} {port} is not a TCP port (0-65535)")
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), port=port)})


def cmd_serve(args) -> int:
    from orchestrator.request_log import configure_logging
    from orchestrator.serve import RunningCluster

    config = _load(args.config, args.port)
    config = _with_endpoint(config, "gateway", args.openai, "--openai")
    config = _with_endpoint(config, "metrics", args.metrics_port, "--metrics-port")
    if args.keep_tiers:
        config = _keep_tiers(config)
    # --log-level or PDCLUSTER_LOG_LEVEL win over cluster.yaml's logging.level
    configure_logging(args.log_level or os.environ.get("PDCLUSTER_LOG_LEVEL") or config.logging.level)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    cluster = RunningCluster(config)
    try:
        cluster.start()
        for sig in (signal.SIGINT, signal.SIGTERM):  # again: ray.init (in start) installs its own SIGTERM handler
            signal.signal(sig, lambda *_: stop.set())
        print(f"pdcluster: serving; try `pdcluster generate --address {cluster.address} \"Hello\"`. "
              "Ctrl-C stops.", file=sys.stderr, flush=True)
        if config.router.detach_tiers:
            print("pdcluster: the tiers are detached: stopping this router leaves them running for the next "
                  f"`pdcluster serve` of this file; `pdcluster down {args.config or 'CONFIG'} --tiers` removes "
                  "them", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
        print("pdcluster: shutting down (finishing in-flight requests) ...", file=sys.stderr, flush=True)
    finally:
        cluster.stop()
    print("pdcluster: stopped", file=sys.stderr)
    return 0


def _keep_tiers(config):
    """--keep-tiers: router.detach_tiers on (validated as the file would be: it needs ray.address)."""
    from orchestrator.config import ConfigError

    if not config.ray.address:
        raise ConfigError("router.detach_tiers", "--keep-tiers needs a Ray cluster that outlives the router: set "
                          "ray.address (a local Ray instance started by `pdcluster serve` ends with it)")
    return dataclasses.replace(config, router=dataclasses.replace(config.router, detach_tiers=True))


def cmd_down(args) -> int:
    """`down CONFIG --tiers`: remove detached tiers (no router needed); else the launched cluster's ray down."""
    if not args.tiers:
        from orchestrator import cli_launch

        return cli_launch.run_down(args)
    from orchestrator.tier_attach import remove_detached

    remove_detached(load_config(args.config))
    return 0


def cmd_apply(args) -> int:
    import yaml

    from orchestrator.client import Client, PdclusterError

    load_config(args.config)  # validate here first: a bad file never reaches the cluster
    raw = yaml.safe_load(open(args.config).read()) or {}
    model = raw.get("model") or {}
    if isinstance(model.get("path"), str) and not os.path.isabs(os.path.expanduser(model["path"])):
        # the router resolves nothing relative to its own directory: send the path as this file means it
        model["path"] = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(args.config)), model["path"]))
    with Client(args.address) as client:
        try:
            for line in client.apply(yaml.safe_dump(raw, sort_keys=False), dry_run=args.dry_run,
                                     drain_timeout_s=args.drain_timeout):
                print(line, flush=True)
        except PdclusterError as exc:
            print(f"pdcluster: apply failed: {exc.message}", file=sys.stderr)
            return 1
    return 0


def cmd_make_model(args) -> int:
    from mesh.presets import PRESETS, make_model

    if args.preset not in PRESETS:
        print(f"pdcluster: unknown --preset {args.preset!r}; known: {', '.join(sorted(PRESETS))}", file=sys.stderr)
        return EXIT_CONFIG
    if os.path.exists(os.path.join(args.dir, "config.json")) and not args.force:
        print(f"pdcluster: {args.dir} already holds a model (config.json); pass --force to overwrite", file=sys.stderr)
        return EXIT_CONFIG
    print(f"pdcluster: writing {args.preset} (seed {args.seed}, {args.dtype}) to {args.dir} ...", file=sys.stderr,
          flush=True)
    import torch

    make_model(args.dir, preset=args.preset, seed=args.seed, dtype=getattr(torch, args.dtype))
    print(f"pdcluster: done: {args.dir}", file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    from orchestrator.demo import run_demo

    return run_demo(_load(args.config, args.port), num_requests=args.requests, max_tokens=args.max_tokens)


def build_parser() -> argparse.ArgumentParser:
    from orchestrator import cli_client

    parser = argparse.ArgumentParser(prog="pdcluster", description="Disaggregated prefill/decode LLM serving on Ray.")
    parser.add_argument("--log-level", default=None,
                        help="DEBUG, INFO, WARNING, ... (default: $PDCLUSTER_LOG_LEVEL, else logging.level of "
                             "cluster.yaml for serve, else WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a cluster in the foreground")
    serve.add_argument("config", nargs="?", help="cluster.yaml (default: the embedded one-machine CPU cluster)")
    serve.add_argument("--port", type=int, help="router port (overrides router.port)")
    serve.add_argument("--openai", type=int, metavar="PORT",
                       help="serve the OpenAI-compatible HTTP API on this port (overrides gateway.port)")
    serve.add_argument("--metrics-port", type=int, metavar="PORT",
                       help="serve Prometheus metrics on this port (overrides metrics.port)")
    serve.add_argument("--keep-tiers", action="store_true",
                       help="the tiers outlive this router (router.detach_tiers; needs ray.address): stopping it "
                            "leaves them running and a later serve of the same file re-attaches to them")
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="start a cluster, stream a few concurrent requests, print figures, stop")
    demo.add_argument("config", nargs="?", help="cluster.yaml (default: the embedded one)")
    demo.add_argument("--port", type=int, default=0, help="router port (default: any free port)")
    demo.add_argument("--requests", type=int, default=4)
    demo.add_argument("--max-tokens", type=int, default=32)
    demo.set_defaults(func=cmd_demo)

    gen = sub.add_parser("generate", help="stream one completion from a running cluster")
    cli_client.add_generate_args(gen)
    gen.set_defaults(func=cli_client.run_generate)

    status = sub.add_parser("status", help="show tiers, replicas, load and KV blocks")
    cli_client.add_status_args(status)
    status.set_defaults(func=cli_client.run_status)

    apply = sub.add_parser("apply", help="change a running deployment to match a cluster.yaml")
    apply.add_argument("config")
    apply.add_argument("--address", default="127.0.0.1:50051", help="router address HOST:PORT")
    apply.add_argument("--dry-run", action="store_true", help="print the plan only")
    apply.add_argument("--drain-timeout", type=float, default=0.0,
                       help="seconds to let a draining replica finish its requests (default 300)")
    apply.set_defaults(func=cmd_apply)

    make = sub.add_parser("make-model", help="write a Hugging Face model directory with seeded random weights")
    make.add_argument("dir")
    make.add_argument("--preset", default="tiny-llama")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    make.add_argument("--force", action="store_true")
    make.set_defaults(func=cmd_make_model)

    from orchestrator import cli_launch

    launch = sub.add_parser("launch", help="start a Ray cluster for a cluster.yaml (ray up) and deploy on it")
    cli_launch.add_launch_args(launch)
    launch.set_defaults(func=cli_launch.run_launch)
    down = sub.add_parser("down", help="stop serving and take a launched Ray cluster down (ray down)")
    cli_launch.add_down_args(down)
    down.add_argument("--tiers", action="store_true",
                      help="only remove the detached tiers of this file's cluster (left by serve --keep-tiers)")
    down.set_defaults(func=cmd_down)

    from orchestrator.planner.cli import add_subcommands as add_planner_subcommands

    add_planner_subcommands(sub)  # pdcluster plan, pdcluster calibrate
    return parser


def _deployment_error():
    from orchestrator.deploy import DeploymentError

    return DeploymentError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = args.log_level or os.environ.get("PDCLUSTER_LOG_LEVEL") or "WARNING"
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from orchestrator.config import ConfigError

    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"pdcluster: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except _deployment_error() as exc:
        print(f"pdcluster: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
