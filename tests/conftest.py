"""Shared fixtures. `ray_local`: one real local Ray instance for the whole test session (tests that need Ray
share it instead of starting and stopping their own)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests run on one machine: UCX uses loopback (and shared memory) only; processes started by tests inherit this.
os.environ.setdefault("UCX_NET_DEVICES", "lo")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        root = str(Path(__file__).resolve().parent.parent)  # actors import the packages from this checkout
        # address="local": always a fresh instance of our own, never a Ray cluster something else left running.
        ray.init(address="local", num_cpus=8, include_dashboard=False, configure_logging=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": root, "PDCLUSTER_KV_HOST": "127.0.0.1",
                                                  "UCX_NET_DEVICES": "lo"}})
    yield ray
    ray.shutdown()
