"""Deploying the two tiers on Ray: one placement group per replica (its ranks packed together), one actor per rank.

Who calls it: `pdcluster serve` / `demo` (through orchestrator/serve.py) and tests. `Deployment.start(config)`
connects to Ray (or starts a local instance), makes sure the model directory exists, places and starts every
replica, and returns once all of them answer; a replica that cannot be placed fails with an error naming the
resource that is missing instead of waiting forever.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from mesh.parallel import MeshShape
from orchestrator.config import ClusterConfig, ConfigError, TierSection
from orchestrator.tier_registry import create_registry, find_registry, tier_namespace

log = logging.getLogger("pdcluster.deploy")

PLACEMENT_TIMEOUT_S = 60.0
START_TIMEOUT_S = 300.0


class DeploymentError(RuntimeError):
    """The deployment could not be brought up; the message says which replica and why."""


@dataclass
class ReplicaHandle:
    replica_id: str
    tier: str
    actor: "ray.actor.ActorHandle"  # rank 0: the replica handle the router talks to
    placement_group: PlacementGroup
    section: TierSection | None = None  # the tier settings this replica was started with
    info: dict = field(default_factory=dict)  # what start() returned (kv address, block counts, ...)
    node_ip: str = ""
    node_id: str = ""  # the node rank 0's bundle landed on
    accelerator: str = ""  # that node's accelerator type (its `accelerator_type:*` resource), "" if none
    state: str = "starting"  # starting -> ready -> draining -> removed (or dead)
    workers: list = field(default_factory=list)  # ranks 1..world-1 (actor handles), driven by rank 0
    generation: int = 0  # how many times its rank actors were replaced (restart_replica); part of their names


def ensure_model(config: ClusterConfig, *, out=sys.stderr) -> None:
    """Create the model directory from its preset when it is missing (the embedded default does this)."""
    path = Path(config.model.path)
    if (path / "config.json").exists():
        return
    if not config.model.preset:
        raise DeploymentError(f"model.path {path} has no config.json, and no model.preset is set to create it")
    from mesh.presets import make_model

    print(f"pdcluster: creating model {config.model.preset!r} at {path} (seeded random weights) ...", file=out,
          flush=True)
    make_model(path, preset=config.model.preset)


def validate_mesh(tier: TierSection, model_path: str) -> None:
    """The tier's mesh against the model (heads, KV heads, layers, experts), before anything is placed; raises
    ConfigError naming the degree's key (`decode.mesh.tp`) and a fix."""
    from mesh.config import ModelConfig

    degrees = dict(tp=tier.mesh.tp, cp=tier.mesh.cp, pp=tier.mesh.pp, ep=tier.mesh.ep)
    try:
        MeshShape(**degrees).validate(ModelConfig.from_dir(model_path))
    except ValueError as error:
        # MeshShape's messages start "mesh degree <axis>=": that axis is the key to fix.
        match = re.match(r"mesh degree (\w+)=", str(error))
        key = f"{tier.name}.mesh.{match.group(1)}" if match and match.group(1) in degrees else f"{tier.name}.mesh"
        raise ConfigError(key, f"{error} (model {model_path})") from None


def _bundle(resources: dict) -> dict:
    bundle = {"CPU": float(resources.get("num_cpus", 0.5))}
    if resources.get("num_gpus"):
        bundle["GPU"] = float(resources["num_gpus"])
    if resources.get("memory"):
        bundle["memory"] = float(resources["memory"])
    if resources.get("accelerator_type"):
        bundle[f"accelerator_type:{resources['accelerator_type']}"] = 0.001
    bundle.update({k: float(v) for k, v in resources.get("custom", {}).items()})
    return bundle


def _cpus_needed(config: ClusterConfig) -> float:
    return sum(t.replicas * t.mesh.world_size * float(t.resources.get("num_cpus", 0.5)) for t in config.tiers())


def connect_ray(config: ClusterConfig) -> None:
    """Join the cluster named in ray.address, or start a local instance sized for the tiers."""
    if ray.is_initialized():
        return
    env_vars = {"PYTHONPATH": os.pathsep.join(p for p in [_project_root(), os.environ.get("PYTHONPATH")] if p)}
    if not config.ray.address:
        # one machine: KV transfers stay on loopback (and shared memory), never on another interface
        env_vars.update(PDCLUSTER_KV_HOST="127.0.0.1", UCX_NET_DEVICES="lo")
    else:
        # where the KV should travel, when the operator chose it for this driver, holds for the ranks it starts
        env_vars.update({k: os.environ[k] for k in ("PDCLUSTER_KV_HOST", "UCX_NET_DEVICES") if k in os.environ})
    env = {"env_vars": env_vars}
    if config.ray.address:
        ray.init(address=config.ray.address, runtime_env=env, log_to_driver=True)
        return
    num_cpus = config.ray.num_cpus or max(os.cpu_count() or 1, math.ceil(_cpus_needed(config)))
    # Ray keeps an event record of every task attempt in its GCS (up to 100,000 by default), about 3 per request:
    # a long-running local server would grow by ~11 MiB/min until the cap; a smaller cap keeps it flat.
    os.environ.setdefault("RAY_task_events_max_num_task_in_gcs", "10000")
    # address="local": always a new instance, never another Ray that happens to run on this machine.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=env, log_to_driver=True,
             configure_logging=False)


def _project_root() -> str:
    # Lets rank actors import pdcluster from a source checkout as well as from an installed wheel.
    return str(Path(__file__).resolve().parent.parent)


class Deployment:
    def __init__(self, config: ClusterConfig, *, token: str | None = None):
        self.config = config
        # KV-transfer peers must present it in their handshake (re-attached tiers keep the one they started with)
        self.token = token or secrets.token_hex(16)
        self.prefill: list[ReplicaHandle] = []
        self.decode: list[ReplicaHandle] = []
        self._counters = {"prefill": 0, "decode": 0}
        # router.detach_tiers: ranks and placement groups outlive this process (orchestrator/tier_registry.py)
        self.is_detached = config.router.detach_tiers
        self.namespace = tier_namespace(config) if self.is_detached else None
        self._registry = None
        self.num_attached = 0  # replicas taken over from an earlier router (detached tiers only)

    @classmethod
    def start(cls, config: ClusterConfig, *, out=sys.stderr) -> "Deployment":
        """Place and start both tiers; with router.detach_tiers, first re-attach to the replicas an earlier router
        of the same cluster left running (tier_registry.py) and start only what is missing."""
        ensure_model(config, out=out)
        for tier in config.tiers():  # a mesh the model cannot take fails before anything is started
            validate_mesh(tier, config.model.path)
        connect_ray(config)
        if config.router.detach_tiers:
            from orchestrator.tier_attach import attach_or_create

            return attach_or_create(cls, config, out=out)
        deployment = cls(config)
        try:
            # Both tiers at once: every rank's start (process, imports, weights) overlaps with the others'.
            # mode: colocated deploys no prefill tier: every decode replica prefills its own prompts.
            num_prefill = 0 if config.is_colocated else config.prefill.replicas
            deployment.add_replicas([config.decode] * config.decode.replicas + [config.prefill] * num_prefill,
                                    out=out)
        except BaseException:
            deployment.shutdown()
            raise
        return deployment

    def replicas(self, tier: str) -> list[ReplicaHandle]:
        return self.prefill if tier == "prefill" else self.decode

    def add_replica(self, tier: TierSection, *, out=sys.stderr) -> ReplicaHandle:
        """Place and start one more replica of `tier` (blocking); it takes traffic once this returns."""
        return self._add_replicas(tier, 1, out)[0]

    def remove_replica(self, handle: ReplicaHandle) -> None:
        """Kill a replica that has been drained (the caller checked it is idle) and free its placement group."""
        handle.state = "removed"
        self.replicas(handle.tier).remove(handle)
        _kill(handle)
        if self._registry is not None:
            self._registry.drop.remote(handle.replica_id)

    def restart_replica(self, handle: ReplicaHandle):
        """Replace every rank actor of a replica (a multi-rank mesh cannot take one rank back: the world is formed
        again from scratch) in its placement group, which keeps its reserved resources (Ray re-places it when its
        node died). Returns the new rank 0's start() ref; the caller (the router's health loop) awaits it and puts
        the replica back into rotation. Who calls it: orchestrator/cluster.py, and re-attach for a dead replica."""
        for actor in [handle.actor, *handle.workers]:
            try:
                if actor is not None:
                    ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        handle.generation += 1
        ref = self._start_actor(handle.section or getattr(self.config, handle.tier), handle)
        self._record(handle)
        return ref

    def update_tier(self, tier: TierSection) -> None:
        """Record the tier settings that replicas started from now on use (after `pdcluster apply`)."""
        self.config = dataclasses.replace(self.config, **{tier.name: tier})

    def add_replicas(self, sections: list[TierSection], *, out=sys.stderr) -> list[ReplicaHandle]:
        """Place and start one replica per section (tiers and meshes may differ), all at the same time; blocks until
        every one is ready and takes traffic."""
        for section in sections:
            validate_mesh(section, self.config.model.path)
        handles = []
        counts = {t: sum(1 for s in sections if s.name == t) for t in ("prefill", "decode")}
        print("pdcluster: placing " + ", ".join(f"{n} {t} replica{'s' if n > 1 else ''}" for t, n in counts.items()
                                                if n) + " ...", file=out, flush=True)
        for section in sections:
            handle = self._place(section)
            handle.section = section
            self.replicas(section.name).append(handle)
            handles.append(handle)
        refs = {h.replica_id: self._start_actor(h.section, h) for h in handles}
        print(f"pdcluster: starting {len(handles)} replica(s) ({sum(h.section.mesh.world_size for h in handles)} "
              "rank actors; each loads its shard of the weights) ...", file=out, flush=True)
        started = time.monotonic()
        deadline = time.monotonic() + START_TIMEOUT_S
        for handle in handles:
            try:
                handle.info = ray.get(refs[handle.replica_id], timeout=max(1.0, deadline - time.monotonic()))
            except ray.exceptions.GetTimeoutError:
                raise DeploymentError(f"{handle.replica_id} did not start within {START_TIMEOUT_S:.0f} s") from None
            except ray.exceptions.RayActorError as exc:
                raise DeploymentError(f"{handle.replica_id} failed to start: {exc}") from None
            except ray.exceptions.RayTaskError as exc:
                raise DeploymentError(f"{handle.replica_id} failed to start: {exc.cause}") from None
            handle.state = "ready"
            handle.node_ip = handle.info.get("node_ip", "")
            self._record(handle)
            where = f"on {handle.info['device']}; " if handle.info.get("device") else ""
            cache = f"; {handle.info['kv_cache']}" if handle.info.get("kv_cache") else ""
            print(f"pdcluster: {handle.replica_id} ready ({where}{time.monotonic() - started:.1f} s){cache}", file=out,
                  flush=True)
        return handles

    def _add_replicas(self, tier: TierSection, count: int, out) -> list[ReplicaHandle]:
        return self.add_replicas([tier] * count, out=out)

    def _place(self, tier: TierSection) -> ReplicaHandle:
        index = self._counters[tier.name]
        self._counters[tier.name] += 1
        replica_id = f"{tier.name}-{index}"
        bundle = _bundle(tier.resources)
        timeout_s = self.config.ray.placement_timeout_s or PLACEMENT_TIMEOUT_S
        strategy = "SPREAD" if tier.placement == "spread" else "PACK"
        pg = placement_group([dict(bundle) for _ in range(tier.mesh.world_size)], strategy=strategy,
                             name=f"pdcluster-{replica_id}-{self.token[:6]}",
                             **({"lifetime": "detached"} if self.is_detached else {}))
        ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
        if not ready:
            remove_placement_group(pg)
            available = ray.available_resources()
            missing = [f"{k} (needs {v:g} per rank x {tier.mesh.world_size}, cluster has {available.get(k, 0):g} free)"
                       for k, v in bundle.items() if available.get(k, 0) < v * tier.mesh.world_size]
            raise DeploymentError(
                f"cannot place {replica_id}: no node offers {tier.name}.resources "
                f"{tier.resources} within {timeout_s:.0f} s; missing: "
                f"{', '.join(missing) or 'resources are busy with other work'}")
        handle = ReplicaHandle(replica_id=replica_id, tier=tier.name, actor=None, placement_group=pg)
        handle.node_id, handle.accelerator = _placed_on(pg)
        return handle

    def _start_actor(self, tier: TierSection, handle: ReplicaHandle):
        """One actor per rank, rank r on bundle r of the replica's placement group; rank 0 gets the others'
        handles and brings the mesh up in its start() (the returned ref)."""
        cfg = self.config
        num_cpus = float(tier.resources.get("num_cpus", 0.5))
        threads = max(1, math.floor(num_cpus))
        mesh = MeshShape(tp=tier.mesh.tp, cp=tier.mesh.cp, pp=tier.mesh.pp, ep=tier.mesh.ep)
        # A tier that asks for GPUs computes on them: each rank on the GPU Ray gives its actor, NCCL between ranks.
        use_gpu = bool(tier.resources.get("num_gpus"))

        def options(rank: int, max_restarts: int) -> dict:
            strategy = PlacementGroupSchedulingStrategy(placement_group=handle.placement_group,
                                                        placement_group_bundle_index=rank)
            name = self.actor_name(handle, rank)
            return dict(num_cpus=num_cpus, num_gpus=float(tier.resources.get("num_gpus", 0) or 0),
                        scheduling_strategy=strategy, max_concurrency=1000, name=name, max_restarts=max_restarts,
                        **self._lifetime())

        # A rank of a multi-rank replica cannot rejoin its world on its own, so Ray restarts only one-rank replicas.
        restarts = tier.max_restarts if mesh.world_size == 1 else 0
        if tier.name == "decode":
            from decode_tier.rank_worker import DecodeRankWorker
            from decode_tier.replica import DecodeReplica

            common = dict(model_path=cfg.model.path, dtype=cfg.model.dtype, num_kv_blocks=tier.num_kv_blocks,
                          block_size=tier.block_size, max_num_seqs=tier.max_num_seqs,
                          kv_backend=cfg.kv_transfer.backend, kv_token=self.token, num_threads=threads,
                          checksum=cfg.kv_transfer.checksum, use_gpu=use_gpu,
                          gpu_memory_fraction=tier.gpu_memory_fraction, max_step_tokens=tier.max_step_tokens,
                          collectives=tier.collectives)
            handle.workers = [ray.remote(DecodeRankWorker).options(**options(rank, 0)).remote(
                replica_id=handle.replica_id, rank=rank, mesh=mesh, **common) for rank in range(1, mesh.world_size)]
            prefill = cfg.prefill.mesh
            handle.actor = ray.remote(DecodeReplica).options(**options(0, restarts)).remote(
                replica_id=handle.replica_id, lease_s=cfg.kv_transfer.lease_s, mesh=mesh,
                prefill_mesh=MeshShape(tp=prefill.tp, cp=prefill.cp, pp=prefill.pp, ep=prefill.ep),
                workers=handle.workers, **common)
            return handle.actor.start.remote()
        from prefill_tier.rank_worker import PrefillRankWorker
        from prefill_tier.prefix_cache import PrefixCacheConfig
        from prefill_tier.replica import PrefillReplica

        common = dict(model_path=cfg.model.path, dtype=cfg.model.dtype, kv_backend=cfg.kv_transfer.backend,
                      kv_token=self.token, layerwise=cfg.kv_transfer.layerwise, num_threads=threads, use_gpu=use_gpu,
                      collectives=tier.collectives)
        handle.workers = [ray.remote(PrefillRankWorker).options(**options(rank, 0)).remote(
            replica_id=handle.replica_id, rank=rank, mesh=mesh, **common) for rank in range(1, mesh.world_size)]
        handle.actor = ray.remote(PrefillReplica).options(**options(0, restarts)).remote(
            replica_id=handle.replica_id, max_batch_tokens=tier.max_batch_tokens,
            prefix_cache=PrefixCacheConfig(max_tokens=tier.prefix_cache.max_tokens,
                                           block_size=tier.prefix_cache.block_size),
            max_batch_seqs=tier.max_batch_seqs, mesh=mesh, workers=handle.workers, **common)
        return handle.actor.start.remote()

    def shutdown(self) -> None:
        """Kill every actor and free its placement group (detached tiers and their registry included). Safe to
        call twice."""
        for handle in self.prefill + self.decode:
            _kill(handle)
        self.prefill, self.decode = [], []
        if self._registry is not None:
            try:
                ray.kill(self._registry, no_restart=True)
            except Exception:
                pass
            self._registry = None

    def release(self) -> None:
        """Let go of detached tiers without stopping them (the router stops, the replicas keep running for the
        next router to re-attach). A deployment that is not detached is shut down instead: its actors belong to
        this process and could not be found again."""
        if not self.is_detached:
            self.shutdown()
            return
        self.prefill, self.decode = [], []
        self._registry = None

    def actor_name(self, handle: ReplicaHandle, rank: int) -> str:
        """The Ray name of one rank actor: unique per deployment (token) and per restart (generation)."""
        return (handle.replica_id + (f"-rank{rank}" if rank else "")
                + (f"-g{handle.generation}" if handle.generation else "") + "-" + self.token[:6])

    def _lifetime(self) -> dict:
        """Ray actor options that make a rank outlive this process (detached tiers only), in the tiers' namespace
        so the next router finds it by name."""
        return {"lifetime": "detached", "namespace": self.namespace} if self.is_detached else {}

    def _record(self, handle: ReplicaHandle) -> None:
        """Tell the registry (detached tiers) how to find this replica again."""
        if self._registry is None:
            return
        record = {"tier": handle.tier, "section": handle.section, "placement_group": handle.placement_group,
                  "generation": handle.generation, "world_size": 1 + len(handle.workers)}
        self._registry.put.remote(handle.replica_id, record, dict(self._counters))


def _placed_on(pg: PlacementGroup) -> tuple[str, str]:
    """(node id, accelerator type) of the node that holds the placement group's first bundle (rank 0)."""
    try:
        node_id = ray.util.placement_group_table(pg)["bundles_to_node_id"][0]
        node = next(n for n in ray.nodes() if n.get("NodeID") == node_id)
        accelerators = [k.split(":", 1)[1] for k in node.get("Resources", {}) if k.startswith("accelerator_type:")]
        return node_id, ",".join(sorted(accelerators))
    except Exception:  # informational only: never fail a deployment over it
        return "", ""


def _kill(handle: ReplicaHandle) -> None:
    for actor in [handle.actor, *handle.workers]:
        try:
            if actor is not None:
                ray.kill(actor, no_restart=True)
        except Exception:  # already dead
            pass
    try:
        remove_placement_group(handle.placement_group)
    except Exception:
        pass

