"""The Ray-backed `Backend`: drives one request through the two tiers.

Per request (DESIGN.md, "The request path"):
  1. pick a decode replica (policy over free KV blocks and load) and reserve KV space there (with a lease);
  2. pick a prefill replica (policy over its queue) and run the prompt; it pushes KV layer by layer into the
     reservation and returns the first token, which is streamed at once (TTFT);
  3. stream the decode replica's tokens until a finish reason.
Closing the stream (client cancel, stop string, deadline) aborts the request on both replicas, so no KV block or
queue slot outlives it.
Local prefill (mode: colocated, or router.disaggregation's rule: a short prompt, a saturated prefill tier): steps 1
and 2 become one call on the decode replica, which prefills the prompt itself in chunks mixed into its decode steps
(`_attempt_local`); the response's prefill_replica is then that decode replica.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator

import grpc
import ray

from mesh.config import ModelConfig
from mesh.parallel import MeshShape
from decode_tier.replica import ReservationRefused
from orchestrator.backend import BackendError, FinishEvent, ModelInfo, RequestSpec, Timings, TokenEvent
from orchestrator.deploy import Deployment, ReplicaHandle
from orchestrator.policies import PolicyOptions, get_policy

log = logging.getLogger("pdcluster.cluster")


class ClusterBackend:
    def __init__(self, deployment: Deployment, *, metrics=None):
        """metrics: an orchestrator.metrics.ClusterMetrics, or None; counts each request on every replica it used."""
        self.deployment = deployment
        self.metrics = metrics
        config = deployment.config
        model_config = ModelConfig.from_dir(config.model.path)
        self._model_info = ModelInfo(
            model_name=config.model.name,
            vocab_size=model_config.vocab_size,
            max_context_len=model_config.max_position_embeddings,
            eos_token_ids=tuple(model_config.eos_token_ids),
        )
        # One policy per tier (cluster.yaml <tier>.policy); self._policy picks decode replicas.
        self._policy = get_policy(config.decode.policy, _policy_options(config.decode))
        self._prefill_policy = get_policy(config.prefill.policy, _policy_options(config.prefill))
        self._is_colocated = config.is_colocated
        self._disaggregation = config.router.disaggregation  # which prompts are prefilled on their decode replica
        # Prompt tokens the router has sent to each prefill replica and not seen finish (saturation signal).
        self._prefill_queued_tokens: dict[str, int] = {}
        self._max_retries = config.router.max_retries
        self._replica_timeout_s = config.router.replica_timeout_s
        # The router's own view of each replica's load, updated as it routes (no round trip per request).
        self._inflight: dict[str, int] = {}

    @property
    def model_info(self) -> ModelInfo:
        return self._model_info

    def use_policy(self, tier: str, name: str) -> None:
        """Route `tier` ("prefill" or "decode") with a fresh policy `name` from now on (what it learned is dropped).
        For comparing policies on one running deployment (benchmarks/multiturn.py); the tier's cluster.yaml options
        apply."""
        section = {"prefill": self.deployment.config.prefill, "decode": self.deployment.config.decode}[tier]
        policy = get_policy(name, _policy_options(section))
        if tier == "prefill":
            self._prefill_policy = policy
        else:
            self._policy = policy

    def _ready(self, tier: str) -> list[ReplicaHandle]:
        return [h for h in self.deployment.replicas(tier) if h.state == "ready"]

    def _load(self, handle: ReplicaHandle) -> dict:
        return {"inflight": self._inflight.get(handle.replica_id, 0),
                "num_free_blocks": handle.info.get("num_free_blocks", 0)}

    async def _reserve(self, spec: RequestSpec, prefill: ReplicaHandle | None, *,
                       local: bool = False) -> tuple[ReplicaHandle, object]:
        """Blocks on a decode replica, tried in policy order: a KV reservation for `prefill` to push into, or with
        `local` the request itself queued for local prefill there (prefill_local)."""
        candidates = self._ready("decode")
        if not candidates:
            raise BackendError(grpc.StatusCode.UNAVAILABLE, "no decode replica is ready")
        refusals = []
        for handle in self._policy.order(candidates, self._load):
            try:
                if local:
                    ref = handle.actor.prefill_local.remote(spec.request_id, list(spec.prompt_token_ids), spec.params)
                else:
                    # The decode ranks post their receives for the mesh of the prefill replica that will push.
                    ref = handle.actor.reserve.remote(spec.request_id, len(spec.prompt_token_ids), spec.params,
                                                      prefill_mesh=_mesh_of(prefill))
                try:
                    # Bounded: a replica that stops answering (its node gone but not yet declared dead) must not
                    # hold the request past router.replica_timeout_s; the next replica is tried.
                    info = await asyncio.wait_for(ref, self._replica_timeout_s)
                except (asyncio.CancelledError, asyncio.TimeoutError) as exc:
                    # The client left (or its deadline passed), or the replica is too slow, while the reservation
                    # was being made: it may still succeed there, so release it as soon as it exists instead of at
                    # lease end.
                    _release_when_reserved(handle, spec.request_id, ref)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    refusals.append((False, f"{handle.replica_id}: no answer within {self._replica_timeout_s:g} s"))
                    continue
                used = info["num_blocks"] if local else len(info.block_ids)
                handle.info["num_free_blocks"] = max(0, handle.info.get("num_free_blocks", 0) - used)
                return handle, info
            except ray.exceptions.RayTaskError as exc:
                is_full = isinstance(exc.cause, ReservationRefused)
                refusals.append((is_full, _cause(exc)))
            except ray.exceptions.RayError as exc:
                refusals.append((False, f"{handle.replica_id}: {_cause(exc)}"))
        reasons = "; ".join(r for _, r in refusals)
        if all(is_full for is_full, _ in refusals):
            raise BackendError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"no decode replica has KV space for this request: {reasons}")
        raise BackendError(grpc.StatusCode.UNAVAILABLE, f"no decode replica could take the request: {reasons}")

    def _pick_prefill(self, spec: RequestSpec) -> ReplicaHandle:
        candidates = self._ready("prefill")
        if not candidates:
            raise BackendError(grpc.StatusCode.UNAVAILABLE, "no prefill replica is ready")
        return next(iter(self._prefill_policy.order(candidates, self._load, prompt_token_ids=spec.prompt_token_ids)))

    async def generate(self, spec: RequestSpec) -> AsyncIterator[TokenEvent | FinishEvent]:
        """One request; if a replica fails before the request finishes, it is retried on another replica
        (up to router.max_retries times) by re-prefilling the prompt plus the tokens already streamed, so the
        client sees one unbroken stream with no token repeated."""
        started = time.monotonic()
        sent: list[int] = []
        failures: list[str] = []
        for attempt in range(self._max_retries + 1):
            attempt_spec = spec
            if attempt:
                params = spec.params
                attempt_spec = dataclasses.replace(
                    spec, request_id=f"{spec.request_id}.retry{attempt}",
                    prompt_token_ids=list(spec.prompt_token_ids) + sent,
                    params=dataclasses.replace(params, max_tokens=params.max_tokens - len(sent),
                                               output_offset=params.output_offset + len(sent)))
            try:
                async for event in self._attempt(attempt_spec, started, resumed=bool(sent)):
                    if isinstance(event, TokenEvent):
                        sent.extend(event.token_ids)
                    yield event
                return
            except _ReplicaFailed as failure:
                failures.append(str(failure))
                await self._check_replicas(failure.handles)
                if self.metrics is not None and attempt < self._max_retries:
                    self.metrics.count_retry(failure.handles[0].tier if failure.handles else "unknown")
                log.warning("request %s: %s; %s", spec.request_id, failure,
                            "retrying" if attempt < self._max_retries else "giving up")
        raise BackendError(grpc.StatusCode.UNAVAILABLE, f"request failed on {len(failures)} attempt(s): "
                           + "; ".join(failures))

    def _is_local_prefill(self, spec: RequestSpec) -> bool:
        """Whether this request's prompt is prefilled on its decode replica instead of the prefill tier."""
        if self._is_colocated:
            return True
        rule = self._disaggregation
        ready = self._ready("prefill")
        is_saturated = bool(ready) and all(self._prefill_queued_tokens.get(h.replica_id, 0) >
                                           rule.saturated_queued_tokens for h in ready)
        return rule.is_local(len(spec.prompt_token_ids), is_prefill_saturated=is_saturated)

    async def _attempt(self, spec: RequestSpec, started: float, *, resumed: bool):
        if self._is_local_prefill(spec):
            async for event in self._attempt_local(spec, started, resumed=resumed):
                yield event
            return
        params = spec.params
        num_prompt_tokens = len(spec.prompt_token_ids)
        decode = reservation = stream = None
        decode_released = False  # True once the decode replica freed the request itself (its stream finished)
        prefill = self._pick_prefill(spec)
        prefill_pending = True
        self._bump(prefill, +1, num_tokens=num_prompt_tokens)
        outcome = "cancelled"  # for the metrics: unless it finishes or fails below (router stopped listening)
        used_replicas: list[ReplicaHandle] = []  # for the metrics: the replicas this request reached
        try:
            if params.max_tokens > 1:
                decode, reservation = await self._reserve(spec, prefill)
                self._bump(decode, +1)
                used_replicas.append(decode)
            used_replicas.append(prefill)
            try:
                result = await asyncio.wait_for(
                    prefill.actor.prefill.remote(spec.request_id, spec.prompt_token_ids, params, reservation),
                    self._replica_timeout_s)
            except (ray.exceptions.RayError, asyncio.TimeoutError) as exc:
                raise _ReplicaFailed(f"prefill on {prefill.replica_id} failed: {_cause(exc)}",
                                     [prefill] + ([decode] if decode else [])) from None
            self._bump(prefill, -1, num_tokens=num_prompt_tokens)
            prefill_pending = False
            self._prefill_policy.record(prefill, spec.prompt_token_ids)  # its prefix cache now holds this prompt
            prefill_done = time.monotonic()
            first = result["first_token"]
            timings = dict(queue_s=result["queue_s"], prefill_s=result["prefill_s"], kv_transfer_s=result["kv_s"],
                           kv_bytes=result["kv_bytes"], num_cached_tokens=result.get("num_cached_tokens", 0),
                           ttft_s=prefill_done - started, prefill_comm_bytes=result.get("comm_bytes", {}))
            replicas = dict(prefill_replica=prefill.replica_id,
                            decode_replica=decode.replica_id if decode else "")
            ends_here = self._finishes(first, params)
            if ends_here == "stop":  # the stop token itself is not part of the output
                outcome = "finished"
                yield FinishEvent(finish_reason="stop", timings=Timings(**timings), **replicas)
                return
            if resumed:  # a retry: the request's first token went out long ago
                yield TokenEvent([first], **replicas)
            else:
                yield TokenEvent([first], timings=Timings(**timings), **replicas)
            if ends_here or decode is None:
                outcome = "finished"
                yield FinishEvent(finish_reason="length", timings=Timings(**timings), **replicas)
                return
            num_tokens = 1
            finish_reason = "error"
            stream = decode.actor.generate.remote(spec.request_id, spec.prompt_token_ids, first)
            try:
                async for item in _bounded_items(stream, self._replica_timeout_s):
                    if "kv_bytes" in item:
                        continue
                    if item["token_ids"]:
                        num_tokens += len(item["token_ids"])
                        yield TokenEvent(list(item["token_ids"]))
                    if item["finish_reason"]:
                        finish_reason = item["finish_reason"]
                        timings["decode_comm_bytes"] = item.get("comm_bytes", {})  # multi-rank replicas only
                        decode_released = True
                        break
            except (ray.exceptions.RayError, asyncio.TimeoutError) as exc:
                raise _ReplicaFailed(f"decode on {decode.replica_id} failed: {_cause(exc)}", [decode]) from None
            if finish_reason == "error":
                # A step failed on the replica (on a multi-rank mesh: a rank died under it). Every token streamed so
                # far is known, so the request is retried elsewhere like any other replica failure.
                raise _ReplicaFailed(f"decode replica {decode.replica_id} failed a step", [decode])
            timings["tpot_s"] = (time.monotonic() - prefill_done) / max(1, num_tokens - 1)
            outcome = "finished"
            yield FinishEvent(finish_reason=finish_reason, timings=Timings(**timings), **replicas)
        except Exception:
            outcome = "error"
            raise
        finally:
            if self.metrics is not None:
                for handle in used_replicas:
                    self.metrics.count_replica_request(handle.tier, handle.replica_id, outcome)
            # Whatever ended the request (finish, stop string, client gone, failure), nothing may stay held.
            if prefill_pending:
                self._bump(prefill, -1, num_tokens=num_prompt_tokens)
                prefill.actor.cancel.remote(spec.request_id)
            if decode is not None:
                self._bump(decode, -1)
                if stream is not None and not decode_released:
                    ray.cancel(stream)
                if not decode_released:
                    decode.actor.abort.remote(spec.request_id)  # frees its blocks; fire and forget

    async def _attempt_local(self, spec: RequestSpec, started: float, *, resumed: bool):
        """One attempt with the prompt prefilled on the decode replica itself: blocks and the queued prompt in one
        call (prefill_local, tried on decode replicas in policy order), then its token stream (generate_local), the
        first item carrying the first token and the prefill time. Failures raise _ReplicaFailed as in _attempt, so
        retries (prompt + tokens sent, output_offset) work the same; whatever ends it, nothing stays held."""
        decode, _ = await self._reserve(spec, None, local=True)
        self._bump(decode, +1)
        replicas = dict(prefill_replica=decode.replica_id, decode_replica=decode.replica_id)
        stream = None
        is_released = False  # True once the replica freed the request itself (its stream finished)
        outcome = "cancelled"  # for the metrics: unless it finishes or fails below (router stopped listening)
        timings = dict(ttft_s=0.0)
        first_at = None
        num_tokens = 0
        finish_reason = "error"
        try:
            stream = decode.actor.generate_local.remote(spec.request_id)
            try:
                async for item in _bounded_items(stream, self._replica_timeout_s):
                    if "prefill_s" in item:
                        first_at = time.monotonic()
                        timings.update(prefill_s=item["prefill_s"], ttft_s=first_at - started)
                    if item["finish_reason"]:
                        finish_reason = item["finish_reason"]
                        # The local prefill's chunks ran in the decode replica's steps: counted with its decode.
                        timings["decode_comm_bytes"] = item.get("comm_bytes", {})
                        is_released = True
                    if item["token_ids"]:
                        is_first = num_tokens == 0
                        num_tokens += len(item["token_ids"])
                        if is_first and not resumed:
                            yield TokenEvent(list(item["token_ids"]), timings=Timings(**timings), **replicas)
                        else:
                            yield TokenEvent(list(item["token_ids"]), **replicas)
                    if is_released:
                        break
            except (ray.exceptions.RayError, asyncio.TimeoutError) as exc:
                raise _ReplicaFailed(f"local prefill/decode on {decode.replica_id} failed: {_cause(exc)}",
                                     [decode]) from None
            if finish_reason == "error":
                raise _ReplicaFailed(f"decode replica {decode.replica_id} failed a step", [decode])
            if first_at is not None:
                timings["tpot_s"] = (time.monotonic() - first_at) / max(1, num_tokens - 1)
            outcome = "finished"
            yield FinishEvent(finish_reason=finish_reason, timings=Timings(**timings), **replicas)
        except Exception:
            outcome = "error"
            raise
        finally:
            if self.metrics is not None:
                self.metrics.count_replica_request(decode.tier, decode.replica_id, outcome)
            self._bump(decode, -1)
            if not is_released:
                if stream is not None:
                    ray.cancel(stream)
                decode.actor.abort.remote(spec.request_id)  # frees its blocks; fire and forget

    def _finishes(self, token: int, params) -> str | None:
        if token in params.stop_token_ids or (not params.ignore_eos and token in self._model_info.eos_token_ids):
            return "stop"
        if params.max_tokens <= 1:
            return "length"
        return None

    async def _check_replicas(self, handles: list[ReplicaHandle]) -> None:
        """After a failed attempt: replicas that do not answer a ping leave rotation until the health loop sees
        them back (Ray restarts a dead actor up to the tier's max_restarts)."""
        # A failed attempt is evidence: unless the replica answers at once from the same process, it leaves
        # rotation (the health loop brings it back when it answers again, restarted or not).
        for handle, (verdict, pid) in zip(handles, await asyncio.gather(*(_probe(h) for h in handles))):
            same_process = verdict == "alive" and pid == handle.info.get("pid", pid)
            if handle.state == "ready" and not same_process:
                self._take_out(handle, "failed a request")

    async def health_loop(self, interval_s: float = 1.0) -> None:
        """Runs for the router's lifetime. Each second every replica is probed:
          - its process is gone (the call fails): out of rotation at once;
          - it is alive but slow to answer (busy under a burst): it stays in rotation unless it has been slow for
            longer than router.replica_timeout_s;
          - it answers again after being out: if its process changed (Ray restarted it), it is started again (its
            KV server gets a new address) and counted as a restart; either way it comes back into rotation;
          - a multi-rank replica still dead after being taken out is restarted whole (Ray restarts only one-rank
            replicas: a lone rank cannot rejoin its mesh): every rank replaced in its placement group, the mesh
            formed again, at most <tier>.max_restarts times."""
        while True:
            handles = [h for tier in ("prefill", "decode") for h in self.deployment.replicas(tier)
                       if h.state in ("ready", "dead")]
            probes = await asyncio.gather(*(_probe(h) for h in handles))
            now = time.monotonic()
            for handle, (verdict, pid) in zip(handles, probes):
                if verdict == "slow":
                    slow_since = handle.info.setdefault("slow_since", now)
                    if handle.state == "ready" and now - slow_since > self._replica_timeout_s:
                        self._take_out(handle, f"has not answered for {now - slow_since:.0f} s")
                    continue
                handle.info.pop("slow_since", None)
                if verdict == "dead":
                    if handle.state == "ready":
                        self._take_out(handle, "failed its health check")
                    elif handle.workers:
                        self._restart_mesh(handle)
                    continue
                known_pid = handle.info.setdefault("pid", pid)
                if handle.state == "dead" or pid != known_pid:  # a new process: Ray restarted it
                    await self._bring_back(handle, restarted=pid != known_pid)
                    handle.info["pid"] = pid
            await asyncio.sleep(interval_s)

    def _restart_mesh(self, handle: ReplicaHandle) -> None:
        """Replace every rank of a dead multi-rank replica, in the background; it is `starting` meanwhile (out of
        rotation, not probed) and comes back through _bring_back once its new rank 0 has started."""
        section = handle.section or getattr(self.deployment.config, handle.tier)
        if handle.info.get("restarts", 0) >= section.max_restarts:
            if not handle.info.get("gave_up"):
                handle.info["gave_up"] = True
                log.error("replica %s is dead and has used its %d restart(s) (%s.max_restarts); it stays out",
                          handle.replica_id, section.max_restarts, handle.tier)
            return
        handle.state = "starting"
        log.warning("replica %s: restarting all %d ranks of its mesh", handle.replica_id, 1 + len(handle.workers))

        async def restart() -> None:
            try:
                info = await self.deployment.restart_replica(handle)
            except Exception as exc:
                log.warning("replica %s could not be restarted: %s", handle.replica_id, _cause(exc))
                handle.state = "dead"
                return
            handle.info.update(info)
            handle.info.pop("pid", None)  # the new process; _bring_back's ping records nothing stale
            if handle.state == "starting":
                handle.node_ip = info.get("node_ip", handle.node_ip)
                await self._bring_back(handle, restarted=True)

        task = asyncio.ensure_future(restart())
        _background.add(task)
        task.add_done_callback(_background.discard)

    def _take_out(self, handle: ReplicaHandle, why: str) -> None:
        handle.state = "dead"
        handle.info["failures"] = handle.info.get("failures", 0) + 1
        log.warning("replica %s %s; out of rotation", handle.replica_id, why)

    async def _bring_back(self, handle: ReplicaHandle, *, restarted: bool) -> None:
        if restarted:
            try:
                info = await asyncio.wait_for(handle.actor.start.remote(), 60)
            except Exception as exc:
                log.warning("replica %s answers but did not start: %s", handle.replica_id, _cause(exc))
                return
            handle.info.update(info)
            handle.node_ip = info.get("node_ip", handle.node_ip)  # Ray may have re-placed it on another node
            handle.info["restarts"] = handle.info.get("restarts", 0) + 1
        if restarted:  # a new process: whatever it had cached is gone
            self._prefill_policy.forget(handle)
        handle.state = "ready"
        log.warning("replica %s is back in rotation%s", handle.replica_id,
                    f" (restart {handle.info['restarts']})" if restarted else "")

    def inflight(self, replica_id: str) -> int:
        """Requests the router has in flight on a replica (used to drain it)."""
        return self._inflight.get(replica_id, 0)

    def _bump(self, handle: ReplicaHandle, delta: int, *, num_tokens: int = 0) -> None:
        """delta requests (and, for a prefill replica, delta * num_tokens prompt tokens) more in flight on it."""
        self._inflight[handle.replica_id] = max(0, self._inflight.get(handle.replica_id, 0) + delta)
        if num_tokens:
            queued = self._prefill_queued_tokens.get(handle.replica_id, 0) + delta * num_tokens
            self._prefill_queued_tokens[handle.replica_id] = max(0, queued)

    async def status(self) -> dict:
        config = self.deployment.config
        result = {"model": config.model.name, "prefill": [], "decode": []}
        for tier in ("prefill", "decode"):
            section = config.prefill if tier == "prefill" else config.decode
            handles = self.deployment.replicas(tier)
            stats = await asyncio.gather(*(_stats(h) for h in handles))
            for handle, stat in zip(handles, stats):
                state = handle.state if stat is not None else "dead"
                stat = stat or {}
                if tier == "decode" and stat:
                    handle.info["num_free_blocks"] = stat.get("num_free_blocks", 0)
                result[tier].append({
                    "id": handle.replica_id,
                    "state": state,
                    "node": handle.node_ip,
                    # the accelerator of the node it actually landed on; else what the tier asks for
                    "accelerator": str(getattr(handle, "accelerator", "") or
                                       section.resources.get("accelerator_type") or
                                       ("GPU" if section.resources.get("num_gpus") else "CPU")),
                    "mesh": _mesh_status(handle.section or section),
                    "load": {"num_queued": int(stat.get("num_queued", stat.get("num_waiting_kv", 0))),
                             "num_running": int(stat.get("num_running", 0))},
                    "kv_blocks": {"num_free": int(stat.get("num_free_blocks", 0)),
                                  "num_total": int(stat.get("num_total_blocks", 0))},
                    "failures": handle.info.get("failures", 0),
                    "restarts": handle.info.get("restarts", 0),
                })
        autoscaler = getattr(self, "autoscaler", None)  # set by serve.py when a tier autoscales
        if autoscaler is not None:
            result["autoscale"] = autoscaler.status()
        return result

    async def replica_stats(self) -> dict[str, list[dict]]:
        """Every replica's own counters, for the metrics poller (orchestrator/metrics.py): per tier a list of
        {"id", "state", "stats"}, stats being the replica's get_stats() dict, or {} if it did not answer."""
        result = {}
        for tier in ("prefill", "decode"):
            handles = list(self.deployment.replicas(tier))
            stats = await asyncio.gather(*(_stats(h) for h in handles))
            result[tier] = [{"id": h.replica_id, "state": h.state if s is not None else "dead", "stats": s or {}}
                            for h, s in zip(handles, stats)]
        return result


class _ReplicaFailed(Exception):
    """One attempt of a request failed because a replica died or stopped answering."""

    def __init__(self, message: str, handles: list[ReplicaHandle]):
        super().__init__(message)
        self.handles = handles


_background: set[asyncio.Task] = set()  # tasks nobody awaits, kept referenced until they finish


def _release_when_reserved(handle: ReplicaHandle, request_id: str, ref) -> None:
    async def release() -> None:
        try:
            await ref
        except Exception:
            return  # it was refused or the replica failed: nothing is held
        handle.actor.abort.remote(request_id)

    task = asyncio.ensure_future(release())
    _background.add(task)
    task.add_done_callback(_background.discard)


async def _probe(handle: ReplicaHandle, timeout_s: float = 2.0) -> tuple[str, int | None]:
    """("alive", pid of rank 0's process) | ("slow", None): no answer within timeout_s | ("dead", None)."""
    try:
        if not await asyncio.wait_for(handle.actor.ping.remote(), timeout_s):
            return "dead", None
        pid = await asyncio.wait_for(handle.actor.__ray_call__.remote(lambda self: os.getpid()), timeout_s)
        return "alive", pid
    except asyncio.TimeoutError:
        return "slow", None
    except Exception:  # the actor's process is gone, or ping raised (a rank of its mesh is gone)
        return "dead", None


async def _stats(handle: ReplicaHandle, timeout_s: float = 5.0) -> dict | None:
    try:
        return await asyncio.wait_for(handle.actor.get_stats.remote(), timeout_s)
    except Exception:
        return None


def _policy_options(section) -> PolicyOptions:
    return PolicyOptions(block_size=section.prefix_cache.block_size,
                         max_imbalance=section.prefix_routing.max_imbalance,
                         index_blocks=section.prefix_routing.index_blocks)


def _mesh_status(section) -> dict:
    """The mesh a replica runs (its own section: a tier's replicas differ during a rolling `pdcluster apply`)."""
    return {"tp": section.mesh.tp, "cp": section.mesh.cp, "pp": section.mesh.pp, "ep": section.mesh.ep}


def _mesh_of(handle: ReplicaHandle) -> MeshShape | None:
    """The mesh a replica was started with (None: the tier's, as the decode replicas were told at deploy time)."""
    if handle.section is None:
        return None
    mesh = handle.section.mesh
    return MeshShape(tp=mesh.tp, cp=mesh.cp, pp=mesh.pp, ep=mesh.ep)


async def _bounded_items(stream, timeout_s: float):
    """The items of a replica's streaming call, each within timeout_s of the one before: a replica that stops making
    progress (hung, or on a node that is gone but not yet declared dead) raises asyncio.TimeoutError instead of
    holding the request forever. The wait that can hang is the one for the generator's next ref (its next yield);
    the ref's value is bounded too."""
    iterator = stream.__aiter__()
    while True:
        try:
            ref = await asyncio.wait_for(iterator.__anext__(), timeout_s)
        except StopAsyncIteration:
            return
        yield await asyncio.wait_for(ref, timeout_s)


def _cause(exc: Exception) -> str:
    if isinstance(exc, asyncio.TimeoutError):  # its message is empty
        return "no progress within router.replica_timeout_s"
    cause = getattr(exc, "cause", None)
    if cause is not None:
        return str(cause)
    lines = str(exc).splitlines()
    return lines[0] if lines else type(exc).__name__
