"""Start a deployment whose tiers outlive the router (`router.detach_tiers: true`), or re-attach to one.

Who calls it: `Deployment.start` (orchestrator/deploy.py) when cluster.yaml sets router.detach_tiers. The first
router of a cluster creates the registry (orchestrator/tier_registry.py) and starts the tiers detached. A later
router with the same cluster.yaml (same namespace) finds the registry and takes over the replicas recorded there:
each one still alive answers `start()` at once (it is idempotent) and goes back into rotation as it is; one that
does not answer is replaced in its placement group (`Deployment.restart_replica`). Only replicas missing from the
file's `replicas` counts are started anew, so a router restart never duplicates a tier.
"""

from __future__ import annotations

import sys

import ray

from orchestrator.deploy import START_TIMEOUT_S, DeploymentError, ReplicaHandle, _placed_on
from orchestrator.tier_registry import create_registry, find_registry, tier_namespace

ATTACH_TIMEOUT_S = 30.0  # a live replica answers start() at once; one that does not within this is replaced


def attach_or_create(cls, config, *, out=sys.stderr):
    namespace = tier_namespace(config)
    registry = find_registry(namespace)
    if registry is None:
        deployment = cls(config)
        deployment._registry = create_registry(namespace, deployment.token)
        print(f"pdcluster: tiers run detached in Ray namespace {namespace!r} (router.detach_tiers): they outlive "
              "this router", file=out, flush=True)
        try:
            deployment.add_replicas([config.decode] * config.decode.replicas
                                    + [config.prefill] * _num_replicas(config, config.prefill), out=out)
        except BaseException:
            deployment.shutdown()
            raise
        return deployment
    snapshot = ray.get(registry.snapshot.remote(), timeout=ATTACH_TIMEOUT_S)
    deployment = cls(config, token=snapshot["token"])
    deployment._registry = registry
    deployment._counters.update(snapshot["counters"])
    handles = [_handle(deployment, replica_id, record) for replica_id, record in sorted(snapshot["replicas"].items())]
    for handle in handles:
        deployment.replicas(handle.tier).append(handle)
    _take_over(deployment, handles, out)
    deployment.num_attached = len(handles)
    missing = [tier for tier in config.tiers()
               for _ in range(max(0, _num_replicas(config, tier) - len(deployment.replicas(tier.name))))]
    print(f"pdcluster: re-attached to {len(handles)} running replica(s) in Ray namespace {namespace!r}"
          + (f"; starting {len(missing)} more to match the file" if missing else ""), file=out, flush=True)
    if missing:
        deployment.add_replicas(missing, out=out)
    return deployment


def _num_replicas(config, tier) -> int:
    """Replicas the file asks for (mode: colocated deploys no prefill tier, as Deployment.start)."""
    return 0 if tier.name == "prefill" and getattr(config, "is_colocated", False) else tier.replicas


def _handle(deployment, replica_id: str, record: dict) -> ReplicaHandle:
    handle = ReplicaHandle(replica_id=replica_id, tier=record["tier"], actor=None,
                           placement_group=record["placement_group"], section=record["section"],
                           generation=record["generation"])
    try:
        handle.actor = ray.get_actor(deployment.actor_name(handle, 0), namespace=deployment.namespace)
        handle.workers = [ray.get_actor(deployment.actor_name(handle, rank), namespace=deployment.namespace)
                          for rank in range(1, record["world_size"])]
    except ValueError:  # a rank is gone for good (its name was released): the replica is replaced below
        handle.actor = None
    handle.node_id, handle.accelerator = _placed_on(handle.placement_group)
    return handle


def _take_over(deployment, handles: list[ReplicaHandle], out) -> None:
    """Each recorded replica: alive -> ready as it is; not answering -> replaced in its placement group."""
    refs = {h.replica_id: h.actor.start.remote() for h in handles if h.actor is not None}
    for handle in handles:
        info = None
        if handle.replica_id in refs:
            try:
                started = ray.get(refs[handle.replica_id], timeout=ATTACH_TIMEOUT_S)
                ray.get(handle.actor.ping.remote(), timeout=ATTACH_TIMEOUT_S)  # every rank of its mesh serves
                info = started
            except Exception as exc:  # dead, or a rank of its mesh is gone (ping fails)
                print(f"pdcluster: {handle.replica_id} does not answer ({type(exc).__name__}); replacing it",
                      file=out, flush=True)
        if info is None:
            try:
                info = ray.get(deployment.restart_replica(handle), timeout=START_TIMEOUT_S)
            except Exception as exc:
                raise DeploymentError(f"{handle.replica_id} could not be re-attached or replaced: {exc}") from None
        handle.info = dict(info)
        handle.node_ip = info.get("node_ip", "")
        handle.state = "ready"


def remove_detached(config, *, out=sys.stderr) -> int:
    """Stop the detached tiers of `config`'s cluster without a router (`pdcluster down CONFIG --tiers`): every rank
    actor, placement group and the registry. Returns how many replicas were removed (0: none were running)."""
    from orchestrator.deploy import Deployment, _kill, connect_ray

    connect_ray(config)
    namespace = tier_namespace(config)
    registry = find_registry(namespace)
    if registry is None:
        print(f"pdcluster: no detached tiers in Ray namespace {namespace!r}", file=out, flush=True)
        return 0
    snapshot = ray.get(registry.snapshot.remote(), timeout=ATTACH_TIMEOUT_S)
    deployment = Deployment(config, token=snapshot["token"])
    for replica_id, record in snapshot["replicas"].items():
        _kill(_handle(deployment, replica_id, record))
    ray.kill(registry, no_restart=True)
    print(f"pdcluster: removed {len(snapshot['replicas'])} replica(s) from Ray namespace {namespace!r}", file=out,
          flush=True)
    return len(snapshot["replicas"])
