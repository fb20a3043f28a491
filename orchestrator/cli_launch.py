"""`pdcluster launch` and `pdcluster down`: start a Ray cluster for a cluster.yaml with `ray up`, deploy on it, and
take it down again.

orchestrator/cli.py wires these in: `add_launch_args(parser)` + `run_launch(args)`, `add_down_args(parser)` +
`run_down(args)`. Configuration problems raise `ConfigError` (cli.py prints them, exit 2); a Ray command that fails
returns 1 after saying which step failed. Ray's own CLI does the work (`ray up`, `ray exec`, `ray down`), run as
`python -m ray.scripts.scripts` of this Python so its Ray version is the one that validated the config.

  pdcluster launch CONFIG [--print | --output FILE]   derive Ray's config (and only print / write it)
  pdcluster launch CONFIG [--no-deploy] [--restart]   ray up, wait for the worker nodes, start pdcluster serve
  pdcluster down CONFIG                               stop pdcluster serve (in-flight requests finish), ray down

Deploying: `pdcluster serve ~/pdcluster/files/cluster.yaml` runs on the head in its own session (setsid + nohup, so it
outlives the `ray exec` ssh connection; no screen or tmux needed on the image), its output in ~/pdcluster/serve.log
and its pid in ~/pdcluster/serve.pid. `launch` returns once the router accepts connections on router.port.
Launching again with an edited file updates the nodes (`ray up --no-restart`: Ray and the deployment keep
running) and leaves the deployment as it is: change it with `pdcluster apply`.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence

from orchestrator.config import ClusterConfig, load_config
from orchestrator.launch import (REMOTE_CONFIG, REMOTE_DIR, REMOTE_SERVE_LOG, REMOTE_SERVE_PID, LaunchError,
                                 dump_ray_config, head_driver_env, launch_files, python_ray_cli, required_nodes,
                                 validate_ray_config, write_launch_files)

Runner = Callable[[Sequence[str]], int]  # runs a command with the terminal's stdio, returns its exit status


def _run(argv: Sequence[str]) -> int:
    return subprocess.run(list(argv), check=False).returncode


def add_launch_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="cluster.yaml with a launch: section")
    parser.add_argument("--print", action="store_true", dest="print_only",
                        help="write the derived Ray cluster config to stdout and stop (for running `ray up` yourself)")
    parser.add_argument("--output", metavar="FILE", help="write the derived Ray cluster config to FILE and stop")
    parser.add_argument("--no-deploy", action="store_true", help="start the Ray cluster only (no pdcluster serve)")
    parser.add_argument("--restart", action="store_true",
                        help="restart Ray on an existing head (stops a running deployment); default: keep it running")
    parser.add_argument("--state-dir", help="where the derived files go (default ~/.pdcluster/launch/CLUSTER_NAME)")
    parser.add_argument("--wait-timeout", type=float, default=1800.0,
                        help="seconds to wait for the worker nodes, and again for the router (default 1800)")


def add_down_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="the cluster.yaml the cluster was launched from")
    parser.add_argument("--state-dir", help="as given to `pdcluster launch`")


def wait_nodes_command(config: ClusterConfig, timeout_s: float) -> str:
    need, num_nodes = required_nodes(config)
    needs = "".join(f" --need {shlex.quote(f'{name}={count}')}" for name, count in sorted(need.items()))
    return (f"{head_driver_env(config.launch)} python -m orchestrator.launch_wait --nodes {num_nodes}{needs} "
            f"--timeout {timeout_s:.0f}")


def serve_command(config: ClusterConfig, timeout_s: float) -> str:
    """Start `pdcluster serve` on the head unless it already runs, then wait until the router's port accepts
    connections (bash's /dev/tcp: nothing else needed on the node); on failure, print the log's tail."""
    host = config.router.host if config.router.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    port = config.router.port
    pid = f'"$(cat {REMOTE_SERVE_PID})"'
    serve = f"exec pdcluster serve {REMOTE_CONFIG}"
    tries = max(1, int(timeout_s))
    return (
        f"mkdir -p {REMOTE_DIR}; "
        f"if [ -f {REMOTE_SERVE_PID} ] && kill -0 {pid} 2>/dev/null; then "
        f"echo \"pdcluster: already serving (pid $(cat {REMOTE_SERVE_PID})); change it with pdcluster apply\"; "
        f"exit 0; fi; "
        f"rm -f {REMOTE_SERVE_PID}; "
        f"{head_driver_env(config.launch)} nohup setsid sh -c {shlex.quote(f'echo $$ > {REMOTE_SERVE_PID}; {serve}')}"
        f" > {REMOTE_SERVE_LOG} 2>&1 < /dev/null & "
        f"for i in $(seq 1 {tries}); do "
        f"if (exec 3<>/dev/tcp/{host}/{port}) 2>/dev/null; then "
        f"echo 'pdcluster: router is up on port {port}'; exit 0; fi; "
        f"if [ -f {REMOTE_SERVE_PID} ] && ! kill -0 {pid} 2>/dev/null; then "
        f"echo 'pdcluster serve exited:'; tail -n 40 {REMOTE_SERVE_LOG}; exit 1; fi; "
        f"sleep 1; done; "
        f"echo 'pdcluster: the router did not open port {port} in {timeout_s:.0f} s:'; "
        f"tail -n 40 {REMOTE_SERVE_LOG}; exit 1"
    )


def stop_serve_command(grace_s: int = 60) -> str:
    """SIGTERM: `pdcluster serve` stops taking requests, lets in-flight ones finish, tears the tiers down."""
    pid = f'"$(cat {REMOTE_SERVE_PID})"'
    return (f"if [ -f {REMOTE_SERVE_PID} ] && kill -TERM {pid} 2>/dev/null; then "
            f"for i in $(seq 1 {grace_s}); do kill -0 {pid} 2>/dev/null || break; sleep 1; done; "
            f"echo 'pdcluster: serve stopped'; fi; rm -f {REMOTE_SERVE_PID}; true")


def _prepare(args) -> tuple[ClusterConfig, object, dict]:
    config = load_config(args.config)
    files = launch_files(config, args.state_dir)
    ray_config = write_launch_files(args.config, config, files)
    return config, files, ray_config


def run_launch(args: argparse.Namespace, *, runner: Runner = _run, out=None, err=None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    config, files, ray_config = _prepare(args)
    try:
        validate_ray_config(ray_config)
    except LaunchError as exc:
        print(f"pdcluster launch: {exc}", file=err)
        return 2
    if args.print_only or args.output:
        text = dump_ray_config(ray_config)
        if args.output:
            with open(args.output, "w") as f:
                f.write(text)
            print(f"pdcluster launch: wrote {args.output} (it mounts files kept in {files.state_dir})", file=err)
        if args.print_only:
            out.write(text)
        return 0
    ray = [*python_ray_cli()]
    cluster_file = str(files.ray_config)
    steps = [("ray up", [*ray, "up", "-y", cluster_file, *([] if args.restart else ["--no-restart"])])]
    if not args.no_deploy:
        steps += [("waiting for the worker nodes", [*ray, "exec", cluster_file,
                                                    wait_nodes_command(config, args.wait_timeout)]),
                  ("starting pdcluster serve on the head", [*ray, "exec", cluster_file,
                                                            serve_command(config, args.wait_timeout)])]
    for what, argv in steps:
        print(f"pdcluster launch: {what} ...", file=err, flush=True)
        code = runner(argv)
        if code != 0:
            print(f"pdcluster launch: {what} failed (exit status {code}); the derived config is {cluster_file}",
                  file=err)
            return 1
    port = config.router.port
    attach = shlex.join(["ray", "attach", cluster_file, "--port-forward", str(port)])
    print(f"pdcluster launch: done. Reach the router through ssh: `{attach}`, then "
          f"`pdcluster status --address 127.0.0.1:{port}`; serve's log: "
          f"`ray exec {cluster_file} 'tail -f {REMOTE_SERVE_LOG}'`", file=err)
    return 0


def run_down(args: argparse.Namespace, *, runner: Runner = _run, err=None) -> int:
    err = err or sys.stderr
    _, files, _ = _prepare(args)
    cluster_file = str(files.ray_config)
    ray = python_ray_cli()
    print("pdcluster down: stopping pdcluster serve on the head ...", file=err, flush=True)
    if runner([*ray, "exec", cluster_file, stop_serve_command()]) != 0:  # the head may be gone already
        print("pdcluster down: could not reach pdcluster serve on the head; taking the cluster down anyway", file=err)
    code = runner([*ray, "down", "-y", cluster_file])
    if code != 0:
        print(f"pdcluster down: ray down failed (exit status {code}); the derived config is {cluster_file}", file=err)
        return 1
    return 0
