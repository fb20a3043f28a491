"""Router restart with the tiers surviving (router.detach_tiers: true).

`pdcluster serve` runs as its own process against this session's Ray (ray.address), so killing it is a real router
death. Its tiers are detached actors in the cluster's namespace: they keep running. A stream that was in flight
ends at once with UNAVAILABLE; a client with `retries=` keeps reconnecting until a new `pdcluster serve` of the same
cluster.yaml is up, and that router re-attaches to the running replicas (same processes, no new ones). Stopping a
detached router (SIGTERM, as Ctrl-C) leaves the tiers; `pdcluster down CONFIG --tiers` removes them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
import yaml

from e2e_helpers import hf_greedy, make_model_dir
from fault_helpers import BackgroundStream, wait_for
from orchestrator.client import Client, PdclusterError

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PROMPT = list(range(40, 72))
MAX_TOKENS = 40
REPLICA_TIMEOUT_S = 8.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _named_actors(namespace: str) -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == namespace}


def _pids(namespace: str, names: set[str]) -> dict[str, int]:
    import ray

    return {name: ray.get(ray.get_actor(name, namespace=namespace).__ray_call__.remote(lambda s: os.getpid()),
                          timeout=30) for name in names}


class _Serve:
    """`pdcluster serve CONFIG` in its own process; its console goes to a file the test reads."""

    def __init__(self, config_path: Path, log_path: Path):
        env = dict(os.environ, UCX_NET_DEVICES="lo", PDCLUSTER_KV_HOST="127.0.0.1",
                   PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
        env.pop("RAY_ADDRESS", None)  # the file names the cluster
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.process = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "serve", str(config_path)],
                                        env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=str(REPO))

    def wait_serving(self, timeout_s: float = 180) -> str:
        def serving():
            assert self.process.poll() is None, f"serve exited:\n{self.log_path.read_text()[-3000:]}"
            return "pdcluster: serving" in self.log_path.read_text()
        wait_for(serving, timeout_s, "pdcluster serve to be up")
        return self.log_path.read_text()

    def stop(self, sig=signal.SIGTERM, timeout_s: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout_s)
        self._log.close()
        return code


@pytest.fixture
def detached_config(ray_local, tmp_path_factory, tmp_path):
    import ray

    model_dir = make_model_dir(tmp_path_factory, "tiny-llama")
    namespace = f"pdcluster-faults-{uuid.uuid4().hex[:8]}"
    port = _free_port()
    tier = {"replicas": 1, "max_restarts": 2, "resources": {"num_cpus": 0.25}}
    raw = {
        "model": {"path": str(model_dir)},
        "router": {"port": port, "detach_tiers": True, "replica_timeout_s": REPLICA_TIMEOUT_S},
        "prefill": dict(tier),
        "decode": dict(tier, num_kv_blocks=64, block_size=8),
        "ray": {"address": ray.get_runtime_context().gcs_address, "namespace": namespace},
    }
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(raw))
    yield path, f"127.0.0.1:{port}", namespace, hf_greedy(model_dir, [PROMPT], MAX_TOKENS)[0]
    from orchestrator.cli import main

    main(["down", str(path), "--tiers"])  # nothing left behind even when the test failed half-way


def test_router_killed_tiers_survive_and_clients_reconnect(detached_config, tmp_path):
    from orchestrator.cli import main

    config_path, address, namespace, expected = detached_config
    first = _Serve(config_path, tmp_path / "serve1.log")
    first.wait_serving()
    names = _named_actors(namespace)
    assert len(names) == 3, names  # prefill-0, decode-0 and the registry
    pids = _pids(namespace, names)

    # a stream in flight when the router dies ends at once with UNAVAILABLE (no retry: tokens were received)
    in_flight = BackgroundStream(address, PROMPT, 400)
    assert in_flight.first_chunk.wait(60) and in_flight.error is None
    first.stop(signal.SIGKILL)
    in_flight.join(REPLICA_TIMEOUT_S + 20)
    assert isinstance(in_flight.error, PdclusterError), in_flight.error
    assert in_flight.error.code == grpc.StatusCode.UNAVAILABLE
    assert in_flight.elapsed_s < REPLICA_TIMEOUT_S + 20

    # no router now: a client without retries is refused at once ...
    with Client(address) as client, pytest.raises(PdclusterError) as refused:
        list(client.generate(token_ids=PROMPT, max_tokens=4))
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    # ... one with retries keeps reconnecting until the new router is up, then succeeds
    waiting = BackgroundStream(address, PROMPT, MAX_TOKENS, retries=60)
    time.sleep(1.0)
    second = _Serve(config_path, tmp_path / "serve2.log")
    console = second.wait_serving()
    assert "re-attached to 2 running replica(s)" in console, console[-2000:]
    waiting.join(120)
    assert waiting.error is None, waiting.error
    assert waiting.tokens == expected

    # the same replica processes serve: nothing was started again, nothing duplicated
    assert _named_actors(namespace) == names
    assert _pids(namespace, names) == pids
    with Client(address) as client:
        status = client.status()
        assert [r["id"] for r in status["prefill"]] == ["prefill-0"]
        assert [r["id"] for r in status["decode"]] == ["decode-0"]
        # the stream cut by the router's death left nothing behind on the decode replica
        wait_for(lambda: all(r["kv_blocks"]["num_free"] == r["kv_blocks"]["num_total"] and not r["load"]["num_running"]
                             for r in client.status()["decode"]), 60, "the decode pool to be full again")

    # SIGTERM (Ctrl-C) stops a detached router only; `pdcluster down --tiers` removes the tiers
    assert second.stop(signal.SIGTERM) == 0
    assert _named_actors(namespace) == names
    assert main(["down", str(config_path), "--tiers"]) == 0
    wait_for(lambda: not _named_actors(namespace), 30, "the detached tiers to be removed")
