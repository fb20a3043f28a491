"""`pdcluster launch` / `down`: the Ray commands they run, in order, and the shell they run on the nodes.

Ray's CLI is replaced by a recording runner; the remote shell snippets (start `pdcluster serve` detached, wait for
its port, stop it; pick a local worker's resources by address) run for real in bash against stand-in programs."""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

from orchestrator import cli_launch
from orchestrator.config import load_config, parse_config
from orchestrator.launch import python_ray_cli, start_commands
from orchestrator.launch_wait import missing_nodes


def _cluster_yaml(tmp_path, *, port: int = 50051, provider: dict | None = None, node_types: dict | None = None) -> str:
    raw = {
        "model": {"path": "/models/llama"},
        "router": {"port": port},
        "prefill": {"replicas": 1, "resources": {"num_gpus": 1, "accelerator_type": "H100"}},
        "decode": {"replicas": 2, "mesh": {"tp": 4}, "resources": {"num_gpus": 1, "accelerator_type": "H100"}},
        "launch": {"provider": provider or {"type": "aws", "region": "us-west-2"}, "auth": {"ssh_user": "ubuntu"},
                   "head_node": {} if provider else {"node_config": {"InstanceType": "m5.large"}},
                   "node_types": node_types or {"H100": {"node_config": {"InstanceType": "p5.48xlarge"},
                                                         "gpus_per_node": 8}}},
    }
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _args(add, argv):
    parser = argparse.ArgumentParser()
    add(parser)
    return parser.parse_args(argv)


class Recorder:
    def __init__(self, fail_at: int | None = None):
        self.calls: list[list[str]] = []
        self.fail_at = fail_at

    def __call__(self, argv):
        self.calls.append(list(argv))
        return 3 if len(self.calls) == self.fail_at else 0


RAY = python_ray_cli()


def test_launch_runs_ray_up_then_waits_for_nodes_then_serves(tmp_path):
    path = _cluster_yaml(tmp_path)
    state = tmp_path / "state"
    runner, err = Recorder(), io.StringIO()
    code = cli_launch.run_launch(_args(cli_launch.add_launch_args, [path, "--state-dir", str(state)]),
                                 runner=runner, err=err)
    assert code == 0
    cluster_file = str(state / "ray-cluster.yaml")
    up, wait, serve = runner.calls
    assert up == [*RAY, "up", "-y", cluster_file, "--no-restart"]  # a running deployment survives a re-launch
    assert wait[:-1] == [*RAY, "exec", cluster_file]
    # 1 prefill rank + 2 decode replicas x 4 ranks = 9 GPUs -> 2 H100 nodes, plus the head
    assert "python -m orchestrator.launch_wait --nodes 3 --need accelerator_type:H100=2 --timeout 1800" in wait[-1]
    assert serve[:-1] == [*RAY, "exec", cluster_file] and "pdcluster serve ~/pdcluster/files/cluster.yaml" in serve[-1]
    assert "--port-forward 50051" in err.getvalue()


def test_launch_flags_and_a_failing_step(tmp_path):
    path = _cluster_yaml(tmp_path)
    state = ["--state-dir", str(tmp_path / "state")]
    runner = Recorder()
    assert cli_launch.run_launch(_args(cli_launch.add_launch_args, [path, *state, "--no-deploy", "--restart"]),
                                 runner=runner, err=io.StringIO()) == 0
    assert runner.calls == [[*RAY, "up", "-y", str(tmp_path / "state" / "ray-cluster.yaml")]]

    runner, err = Recorder(fail_at=2), io.StringIO()
    assert cli_launch.run_launch(_args(cli_launch.add_launch_args, [path, *state]), runner=runner, err=err) == 1
    assert len(runner.calls) == 2  # serve is never started when the nodes did not come up
    assert "waiting for the worker nodes failed (exit status 3)" in err.getvalue()


def test_print_and_output_write_the_derived_config_and_run_nothing(tmp_path):
    path = _cluster_yaml(tmp_path)
    runner, out, err = Recorder(), io.StringIO(), io.StringIO()
    args = _args(cli_launch.add_launch_args, [path, "--print", "--output", str(tmp_path / "ray.yaml"),
                                              "--state-dir", str(tmp_path / "state")])
    assert cli_launch.run_launch(args, runner=runner, out=out, err=err) == 0
    assert runner.calls == []
    printed = yaml.safe_load(out.getvalue())
    assert printed == yaml.safe_load((tmp_path / "ray.yaml").read_text())
    assert printed == yaml.safe_load((tmp_path / "state" / "ray-cluster.yaml").read_text())
    assert printed["available_node_types"]["worker-H100"]["min_workers"] == 2


def test_down_stops_serving_then_takes_the_cluster_down(tmp_path):
    path = _cluster_yaml(tmp_path)
    runner, err = Recorder(fail_at=1), io.StringIO()  # the head is already gone: down goes on
    code = cli_launch.run_down(_args(cli_launch.add_down_args, [path, "--state-dir", str(tmp_path / "s")]),
                               runner=runner, err=err)
    assert code == 0
    stop, down = runner.calls
    assert stop[:-1] == [*RAY, "exec", str(tmp_path / "s" / "ray-cluster.yaml")] and "kill -TERM" in stop[-1]
    assert down == [*RAY, "down", "-y", str(tmp_path / "s" / "ray-cluster.yaml")]
    assert "taking the cluster down anyway" in err.getvalue()


def test_missing_nodes_counts_alive_nodes_per_resource():
    nodes = [{"Alive": True, "Resources": {"CPU": 8}},
             {"Alive": True, "Resources": {"GPU": 8, "accelerator_type:H100": 1}},
             {"Alive": False, "Resources": {"GPU": 8, "accelerator_type:H100": 1}}]
    assert missing_nodes(nodes, {"accelerator_type:H100": 1}, 2) == []
    assert missing_nodes(nodes, {"accelerator_type:H100": 2, "accelerator_type:A100": 1}, 4) == [
        "2 of 4 nodes", "1 of 1 nodes with accelerator_type:A100", "1 of 2 nodes with accelerator_type:H100"]


# ------------------------------------------------------------------------------------- the shell on the nodes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stand_in(bin_dir, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(0o755)


def _bash(command: str, home, bin_dir, **env) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, HOME=str(home), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env)
    return subprocess.run(["bash", "-c", command], env=full_env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def node(tmp_path):
    """A stand-in head: its own HOME, and a `pdcluster` that listens on FAKE_PORT (or fails when FAKE_FAIL)."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    _stand_in(bin_dir, "pdcluster", """
        import os, socket, sys, time
        print("args", sys.argv[1:], "auth", os.environ.get("RAY_AUTH_MODE"), "ray", os.environ.get("RAY_ADDRESS"),
              flush=True)
        if os.environ.get("FAKE_FAIL"):
            sys.exit("pdcluster: cluster.yaml: decode.mesh.tp: 3 does not divide 8 heads")
        server = socket.socket()
        server.bind(("127.0.0.1", int(os.environ["FAKE_PORT"])))
        server.listen()
        time.sleep(120)
    """)
    yield home, bin_dir
    pid_file = home / "pdcluster" / "serve.pid"
    if pid_file.exists():  # the stand-in this test started, if a failed assertion left it running
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as gone: it has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_serve_starts_detached_reports_the_port_and_stops(node, tmp_path):
    home, bin_dir = node
    port = _free_port()
    config = load_config(_cluster_yaml(tmp_path, port=port))
    started = _bash(cli_launch.serve_command(config, timeout_s=30), home, bin_dir, FAKE_PORT=str(port))
    assert started.returncode == 0, started.stdout + started.stderr
    assert f"router is up on port {port}" in started.stdout
    pid = int((home / "pdcluster" / "serve.pid").read_text())
    assert _alive(pid)  # outlived the shell that started it, as it must outlive `ray exec`'s ssh session
    log = (home / "pdcluster" / "serve.log").read_text()
    cluster_yaml = str(home / "pdcluster" / "files" / "cluster.yaml")
    assert f"args ['serve', '{cluster_yaml}'] auth token ray 127.0.0.1:6379" in log  # the head's own Ray, by address

    again = _bash(cli_launch.serve_command(config, timeout_s=30), home, bin_dir, FAKE_PORT=str(port))
    assert again.returncode == 0 and "already serving" in again.stdout

    stopped = _bash(cli_launch.stop_serve_command(grace_s=10), home, bin_dir)
    assert stopped.returncode == 0 and "serve stopped" in stopped.stdout
    assert not (home / "pdcluster" / "serve.pid").exists()
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)


def test_serve_that_exits_reports_its_log(node, tmp_path):
    home, bin_dir = node
    config = load_config(_cluster_yaml(tmp_path, port=_free_port()))
    failed = _bash(cli_launch.serve_command(config, timeout_s=30), home, bin_dir, FAKE_FAIL="1", FAKE_PORT="1")
    assert failed.returncode == 1
    assert "pdcluster serve exited:" in failed.stdout and "decode.mesh.tp: 3 does not divide 8 heads" in failed.stdout


def test_local_worker_start_picks_its_resources_by_address(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stand_in(bin_dir, "hostname", """
        import sys
        print("10.0.0.7 172.17.0.1" if sys.argv[1:] == ["-I"] else "gpu-node-7")
    """)
    _stand_in(bin_dir, "ray", """
        import json, os, sys
        print(json.dumps({"args": sys.argv[1:], "auth": os.environ.get("RAY_AUTH_MODE")}))
    """)
    raw = yaml.safe_load(open(_cluster_yaml(tmp_path, provider={"type": "local", "head_ip": "10.0.0.1"},
                                            node_types={"H100": {"worker_ips": ["10.0.0.6", "10.0.0.7"],
                                                                 "gpus_per_node": 8},
                                                        "A100": {"worker_ips": ["gpu-node-9"]}})))
    launch = parse_config(raw).launch
    _, worker = start_commands(launch)
    done = _bash(worker[1], tmp_path, bin_dir, RAY_HEAD_IP="10.0.0.1")
    assert done.returncode == 0, done.stderr
    started = json.loads(done.stdout.strip().splitlines()[-1])
    assert started == {"args": ["start", "--address=10.0.0.1:6379", "--num-gpus=8",
                                '--resources={"accelerator_type:H100":1}'], "auth": "token"}
