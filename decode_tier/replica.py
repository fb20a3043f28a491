"""The decode replica: a Ray async actor around a `DecodeEngine`.

Who calls it: the router's cluster backend (orchestrator/cluster.py), in this order per request:
  1. `reserve(...)`  -> blocks are taken from the pool and the KV receiver waits for the prompt's KV (with a lease);
  2. the prefill replica pushes the KV straight into those blocks (kv_transfer);
  3. `generate(...)` (a streaming generator) admits the sequence once every layer has landed and yields token
     batches until the request finishes; closing the stream or `abort(...)` frees the blocks at once.
The engine step runs in one worker thread so the event loop stays free for reservations, KV receives and streams.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import math
import time
from dataclasses import dataclass

import torch

from decode_tier.block_pool import OutOfBlocks
from decode_tier.engine import DecodeEngine
from kv_transfer.session import KVReceiver, TransferAborted
from kv_transfer.transport import get_transport
from mesh.model import CausalLM
from mesh.sampling import SamplingParams

log = logging.getLogger("pdcluster.decode")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ReservationRefused(RuntimeError):
    """No room for the request on this replica (the router tries another or reports RESOURCE_EXHAUSTED)."""


@dataclass
class _Pending:
    kv_task: asyncio.Task  # resolves with transfer stats when every layer has landed
    reserved_at: float


class DecodeReplica:
    def __init__(self, *, replica_id: str, model_path: str, dtype: str, num_kv_blocks: int, block_size: int,
                 max_num_seqs: int, kv_backend: str, kv_token: str, lease_s: float, num_threads: int = 1,
                 checksum: bool = False):
        torch.set_num_threads(max(1, num_threads))
        self.replica_id = replica_id
        self._kv_backend = kv_backend
        self._kv_token = kv_token
        self._lease_s = lease_s
        self._checksum = checksum
        self._model = CausalLM.load(model_path, dtype=_DTYPES[dtype])
        self._engine = DecodeEngine(self._model, num_blocks=num_kv_blocks, block_size=block_size,
                                    max_num_seqs=max_num_seqs)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode-step")
        self._pending: dict[str, _Pending] = {}
        self._streams: dict[str, asyncio.Queue] = {}
        self._num_steps = 0
        self._started = False

    async def start(self, host: str | None = None) -> dict:
        """Start the KV server and the engine loop; returns what the router needs to know about this replica.
        `host`: the address prefill replicas reach the KV server on (default: this node's IP as Ray sees it)."""
        if not self._started:
            if host is None:
                import ray  # only the actor's own node knows its address

                # A local (one-machine) deployment keeps KV traffic on loopback (PDCLUSTER_KV_HOST, set by
                # orchestrator/deploy.py); on a real cluster the node's address is what other nodes reach.
                host = os.environ.get("PDCLUSTER_KV_HOST") or (
                    ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1")
            self._server = get_transport(self._kv_backend).make_server(token=self._kv_token)
            self._kv_address = await self._server.start(host)
            self._receiver = KVReceiver(self._server, self._engine.kv_cache, self._engine.block_size,
                                        checksum=self._checksum)
            self._wake = asyncio.Event()
            self._loop_task = asyncio.create_task(self._engine_loop())
            self._started = True
        return {"replica_id": self.replica_id, "kv_address": self._kv_address, **self.stats()}

    async def reserve(self, request_id: str, num_prompt_tokens: int, params: SamplingParams):
        """Take blocks for the prompt plus max_tokens and post the KV receives; returns the reservation info
        that the prefill replica needs. Raises ReservationRefused when the pool cannot hold it."""
        try:
            block_ids = self._engine.reserve(request_id, num_prompt_tokens, params)
        except OutOfBlocks as exc:
            raise ReservationRefused(f"decode replica {self.replica_id}: {exc}") from None
        try:
            info = self._receiver.reserve(request_id, block_ids, num_prompt_tokens, self._lease_s)
        except BaseException:
            self._engine.abort(request_id)
            raise
        task = asyncio.create_task(self._await_kv(request_id))
        self._pending[request_id] = _Pending(kv_task=task, reserved_at=time.monotonic())
        return info

    async def _await_kv(self, request_id: str):
        try:
            stats = await self._receiver.wait_complete(request_id)
            # Safety net: KV that landed but is never claimed by generate() (router gone) is freed after a lease.
            asyncio.get_running_loop().call_later(self._lease_s, self._reclaim_unclaimed, request_id)
            return stats
        except BaseException:
            # lease expired, aborted or cancelled: the blocks go back to the pool now
            self._engine.abort(request_id)
            self._pending.pop(request_id, None)
            raise

    def _reclaim_unclaimed(self, request_id: str) -> None:
        if request_id in self._pending:
            log.warning("decode replica %s: request %s never claimed its KV within the lease; freeing it",
                        self.replica_id, request_id)
            asyncio.ensure_future(self._release(request_id))

    async def generate(self, request_id: str, prompt_token_ids: list[int], first_token: int):
        """Streaming generator. First item: {"kv_bytes", "kv_wait_s"}; then {"token_ids": [...],
        "finish_reason": str | None} until a finish reason is set."""
        pending = self._pending.get(request_id)
        if pending is None:
            raise KeyError(f"request {request_id} has no reservation on decode replica {self.replica_id} "
                           "(expired or aborted)")
        try:
            stats = await pending.kv_task
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
                outputs = [await queue.get()]
                while not queue.empty():
                    outputs.append(queue.get_nowait())
                finish_reason = next((o.finish_reason for o in outputs if o.finish_reason), None)
                # A stop token ends the stream but is not part of the output (as in the usual completion APIs).
                token_ids = [o.token_id for o in outputs if o.token_id >= 0 and o.finish_reason != "stop"]
                yield {"token_ids": token_ids, "finish_reason": finish_reason}
                if finish_reason:
                    return
        finally:
            self._streams.pop(request_id, None)
            await self._release(request_id)

    async def abort(self, request_id: str) -> bool:
        """Cancel a request in any state; its blocks are free when this returns. Idempotent."""
        return await self._release(request_id)

    async def _release(self, request_id: str) -> bool:
        # The receiver is aborted first: once it returns, no late KV write can land in the blocks, so freeing
        # them in the engine cannot hand a block to another request while a stale write is still in flight.
        pending = self._pending.pop(request_id, None)
        await self._receiver.abort(request_id)
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
            "num_steps": self._num_steps,
        }

    async def get_stats(self) -> dict:
        return self.stats()

    async def ping(self) -> bool:
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
            except Exception:
                log.exception("decode step failed on replica %s", self.replica_id)
                for request_id, queue in list(self._streams.items()):
                    self._engine.abort(request_id)
                    queue.put_nowait(_ErrorOutput(request_id))
                continue
            self._num_steps += 1
            for output in outputs:
                queue = self._streams.get(output.request_id)
                if queue is not None:
                    queue.put_nowait(output)


@dataclass
class _ErrorOutput:
    request_id: str
    token_id: int = -1
    finish_reason: str = "error"


def threads_for(num_cpus: float) -> int:
    return max(1, math.floor(num_cpus))
