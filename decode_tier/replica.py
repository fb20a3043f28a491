"""The decode replica: a Ray async actor around a `DecodeEngine`.

Who calls it: the router's cluster backend (orchestrator/cluster.py), in this order per request:
  1. `reserve(...)`  -> blocks are taken from the pool and every rank posts the receives of its share of the
     prompt's KV into them (with a lease);
  2. every prefill rank pushes its own KV shard straight to the decode ranks that need it (kv_transfer);
  3. `generate(...)` (a streaming generator) admits the sequence once every rank has all of its share and yields
     token batches until the request finishes; closing the stream or `abort(...)` frees the blocks at once.
Or, local prefill (colocated mode, or a prompt the router keeps off the prefill tier): `prefill_local(...)` takes the
blocks and queues the prompt, whose chunks the engine mixes into its decode steps; `generate_local(...)` streams the
first token and the rest the same way.
The engine step runs in one worker thread so the event loop stays free for reservations, KV receives and streams.

A replica is `world = pp * tp` ranks. This actor is rank 0: it owns the scheduler (the block table of every
request is the same on every rank), its own cache shard and KV server, and drives ranks 1..world-1
(decode_tier/rank_worker.py): per request over Ray calls (post, wait, abort of their receives), per step over the
control channel (mesh/rank_group.py: rank 0 broadcasts the `DecodePlan`, the logits rank returns the tokens).
Blocks are freed only after every rank's receiver has given them up, so no late KV write lands in a reused block.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from decode_tier.block_pool import OutOfBlocks
from decode_tier.engine import DecodeEngine
from decode_tier.kv_sizing import KVCacheSize
from decode_tier.rank_worker import CacheSettings, MeshStepPeers, join_and_load
from mesh.rank_device import actor_device, node_host
from kv_transfer.mesh_layout import PrefillLayout
from kv_transfer.mesh_session import MeshReservation, RankKVReceiver
from kv_transfer.transport import TransferStats, get_transport
from mesh import comm
from mesh.collectives_config import CollectivesConfig
from mesh.parallel import MeshShape
from mesh.rank_device import bind_thread, collective_backend, device_identity
from mesh.rank_group import open_rendezvous
from mesh.sampling import SamplingParams

log = logging.getLogger("pdcluster.decode")


class ReservationRefused(RuntimeError):
    """No room for the request on this replica (the router tries another or reports RESOURCE_EXHAUSTED)."""


@dataclass
class _Pending:
    kv_task: asyncio.Task  # resolves with transfer stats when every rank's share has landed
    reserved_at: float


class DecodeReplica:
    """Rank 0 of a decode replica (the whole replica when its mesh has one rank). `mesh`: this tier's degrees
    (pp, tp); `prefill_mesh`: the prefill tier's (pp, cp, tp), which the ranks post their receives for unless a
    reservation names another; `workers`: the actor handles of ranks 1..world-1, in rank order. `use_gpu`: the
    tier asks for num_gpus: every rank computes on its own GPU, the model's collectives use NCCL. `num_kv_blocks`
    None: sized at start-up from the device (decode_tier/kv_sizing.py: `gpu_memory_fraction` on GPU).
    `max_step_tokens`: tokens one engine step feeds, decode rows first, local-prefill chunks in the rest (None: the
    engine's default for the device)."""

    def __init__(self, *, replica_id: str, model_path: str, dtype: str, num_kv_blocks: int | None, block_size: int,
                 max_num_seqs: int, kv_backend: str, kv_token: str, lease_s: float, num_threads: int = 1,
                 checksum: bool = False, mesh: MeshShape | None = None, prefill_mesh: MeshShape | None = None,
                 workers: Sequence = (), use_gpu: bool = False, gpu_memory_fraction: float = 0.9,
                 max_step_tokens: int | None = None, collectives: CollectivesConfig | None = None):
        torch.set_num_threads(max(1, num_threads))
        self.replica_id = replica_id
        self._collectives = collectives
        self._model_path = model_path
        self._dtype = dtype
        self._cache_settings = CacheSettings(num_kv_blocks=num_kv_blocks, gpu_memory_fraction=gpu_memory_fraction,
                                             block_size=block_size, max_num_seqs=max_num_seqs,
                                             max_step_tokens=max_step_tokens)
        self._use_gpu = use_gpu
        self._device = torch.device("cpu")
        self._device_id = "cpu"
        self._cache_size: KVCacheSize | None = None
        self._block_size = block_size
        self._max_num_seqs = max_num_seqs
        self._kv_backend = kv_backend
        self._kv_token = kv_token
        self._lease_s = lease_s
        self._checksum = checksum
        self._shape = mesh or MeshShape()
        self._prefill_shape = prefill_mesh or MeshShape()
        self._workers = list(workers)
        if len(self._workers) != self._shape.world_size - 1:
            raise ValueError(f"{replica_id}: a {self._shape.world_size}-rank mesh needs "
                             f"{self._shape.world_size - 1} worker ranks, got {len(self._workers)}")
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode-step")
        self._pending: dict[str, _Pending] = {}
        self._streams: dict[str, asyncio.Queue] = {}
        # Local prefills queued by prefill_local whose stream generate_local has not claimed yet (id -> queued at).
        self._unclaimed_local: dict[str, float] = {}
        self._num_steps = 0
        self._started = False
        self._mesh_failure: str | None = None  # a step failed on a multi-rank mesh: ranks may be out of step

    async def start(self, host: str | None = None) -> dict:
        """Bring the mesh up (every rank joins the world, loads its shard, allocates its cache and starts its KV
        server), then start the engine loop; returns what the router needs to know about this replica.
        `host`: the address prefill ranks reach rank 0's KV server on (default: `node_host()`)."""
        if not self._started:
            host = host or node_host()
            self._engine, self._layout, worker_infos = await self._bring_up()
            self._server = get_transport(self._kv_backend).make_server(token=self._kv_token)
            self._kv_address = await self._server.start(host)
            self._receiver = RankKVReceiver(self._server, self._engine.kv_cache, self._layout, 0,
                                            checksum=self._checksum)
            self._kv_addresses = [self._kv_address] + [info["kv_address"] for info in worker_infos]
            self._wake = asyncio.Event()
            self._loop_task = asyncio.create_task(self._engine_loop())
            self._started = True
        return {"replica_id": self.replica_id, "kv_address": self._kv_address, "kv_addresses": self._kv_addresses,
                "node_ip": node_host(), "kv_cache": self._cache_size.description, **self.stats()}

    async def _bring_up(self):
        loop = asyncio.get_running_loop()
        self._device = actor_device(self._use_gpu)
        self._device_id = device_identity(self._device)
        bind_thread(self._device)  # the event loop packs, scatters and records events for the transport
        rendezvous = store = None
        worker_starts = []
        if self._workers:
            rendezvous, store = open_rendezvous(node_host(), self._shape.world_size,
                                                backend=collective_backend(self._device))
            worker_starts = [asyncio.ensure_future(w.start.remote(rendezvous)) for w in self._workers]
        joining = loop.run_in_executor(self._executor, functools.partial(
            join_and_load, self._model_path, self._dtype, self._shape, 0, rendezvous, self._cache_settings, store,
            device=self._device, collectives=self._collectives))
        # A worker that fails to start would leave rank 0 waiting for it: fail as soon as anything fails.
        done, _ = await asyncio.wait([joining, *worker_starts], return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                raise RuntimeError(f"{self.replica_id}: bringing up the mesh {self._shape} failed: "
                                   f"{task.exception()}") from task.exception()
        worker_infos = await asyncio.gather(*worker_starts)
        group, model, layout, self._cache_size = await joining
        # The start-up report: which device, and how many blocks and why (kv_sizing's precedence).
        log.info("decode replica %s (%d rank(s)) on %s, %s: %s", self.replica_id, self._shape.world_size,
                 self._device, self._dtype, self._cache_size.description)
        peers = MeshStepPeers(group, self._shape) if group is not None else None
        engine = DecodeEngine(model, num_blocks=self._cache_size.num_blocks, block_size=self._block_size,
                              max_num_seqs=self._max_num_seqs, peers=peers,
                              max_step_tokens=self._cache_settings.step_tokens_on(self._device))
        return engine, layout, worker_infos

    def _src_layout(self, prefill_mesh) -> PrefillLayout:
        shape = self._prefill_shape if prefill_mesh is None else prefill_mesh
        config = self._engine.model.config
        return PrefillLayout(num_layers=config.num_layers, num_kv_heads=config.num_kv_heads, pp=shape.pp,
                             cp=shape.cp, tp=shape.tp)

    async def reserve(self, request_id: str, num_prompt_tokens: int, params: SamplingParams, prefill_mesh=None):
        """Take blocks for the prompt plus max_tokens and post every rank's KV receives; returns the
        `MeshReservation` the prefill replica needs. `prefill_mesh` (anything with pp, cp, tp): the mesh of the
        prefill replica that will push (default: the prefill tier's at deploy time). Raises ReservationRefused
        when the pool cannot hold it."""
        if self._mesh_failure is not None:
            raise RuntimeError(f"decode replica {self.replica_id}: {self._mesh_failure}")
        try:
            block_ids = self._engine.reserve(request_id, num_prompt_tokens, params)
        except OutOfBlocks as exc:
            raise ReservationRefused(f"decode replica {self.replica_id}: {exc}") from None
        src = self._src_layout(prefill_mesh)
        try:
            targets = [self._receiver.post(request_id, src, block_ids, num_prompt_tokens, self._lease_s)]
            targets += await asyncio.gather(*(w.post_kv.remote(request_id, src, block_ids, num_prompt_tokens,
                                                               self._lease_s) for w in self._workers))
        except BaseException:
            await self._abort_ranks(request_id)
            self._engine.abort(request_id)
            raise
        first = self._engine.kv_cache[0]
        info = MeshReservation(request_id=request_id, num_tokens=num_prompt_tokens, block_ids=tuple(block_ids),
                               src=src, dst=self._layout, head_dim=first.shape[4],
                               dtype=str(first.dtype).removeprefix("torch."), targets=tuple(targets),
                               has_checksum=self._checksum, lease_s=self._lease_s)
        task = asyncio.create_task(self._await_kv(request_id))
        # A lease that expires while nobody awaits the task is handled inside _await_kv; mark it retrieved.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._pending[request_id] = _Pending(kv_task=task, reserved_at=time.monotonic())
        return info

    async def _await_kv(self, request_id: str) -> TransferStats:
        try:
            stats = await asyncio.gather(self._receiver.wait_complete(request_id),
                                         *(w.wait_kv.remote(request_id) for w in self._workers))
            # Safety net: KV that landed but is never claimed by generate() (router gone) is freed after a lease.
            asyncio.get_running_loop().call_later(self._lease_s, self._reclaim_unclaimed, request_id)
            return TransferStats(num_bytes=sum(s.num_bytes for s in stats), seconds=max(s.seconds for s in stats))
        except BaseException:
            # lease expired, aborted or cancelled on some rank: end it on every rank, then the blocks go back
            await self._abort_ranks(request_id)
            self._engine.abort(request_id)
            self._pending.pop(request_id, None)
            raise

    async def _abort_ranks(self, request_id: str) -> None:
        """End the request's receives on every rank; once this returns no late KV write lands in its blocks."""
        results = await asyncio.gather(self._receiver.abort(request_id),
                                       *(w.abort_kv.remote(request_id) for w in self._workers),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            # A rank could not confirm: its blocks may still be written. Keep the mesh out of service.
            self._mesh_failure = f"aborting KV receives of {request_id} failed: {errors[0]}"
            raise errors[0]

    def _reclaim_unclaimed(self, request_id: str) -> None:
        if request_id in self._pending:
            log.warning("decode replica %s: request %s never claimed its KV within the lease; freeing it",
                        self.replica_id, request_id)
            asyncio.ensure_future(self._release(request_id))

    async def generate(self, request_id: str, prompt_token_ids: list[int], first_token: int):
        """Streaming generator. First item: {"kv_bytes", "kv_wait_s"}; then {"token_ids": [...],
        "finish_reason": str | None} until a finish reason is set; the finishing item of a request that ran decode
        steps also has "comm_bytes" (kind -> payload bytes of the replica's collectives for it, all ranks)."""
        pending = self._pending.get(request_id)
        if pending is None:
            raise KeyError(f"request {request_id} has no reservation on decode replica {self.replica_id} "
                           "(expired or aborted)")
        is_claimed = False  # every rank's share landed and the receives ended: nothing left to abort remotely
        try:
            stats = await pending.kv_task
            is_claimed = True
            self._pending.pop(request_id, None)
            queue: asyncio.Queue = asyncio.Queue()
            self._streams[request_id] = queue
            early = self._engine.admit(request_id, list(prompt_token_ids), first_token)
            yield {"kv_bytes": int(stats.num_bytes), "kv_wait_s": time.monotonic() - pending.reserved_at}
            if early is not None:
                yield {"token_ids": [], "finish_reason": early.finish_reason}
                return
            self._wake.set()
            while True:
                item = _stream_item(await _drain(queue))
                await self._add_comm_bytes(request_id, item)
                yield item
                if item["finish_reason"]:
                    return
        finally:
            self._streams.pop(request_id, None)
            await self._release(request_id, is_claimed=is_claimed)

    async def _add_comm_bytes(self, request_id: str, item: dict) -> None:
        """On the item that finishes the request (not with an error: a rank may be gone), "comm_bytes": its bytes
        over the steps it ran, summed over the replica's ranks (mesh/comm.py). Each rank split every step by rows;
        the other ranks answer once they have closed the steps rank 0 ran."""
        tally = getattr(self._engine.runner, "comm_tally", None)  # None: the one-GPU runner (nothing moves)
        if not item["finish_reason"] or item["finish_reason"] == "error" or tally is None:
            return
        total = tally.take(request_id)
        if self._workers:
            try:
                shares = await asyncio.wait_for(asyncio.gather(
                    *(w.take_comm_bytes.remote(request_id, tally.num_steps) for w in self._workers)), 15)
            except Exception as exc:  # the request still finishes; its figure would be partial, so none is given
                log.warning("decode replica %s: comm bytes of %s not collected: %s", self.replica_id, request_id, exc)
                return
            for share in shares:
                comm.add_into(total, share)
        if total:
            item["comm_bytes"] = total

    async def prefill_local(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> dict:
        """Local prefill: take blocks for the prompt plus max_tokens and queue the prompt; the engine feeds it in
        chunks mixed into its decode steps and samples the first token with `params` (output index 0 plus
        params.output_offset, as the prefill tier does). Its tokens wait in a queue until `generate_local` claims
        them; unclaimed after the KV lease (router gone), the request is freed. Returns {"num_blocks"}. Raises
        ReservationRefused when the pool cannot hold it, ValueError for a duplicate id or an oversized prompt."""
        if self._mesh_failure is not None:
            raise RuntimeError(f"decode replica {self.replica_id}: {self._mesh_failure}")
        try:
            block_ids = self._engine.add_prompt(request_id, list(prompt_token_ids), params)
        except OutOfBlocks as exc:
            raise ReservationRefused(f"decode replica {self.replica_id}: {exc}") from None
        self._streams[request_id] = asyncio.Queue()
        self._unclaimed_local[request_id] = time.monotonic()
        asyncio.get_running_loop().call_later(self._lease_s, self._reclaim_unclaimed_local, request_id)
        self._wake.set()
        return {"num_blocks": len(block_ids)}

    def _reclaim_unclaimed_local(self, request_id: str) -> None:
        if self._unclaimed_local.pop(request_id, None) is not None:
            log.warning("decode replica %s: local prefill %s was never claimed within the lease; freeing it",
                        self.replica_id, request_id)
            self._streams.pop(request_id, None)
            self._engine.abort(request_id)

    async def generate_local(self, request_id: str):
        """Streaming generator for a request queued by `prefill_local`: {"token_ids": [...], "finish_reason": str |
        None} items until a finish reason is set; the item carrying the first token also has "prefill_s" (from
        prefill_local to the first token: waiting for step room included). Closing the stream or `abort(...)` frees
        the blocks at once."""
        queued_at = self._unclaimed_local.pop(request_id, None)
        queue = self._streams.get(request_id)
        if queued_at is None or queue is None:
            raise KeyError(f"request {request_id} has no local prefill on decode replica {self.replica_id} "
                           "(expired, aborted or already claimed)")
        try:
            is_first = True
            while True:
                item = _stream_item(await _drain(queue))
                if is_first:
                    item["prefill_s"] = time.monotonic() - queued_at
                    is_first = False
                await self._add_comm_bytes(request_id, item)
                yield item
                if item["finish_reason"]:
                    return
        finally:
            self._streams.pop(request_id, None)
            self._engine.abort(request_id)  # no KV receive to end: nothing comes over the network

    async def abort(self, request_id: str) -> bool:
        """Cancel a request in any state; its blocks are free when this returns. Idempotent."""
        return await self._release(request_id)

    async def _release(self, request_id: str, *, is_claimed: bool = False) -> bool:
        # Every rank's receiver is aborted first: once they return, no late KV write can land in the blocks, so
        # freeing them in the engine cannot hand a block to another request while a stale write is in flight.
        pending = self._pending.pop(request_id, None)
        if self._unclaimed_local.pop(request_id, None) is not None:
            self._streams.pop(request_id, None)  # a local prefill nobody streams yet: its queue goes too
        if is_claimed:
            await self._receiver.abort(request_id)  # a no-op: kept so the rule above reads the same everywhere
        else:
            await self._abort_ranks(request_id)
        if pending is not None:
            pending.kv_task.cancel()
        return self._engine.abort(request_id)

    def stats(self) -> dict:
        return {
            "replica_id": self.replica_id,
            "num_free_blocks": self._engine.num_free_blocks,
            "num_total_blocks": self._engine.num_total_blocks,
            "num_running": self._engine.num_running,
            "num_waiting_kv": len(self._pending),
            "num_prefilling": self._engine.num_prefilling,  # local prefills whose last chunk has not run
            "num_queued_prompt_tokens": self._engine.num_queued_prompt_tokens,
            "max_step_tokens": self._engine.max_step_tokens,
            "num_steps": self._num_steps,
            "device": str(self._device),
            "device_id": self._device_id,  # the GPU's UUID: tells apart GPUs that every actor calls cuda:0
            "num_kv_blocks": self._cache_size.num_blocks,
            "kv_blocks_source": self._cache_size.source,
        }

    async def get_stats(self) -> dict:
        return self.stats()

    async def ping(self) -> bool:
        """Fails when the replica cannot serve: a rank is gone or a step failed on some rank."""
        if self._mesh_failure is not None:
            raise RuntimeError(f"decode replica {self.replica_id}: {self._mesh_failure}")
        if self._workers:
            alive = await asyncio.wait_for(asyncio.gather(*(w.ping.remote() for w in self._workers)), 10)
            if not all(alive):
                raise RuntimeError(f"decode replica {self.replica_id}: a rank stopped serving steps")
        return True

    async def _engine_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._engine.has_work():
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                outputs = await loop.run_in_executor(self._executor, self._engine.step)
            except Exception as error:
                log.exception("decode step failed on replica %s", self.replica_id)
                if self._workers:  # ranks may now be out of step: stop taking work (ping fails, router moves on)
                    self._mesh_failure = f"a decode step failed: {error}"
                for request_id, queue in list(self._streams.items()):
                    self._engine.abort(request_id)
                    queue.put_nowait(_ErrorOutput(request_id))
                continue
            self._num_steps += 1
            for output in outputs:
                queue = self._streams.get(output.request_id)
                if queue is not None:
                    queue.put_nowait(output)


async def _drain(queue: asyncio.Queue) -> list:
    """Wait for at least one step output, then take every one already queued (one stream item per wake-up)."""
    outputs = [await queue.get()]
    while not queue.empty():
        outputs.append(queue.get_nowait())
    return outputs


def _stream_item(outputs: list) -> dict:
    finish_reason = next((o.finish_reason for o in outputs if o.finish_reason), None)
    # A stop token ends the stream but is not part of the output (as in the usual completion APIs).
    token_ids = [o.token_id for o in outputs if o.token_id >= 0 and o.finish_reason != "stop"]
    return {"token_ids": token_ids, "finish_reason": finish_reason}


@dataclass
class _ErrorOutput:
    request_id: str
    token_id: int = -1
    finish_reason: str = "error"


def threads_for(num_cpus: float) -> int:
    return max(1, math.floor(num_cpus))
