"""The prefill replica: a Ray async actor that batches waiting prompts, runs them through the model, streams each
layer's KV into the decode replica's reservation while the next layer computes, and samples the first token.

A replica is `world = pp * cp * tp` ranks. This actor is rank 0: it takes the requests, batches them and drives
ranks 1..world-1 (prefill_tier/rank_worker.py) over the control channel (mesh/rank_group.py). Each batch becomes a
`PrefillStep` that every rank runs (prefill_tier/rank_step.py); every rank pushes its own KV shard (its layers,
heads and CP token rows) to the decode ranks the transfer plan names; the rank holding the logits samples.

Who calls it: the router's cluster backend, once per request: `prefill(request_id, prompt, params, reservation)`
returns the first token and timings after every layer of KV has been delivered (or raises). `cancel` removes a
request that has not started; a request whose forward is running completes, and the decode side drops its KV.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kv_transfer.mesh_session import RankKVSender
from kv_transfer.transport import get_transport
from mesh import comm
from mesh.collectives_config import CollectivesConfig
from mesh.parallel import MeshShape
from mesh.rank_device import bind_thread, collective_backend, device_identity
from mesh.rank_group import open_rendezvous
from mesh.sampling import SamplingParams
from prefill_tier.batcher import PrefillBatcher
from prefill_tier.prefix_cache import PrefixCacheConfig, PrefixCacheIndex
from prefill_tier.rank_step import PrefillRankCore, PrefillStep, RankOutcome
from mesh.rank_device import actor_device, node_host
from prefill_tier.rank_worker import join_and_load

log = logging.getLogger("pdcluster.prefill")

@dataclass
class _Work:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    reservation: object | None  # kv_transfer MeshReservation; None: nothing to ship (max_tokens == 1)
    future: asyncio.Future
    enqueued_at: float = field(default_factory=time.monotonic)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids)


class PrefillReplica:
    """Rank 0 of a prefill replica (the whole replica when its mesh has one rank). `workers`: the actor handles of
    ranks 1..world-1 (prefill_tier/rank_worker.py), in rank order; `start` brings the mesh up. `use_gpu`: the tier
    asks for num_gpus: every rank computes on its own GPU and the model's collectives use NCCL."""

    def __init__(self, *, replica_id: str, model_path: str, dtype: str, max_batch_tokens: int, max_batch_seqs: int,
                 kv_backend: str, kv_token: str, layerwise: bool = True, num_threads: int = 1,
                 mesh: MeshShape | None = None, workers: Sequence = (), use_gpu: bool = False,
                 prefix_cache: PrefixCacheConfig | None = None, collectives: CollectivesConfig | None = None):
        """prefix_cache: keep prompts' KV on the ranks and reuse their longest cached block prefix
        (prefill_tier/prefix_cache.py); None or max_tokens == 0: off."""
        torch.set_num_threads(max(1, num_threads))
        self.replica_id = replica_id
        self._collectives = collectives
        self._model_path = model_path
        self._dtype = dtype
        self._kv_backend = kv_backend
        self._kv_token = kv_token
        self._layerwise = layerwise
        self._use_gpu = use_gpu
        self._device = torch.device("cpu")
        self._device_id = "cpu"
        self._shape = mesh or MeshShape()
        self._workers = list(workers)
        if len(self._workers) != self._shape.world_size - 1:
            raise ValueError(f"{replica_id}: a {self._shape.world_size}-rank mesh needs "
                             f"{self._shape.world_size - 1} worker ranks, got {len(self._workers)}")
        self._prefix_config = prefix_cache or PrefixCacheConfig()
        self._prefix_index = PrefixCacheIndex(self._prefix_config) if self._prefix_config.is_enabled else None
        self._batcher = PrefillBatcher(max_batch_tokens=max_batch_tokens, max_batch_seqs=max_batch_seqs)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefill-fwd")
        self._queued: dict[str, _Work] = {}  # by request id, while in the batcher
        self._num_batches = 0
        self._num_running = 0
        self._started = False
        self._group = None
        self._mesh_failure: str | None = None  # set when a step failed on some rank: the mesh may be out of step

    async def start(self) -> dict:
        """Bring the mesh up (every rank joins the world and loads its shard), then take requests."""
        if not self._started:
            self._group, self._core = await self._bring_up()
            self._wake = asyncio.Event()
            self._loop_task = asyncio.create_task(self._batch_loop())
            self._started = True
        return {"replica_id": self.replica_id, "node_ip": node_host(), **self.stats()}

    async def _bring_up(self):
        loop = asyncio.get_running_loop()
        self._device = actor_device(self._use_gpu)
        self._device_id = device_identity(self._device)
        bind_thread(self._device)  # the event loop packs each layer's KV and records events for the transport
        rendezvous = store = None
        worker_starts = []
        if self._workers:
            rendezvous, store = open_rendezvous(node_host(), self._shape.world_size,
                                                backend=collective_backend(self._device))
            worker_starts = [asyncio.ensure_future(w.start.remote(rendezvous)) for w in self._workers]
        joining = loop.run_in_executor(self._executor, functools.partial(
            join_and_load, self._model_path, self._dtype, self._shape, 0, rendezvous, store, device=self._device,
            collectives=self._collectives))
        # A worker that fails to start would leave rank 0 waiting for it: fail as soon as anything fails.
        done, _ = await asyncio.wait([joining, *worker_starts], return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                raise RuntimeError(f"{self.replica_id}: bringing up the mesh {self._shape} failed: "
                                   f"{task.exception()}") from task.exception()
        await asyncio.gather(joining, *worker_starts)
        group, model, layout = joining.result()
        log.info("prefill replica %s (%d rank(s)) on %s, %s", self.replica_id, self._shape.world_size, self._device,
                 self._dtype)
        client = get_transport(self._kv_backend).make_client(token=self._kv_token)
        self._client = client
        core = PrefillRankCore(model, RankKVSender(client, layout, 0), loop, layerwise=self._layerwise)
        return group, core

    async def prefill(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                      reservation=None) -> dict:
        """Queue the prompt; resolves with {"first_token", "queue_s", "prefill_s", "kv_s", "kv_bytes",
        "num_cached_tokens", "comm_bytes"} (num_cached_tokens: prompt tokens taken from the prefix cache instead of
        computed; comm_bytes: kind -> payload bytes of the replica's collectives for this request)."""
        future = asyncio.get_running_loop().create_future()
        work = _Work(request_id, list(prompt_token_ids), params, reservation, future)
        self._batcher.add(work)
        self._queued[request_id] = work
        self._wake.set()
        try:
            return await future
        except asyncio.CancelledError:
            if self._batcher.remove(request_id):
                self._queued.pop(request_id, None)
            raise

    async def cancel(self, request_id: str) -> bool:
        """Drop a queued request (returns False if it is already running or done)."""
        if not self._batcher.remove(request_id):
            return False
        work = self._queued.pop(request_id)
        if not work.future.done():
            work.future.cancel()
        return True

    def stats(self) -> dict:
        return {
            **self._prefix_stats(),
            "replica_id": self.replica_id,
            "num_queued": len(self._batcher),
            "num_queued_tokens": self._batcher.num_queued_tokens,
            "num_running": self._num_running,
            "num_batches": self._num_batches,
            "device": str(self._device),
            "device_id": self._device_id,  # the GPU's UUID: tells apart GPUs that every actor calls cuda:0
        }

    def _prefix_stats(self) -> dict:
        """Prefix cache counters (all zero when the cache is off); `prefix_cache_hits` counts requests that reused a
        cached prefix, `prefix_cache_cached_tokens` the prompt tokens they did not recompute."""
        index = self._prefix_index
        if index is None:
            return {"prefix_cache_enabled": False, "prefix_cache_hits": 0, "prefix_cache_misses": 0,
                    "prefix_cache_cached_tokens": 0, "prefix_cache_prompt_tokens": 0, "prefix_cache_evictions": 0,
                    "prefix_cache_entries": 0, "prefix_cache_stored_tokens": 0, "prefix_cache_max_tokens": 0}
        stats = index.stats
        return {"prefix_cache_enabled": True, "prefix_cache_hits": stats.num_hits,
                "prefix_cache_misses": stats.num_misses, "prefix_cache_cached_tokens": stats.num_cached_tokens,
                "prefix_cache_prompt_tokens": stats.num_prompt_tokens, "prefix_cache_evictions": stats.num_evictions,
                "prefix_cache_entries": index.num_entries, "prefix_cache_stored_tokens": index.num_stored_tokens,
                "prefix_cache_max_tokens": self._prefix_config.max_tokens}

    async def get_stats(self) -> dict:
        return self.stats()

    async def ping(self) -> bool:
        """Fails when the replica cannot serve: a rank is gone or a step failed on some rank."""
        if self._mesh_failure is not None:
            raise RuntimeError(f"{self.replica_id}: {self._mesh_failure}")
        if self._workers:
            alive = await asyncio.wait_for(asyncio.gather(*(w.ping.remote() for w in self._workers)), 10)
            if not all(alive):
                raise RuntimeError(f"{self.replica_id}: a rank stopped serving steps")
        return True

    async def _batch_loop(self) -> None:
        while True:
            batch = self._batcher.next_batch()
            for work in batch:
                self._queued.pop(work.request_id, None)
            batch = [w for w in batch if not w.future.done()]
            if not batch:
                self._wake.clear()
                if len(self._batcher) == 0:
                    await self._wake.wait()
                continue
            self._num_running = len(batch)
            try:
                await self._run_batch(batch)
            except Exception as exc:  # a failed batch fails its requests, never the replica
                log.exception("prefill batch failed on replica %s", self.replica_id)
                for work in batch:
                    if not work.future.done():
                        work.future.set_exception(RuntimeError(f"prefill failed: {exc}"))
            finally:
                self._num_running = 0
                self._num_batches += 1

    async def _run_batch(self, batch: list[_Work]) -> None:
        if self._mesh_failure is not None:
            raise RuntimeError(self._mesh_failure)
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        # Planned right before the step runs (one step at a time), so what the plan reuses is what the ranks hold.
        prefix = self._prefix_index.plan([w.prompt_token_ids for w in batch]) if self._prefix_index else None
        step = PrefillStep(request_ids=tuple(w.request_id for w in batch),
                           prompts=tuple(tuple(w.prompt_token_ids) for w in batch),
                           params=tuple(w.params for w in batch),
                           reservations=tuple(w.reservation for w in batch), prefix=prefix)
        try:
            outcomes = await loop.run_in_executor(self._executor, self._run_step, step)
        except BaseException:
            if prefix is not None:
                self._prefix_index.abort(prefix)
            raise
        failures = [f"rank {o.rank}: {o.failure}" for o in outcomes if o.failure]
        if prefix is not None:
            if failures:
                self._prefix_index.abort(prefix)
            else:
                self._prefix_index.commit(prefix)
        if failures:
            message = "a prefill step failed: " + "; ".join(failures)
            if self._workers:  # ranks may now be out of step: stop taking work (ping fails, the router moves on)
                self._mesh_failure = message
            raise RuntimeError(message)
        first_tokens = next((o.first_tokens for o in outcomes if o.first_tokens is not None), None)
        if first_tokens is None:
            raise RuntimeError("no rank sampled the first tokens (the logits rank reported none)")
        forward_s = max(o.forward_s for o in outcomes)
        kv_s = max(o.kv_s for o in outcomes)
        for index, (work, token) in enumerate(zip(batch, first_tokens)):
            if work.future.done():
                continue
            errors = [f"rank {o.rank}: {o.errors[work.request_id]}" for o in outcomes if work.request_id in o.errors]
            if errors:
                work.future.set_exception(RuntimeError(f"KV transfer failed: {'; '.join(errors)}"))
                continue
            work.future.set_result({
                "first_token": int(token),
                "queue_s": started - work.enqueued_at,
                "prefill_s": forward_s,
                "kv_s": kv_s if work.reservation is not None else 0.0,
                "kv_bytes": sum(o.kv_bytes.get(work.request_id, 0) for o in outcomes),
                # Summed over the replica's ranks, by kind (mesh/comm.py).
                "comm_bytes": functools.reduce(comm.add_into, (o.comm_bytes.get(work.request_id, {}) for o in outcomes),
                                               {}),
                "num_cached_tokens": step.num_cached(index),  # prompt tokens reused from the prefix cache
            })

    def _run_step(self, step: PrefillStep) -> list[RankOutcome]:
        """Compute thread: hand the step to every rank, run rank 0's share, collect every rank's outcome."""
        if self._group is not None:
            self._group.broadcast(step)
        try:
            mine = self._core.run(step)
        except Exception as error:  # the other ranks still report, so the channel stays in step
            log.exception("prefill step failed on %s rank 0", self.replica_id)
            mine = RankOutcome(rank=0, failure=f"{type(error).__name__}: {error}")
        if self._group is None:
            return [mine]
        return self._group.gather(mine)
