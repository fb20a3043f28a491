"""Wait on a launched head until the worker nodes that the tiers need have joined the Ray cluster.

Who calls it: `pdcluster launch` (orchestrator/cli_launch.py) through `ray exec`, before it starts `pdcluster
serve` on the head: `ray up` returns once the head is up, and the autoscaler starts the workers (min_workers) only
then, which takes minutes on a cloud; deploying earlier would hit the placement timeout.

    python -m orchestrator.launch_wait --need accelerator_type:H100=2 --nodes 3 --timeout 1800

Exit status 0 once the cluster has at least `--nodes` alive nodes and, for each `--need NAME=N`, N alive nodes
that offer resource NAME; 1 on timeout (what is still missing is printed).
"""

from __future__ import annotations

import argparse
import sys
import time


def missing_nodes(nodes: list[dict], need: dict[str, int], min_nodes: int) -> list[str]:
    """What the cluster still lacks; `nodes` as `ray.nodes()` returns them. Empty once everything is there."""
    alive = [n for n in nodes if n.get("Alive")]
    missing = []
    if len(alive) < min_nodes:
        missing.append(f"{min_nodes - len(alive)} of {min_nodes} nodes")
    for name, count in sorted(need.items()):
        have = sum(1 for n in alive if n.get("Resources", {}).get(name, 0) > 0)
        if have < count:
            missing.append(f"{count - have} of {count} nodes with {name}")
    return missing


def _need(text: str) -> tuple[str, int]:
    name, sep, count = text.rpartition("=")
    if not sep or not name or not count.isdigit():
        raise argparse.ArgumentTypeError(f"expected RESOURCE=COUNT, e.g. accelerator_type:H100=2; got {text!r}")
    return name, int(count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.launch_wait")
    parser.add_argument("--need", type=_need, action="append", default=[], metavar="RESOURCE=COUNT")
    parser.add_argument("--nodes", type=int, default=1, help="alive nodes in all, the head included")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--address", default="auto")
    args = parser.parse_args(argv)

    import ray

    ray.init(address=args.address, log_to_driver=False, configure_logging=False)
    need = dict(args.need)
    deadline = time.monotonic() + args.timeout
    last_report = 0.0
    try:
        while True:
            missing = missing_nodes(ray.nodes(), need, args.nodes)
            if not missing:
                print("pdcluster: all nodes are up", flush=True)
                return 0
            now = time.monotonic()
            if now > deadline:
                print(f"pdcluster: gave up after {args.timeout:.0f} s; still missing: {'; '.join(missing)} "
                      "(see `ray status` and the autoscaler log, /tmp/ray/session_latest/logs/monitor.*)", flush=True)
                return 1
            if now - last_report >= 30:
                print(f"pdcluster: waiting for nodes: {'; '.join(missing)}", flush=True)
                last_report = now
            time.sleep(5)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
