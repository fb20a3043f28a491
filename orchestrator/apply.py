"""Carrying out `pdcluster apply` inside the serving process, and the Admin gRPC service that exposes it.

Who calls it: the router's Admin.Apply handler (a client runs `pdcluster apply CONFIG --address ...`). Replicas
are started and removed through the live `Deployment`; the router stops routing to a replica the moment it is
marked draining, and the replica is removed only once the router has nothing in flight there and the replica
itself reports no queued, running or reserved work (or the drain timeout passes, which is reported).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable

import grpc

from orchestrator.apply_plan import ApplyPlan, plan_apply
from orchestrator.config import ClusterConfig, ConfigError, parse_config
from orchestrator.deploy import ReplicaHandle
from protos import admin_pb2, admin_pb2_grpc

log = logging.getLogger("pdcluster.apply")

DEFAULT_DRAIN_TIMEOUT_S = 300.0


def _live(handles: list[ReplicaHandle]) -> list[ReplicaHandle]:
    return [h for h in handles if h.state in ("starting", "ready")]


async def _is_idle(backend, handle: ReplicaHandle) -> bool:
    if backend.inflight(handle.replica_id) > 0:
        return False
    try:
        stats = await asyncio.wait_for(handle.actor.get_stats.remote(), 5.0)
    except Exception:
        return True  # a dead replica has nothing left to finish
    return all(stats.get(k, 0) == 0 for k in ("num_queued", "num_running", "num_waiting_kv"))


async def drain(backend, handle: ReplicaHandle, timeout_s: float, report: Callable[[str], None]) -> None:
    """Stop routing to `handle`, wait for its work to finish, then remove it."""
    handle.state = "draining"
    report(f"draining {handle.replica_id} ...")
    deadline = time.monotonic() + timeout_s
    while not await _is_idle(backend, handle):
        if time.monotonic() > deadline:
            report(f"{handle.replica_id} still busy after {timeout_s:.0f} s; removing it anyway")
            break
        await asyncio.sleep(0.1)
    await asyncio.to_thread(backend.deployment.remove_replica, handle)
    report(f"removed {handle.replica_id}")


def apply_lock(backend) -> asyncio.Lock:
    """One apply at a time per deployment, whoever asks: the Admin service or the autoscaler
    (orchestrator/autoscale_runner.py). Made on first use, on the router's loop."""
    lock = getattr(backend, "_apply_lock", None)
    if lock is None:
        lock = backend._apply_lock = asyncio.Lock()
    return lock


def _update_autoscale(backend, plan: ApplyPlan, *, dry_run: bool, report: Callable[[str], None]) -> None:
    """A changed `autoscale:` block needs no replica change: the running settings take it, and the planner
    (orchestrator/autoscale_runner.py) reads it at its next interval."""
    deployment = backend.deployment
    for name, wanted in plan.tiers.items():
        running = getattr(deployment.config, name)
        if running.autoscale == wanted.autoscale:
            continue
        if dry_run:
            report(f"{name}.autoscale would change")
            continue
        deployment.update_tier(dataclasses.replace(running, autoscale=wanted.autoscale))
        if wanted.autoscale is not None and getattr(backend, "autoscaler", None) is None:
            report(f"{name}.autoscale recorded, but this router started without autoscaling: restart "
                   "`pdcluster serve` with the file to run the planner")
        else:
            report(f"{name}.autoscale updated (the planner uses it from its next interval)")


async def apply_config(backend, wanted: ClusterConfig, *, dry_run: bool, report: Callable[[str], None],
                       drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S) -> ApplyPlan:
    deployment = backend.deployment
    counts = {tier: len(_live(deployment.replicas(tier))) for tier in ("prefill", "decode")}
    plan = plan_apply(deployment.config, wanted, counts)
    for line in plan.describe():
        report(line)
    if plan.ok:
        _update_autoscale(backend, plan, dry_run=dry_run, report=report)
    if dry_run or not plan.ok or plan.is_noop:
        return plan
    for action in plan.actions:
        tier = plan.tiers[action.tier]
        deployment.update_tier(tier)  # replicas started from now on use the new settings
        if action.kind == "add":
            for _ in range(action.count):
                handle = await asyncio.to_thread(deployment.add_replica, tier)
                report(f"started {handle.replica_id}")
        elif action.kind == "replace":
            stale = [h for h in _live(deployment.replicas(tier.name)) if h.section != tier][:action.count]
            for old in stale:
                new = await asyncio.to_thread(deployment.add_replica, tier)
                report(f"started {new.replica_id} to replace {old.replica_id}")
                await drain(backend, old, drain_timeout_s, report)
        else:  # remove: newest first, so long-lived replicas (warm caches) stay
            victims = sorted(_live(deployment.replicas(tier.name)), key=lambda h: h.replica_id)[-action.count:]
            for handle in reversed(victims):
                await drain(backend, handle, drain_timeout_s, report)
    report("apply complete")
    return plan


class AdminServicer(admin_pb2_grpc.AdminServicer):
    """pdcluster.v1.Admin over a backend that has a live deployment (orchestrator/cluster.py)."""

    def __init__(self, backend) -> None:
        self._backend = backend

    async def Apply(self, request, context):
        import yaml

        try:
            raw = yaml.safe_load(request.config_yaml)
            wanted = parse_config(raw, source="(apply request)")
        except yaml.YAMLError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"config_yaml is not valid YAML: {exc}")
            return
        except ConfigError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return
        if apply_lock(self._backend).locked():
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "another apply (or an autoscale change) is in progress")
            return
        async with apply_lock(self._backend):
            queue: asyncio.Queue = asyncio.Queue()
            timeout = request.drain_timeout_s or DEFAULT_DRAIN_TIMEOUT_S
            task = asyncio.create_task(apply_config(self._backend, wanted, dry_run=request.dry_run,
                                                    report=queue.put_nowait, drain_timeout_s=timeout))
            while not (task.done() and queue.empty()):
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield admin_pb2.ApplyProgress(line=getter.result())
                else:
                    getter.cancel()
            try:
                plan = task.result()
            except Exception as exc:
                log.exception("apply failed")
                yield admin_pb2.ApplyProgress(line=f"apply failed: {exc}", done=True, ok=False)
                return
            yield admin_pb2.ApplyProgress(done=True, ok=plan.ok)
