"""The prefill replica: a Ray async actor that batches waiting prompts, runs them through the model, streams each
layer's KV into the decode replica's reservation while the next layer computes, and samples the first token.

Who calls it: the router's cluster backend, once per request: `prefill(request_id, prompt, params, reservation)`
returns the first token and timings after every layer of KV has been delivered (or raises). `cancel` removes a
request that has not started; a request whose forward is running completes, and the decode side drops its KV.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import dataclass, field

import torch

from kv_transfer.session import KVSender
from kv_transfer.transport import get_transport
from mesh.model import AttentionBatch, CausalLM
from mesh.sampling import SamplingParams, sample
from prefill_tier.batcher import PrefillBatcher

log = logging.getLogger("pdcluster.prefill")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class _Work:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    reservation: object | None  # kv_transfer ReservationInfo; None: nothing to ship (max_tokens == 1)
    future: asyncio.Future
    enqueued_at: float = field(default_factory=time.monotonic)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids)


class PrefillReplica:
    def __init__(self, *, replica_id: str, model_path: str, dtype: str, max_batch_tokens: int, max_batch_seqs: int,
                 kv_backend: str, kv_token: str, layerwise: bool = True, num_threads: int = 1):
        torch.set_num_threads(max(1, num_threads))
        self.replica_id = replica_id
        self._kv_backend = kv_backend
        self._kv_token = kv_token
        self._layerwise = layerwise
        self._model = CausalLM.load(model_path, dtype=_DTYPES[dtype])
        self._batcher = PrefillBatcher(max_batch_tokens=max_batch_tokens, max_batch_seqs=max_batch_seqs)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefill-fwd")
        self._queued: dict[str, _Work] = {}  # by request id, while in the batcher
        self._num_batches = 0
        self._num_running = 0
        self._started = False

    async def start(self) -> dict:
        if not self._started:
            self._client = get_transport(self._kv_backend).make_client(token=self._kv_token)
            self._sender = KVSender(self._client)
            self._wake = asyncio.Event()
            self._loop_task = asyncio.create_task(self._batch_loop())
            self._started = True
        return {"replica_id": self.replica_id, **self.stats()}

    async def prefill(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                      reservation=None) -> dict:
        """Queue the prompt; resolves with {"first_token", "queue_s", "prefill_s", "kv_s", "kv_bytes"}."""
        if reservation is not None:
            await self._client.connect(reservation.address)  # once per decode replica; cached after
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
            "replica_id": self.replica_id,
            "num_queued": len(self._batcher),
            "num_queued_tokens": self._batcher.num_queued_tokens,
            "num_running": self._num_running,
            "num_batches": self._num_batches,
        }

    async def get_stats(self) -> dict:
        return self.stats()

    async def ping(self) -> bool:
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
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        shipping = [w for w in batch if w.reservation is not None]
        sends: list = []

        def push(layer: int, k: torch.Tensor, v: torch.Tensor, offsets: list[int]) -> None:
            # Called in the forward thread; the sends are issued on the event loop (the transport lives there).
            for work, offset in zip(batch, offsets):
                if work.reservation is None:
                    continue
                k_seq, v_seq = k[offset:offset + work.num_tokens], v[offset:offset + work.num_tokens]
                sends.append(asyncio.run_coroutine_threadsafe(
                    self._sender.push_layer(work.reservation, layer, k_seq, v_seq), loop))

        first_tokens, forward_s, held = await loop.run_in_executor(
            self._executor, self._forward, batch, push if self._layerwise else None)
        if not self._layerwise:
            for layer, (k, v, offsets) in enumerate(held):
                push(layer, k, v, offsets)
        kv_started = time.monotonic()
        results = await asyncio.gather(*(asyncio.wrap_future(f) for f in sends), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        finish = await asyncio.gather(*(self._sender.finish(w.reservation) for w in shipping),
                                      return_exceptions=True)
        finish_by_id = {w.request_id: f for w, f in zip(shipping, finish)}
        kv_s = time.monotonic() - kv_started
        for work, token in zip(batch, first_tokens):
            if work.future.done():
                continue
            outcome = finish_by_id.get(work.request_id)
            if isinstance(outcome, BaseException) or (errors and work.reservation is not None):
                failure = outcome if isinstance(outcome, BaseException) else errors[0]
                work.future.set_exception(RuntimeError(f"KV transfer failed: {failure}"))
                continue
            work.future.set_result({
                "first_token": int(token),
                "queue_s": started - work.enqueued_at,
                "prefill_s": forward_s,
                "kv_s": kv_s,
                "kv_bytes": int(outcome.num_bytes) if outcome is not None else 0,
            })

    def _forward(self, batch: list[_Work], push) -> tuple[list[int], float, list]:
        started = time.perf_counter()
        lengths = [w.num_tokens for w in batch]
        offsets = [sum(lengths[:i]) for i in range(len(lengths))]
        input_ids = torch.tensor([t for w in batch for t in w.prompt_token_ids], dtype=torch.long)
        positions = torch.cat([torch.arange(n, dtype=torch.long) for n in lengths])
        logits_indices = torch.tensor([o + n - 1 for o, n in zip(offsets, lengths)], dtype=torch.long)
        attn = AttentionBatch(query_lens=lengths, context_lens=[0] * len(batch), block_tables=None,
                              logits_indices=logits_indices)
        held: list = []

        def hook(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            if push is not None:
                push(layer, k, v, offsets)
            else:
                held.append((k, v, offsets))

        with torch.inference_mode():
            logits = self._model.forward(input_ids, positions, attn, None, layer_hook=hook)
            first = sample(logits, [w.params for w in batch], [0] * len(batch))
        return first.tolist(), time.perf_counter() - started, held
