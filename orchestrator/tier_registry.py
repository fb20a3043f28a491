"""What a router needs to re-attach to tiers that outlived it (`router.detach_tiers: true`).

Who calls it: orchestrator/deploy.py only. With detached tiers every rank actor and placement group is created with
Ray's `lifetime="detached"` in the namespace `tier_namespace(config)`, and one small detached actor of this module,
the registry, remembers the deployment: the KV-transfer token the replicas were started with (a replica added later
must present the same one) and, per replica, its tier section, its placement group and the names of its rank
actors. A new router (`pdcluster serve` with the same cluster.yaml, after the old one died or was stopped with its
tiers kept) reads the registry and takes those replicas back instead of starting new ones.

The registry keeps only what cannot be read back from Ray itself; it is never on the request path.
"""

from __future__ import annotations

import re

REGISTRY_NAME = "pdcluster-registry"


def tier_namespace(config) -> str:
    """The Ray namespace of a cluster's detached tiers: `ray.namespace` if set, else one derived from the model
    name and the router port, so two deployments on one Ray cluster do not take each other's replicas."""
    if config.ray.namespace:
        return config.ray.namespace
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", config.model.name) or "model"
    return f"pdcluster-{name}-{config.router.port}"


class TierRegistry:
    """A Ray actor (detached, named REGISTRY_NAME in the tiers' namespace). Plain data in, plain data out."""

    def __init__(self, token: str):
        self._token = token
        self._counters: dict[str, int] = {"prefill": 0, "decode": 0}
        self._replicas: dict[str, dict] = {}  # replica_id -> record (see Deployment._record)

    def snapshot(self) -> dict:
        """{"token", "counters", "replicas": {replica_id: record}}."""
        return {"token": self._token, "counters": dict(self._counters), "replicas": dict(self._replicas)}

    def put(self, replica_id: str, record: dict, counters: dict[str, int]) -> None:
        self._replicas[replica_id] = record
        self._counters = {t: max(self._counters.get(t, 0), n) for t, n in counters.items()}

    def drop(self, replica_id: str) -> None:
        self._replicas.pop(replica_id, None)


def find_registry(namespace: str):
    """The registry actor of `namespace`, or None when no detached deployment lives there."""
    import ray

    try:
        return ray.get_actor(REGISTRY_NAME, namespace=namespace)
    except ValueError:
        return None


def create_registry(namespace: str, token: str):
    import ray

    # num_cpus=0: bookkeeping only; it must not take a slot the tiers are sized for.
    return ray.remote(TierRegistry).options(name=REGISTRY_NAME, namespace=namespace, lifetime="detached",
                                            num_cpus=0).remote(token)
