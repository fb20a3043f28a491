"""Receive-side bookkeeping shared by every transport: which transfers are posted, where each chunk lands,
which writes are under way. Transports ask it before writing a chunk (`claim`) and report back (`landed` /
`chunk_failed`); `cancel` waits until no claimed write is still under way.

Everything runs on the server's event loop thread, so a claim and a cancel never interleave: a chunk is either
claimed before the cancel (and the cancel waits for it) or dropped after it.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kv_transfer.buffers import nbytes
from kv_transfer.errors import CancelIncomplete, TransferAborted
from kv_transfer.wire import MAX_CHUNKS_PER_LAYER, MAX_LAYERS, MAX_TRANSFER_ID, ChunkKey

logger = logging.getLogger(__name__)

_NUM_REMEMBERED_ENDED = 4096  # ended ids kept to avoid reusing them soon and to log their late chunks quietly


@dataclass(eq=False)
class _Transfer:
    transfer_id: int
    dst_per_layer: list[list[torch.Tensor]]
    future: asyncio.Future
    num_remaining: int
    claimed: set[tuple[int, int]] = field(default_factory=set)
    num_inflight: int = 0
    num_bytes: int = 0
    is_ended: bool = False  # completed, failed or cancelled: no new chunk is accepted
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set when no claimed write is under way


class RecvTable:
    """The posted transfers of one server. Call only from that server's event loop."""

    def __init__(self, *, cancel_timeout_s: float, server_name: str = "kv server"):
        self._cancel_timeout_s = cancel_timeout_s
        self._server_name = server_name
        self._transfers: dict[int, _Transfer] = {}
        self._recently_ended: OrderedDict[int, None] = OrderedDict()
        self._rng = random.Random()

    @property
    def num_live(self) -> int:
        return len(self._transfers)

    def new_transfer_id(self) -> int:
        # Random rather than sequential so that a stale sender of an old transfer is unlikely to hit a new one.
        for _ in range(1000):
            candidate = self._rng.randrange(MAX_TRANSFER_ID + 1)
            if candidate not in self._transfers and candidate not in self._recently_ended:
                return candidate
        raise RuntimeError("no free transfer id (too many live transfers)")

    def post(self, transfer_id: int, dst_per_layer: Sequence[Sequence[torch.Tensor]]) -> asyncio.Future:
        if not 0 <= transfer_id <= MAX_TRANSFER_ID:
            raise ValueError(f"transfer id {transfer_id} outside [0, {MAX_TRANSFER_ID}]")
        if transfer_id in self._transfers:
            raise ValueError(f"transfer id {transfer_id} is already posted")
        if not dst_per_layer or len(dst_per_layer) > MAX_LAYERS:
            raise ValueError(f"a transfer needs 1..{MAX_LAYERS} layers, got {len(dst_per_layer)}")
        layers = []
        for layer, tensors in enumerate(dst_per_layer):
            if not tensors or len(tensors) > MAX_CHUNKS_PER_LAYER:
                raise ValueError(f"layer {layer} needs 1..{MAX_CHUNKS_PER_LAYER} chunks, got {len(tensors)}")
            for chunk, tensor in enumerate(tensors):
                if not tensor.is_contiguous():
                    raise ValueError(f"destination of layer {layer} chunk {chunk} is not contiguous")
            layers.append(list(tensors))
        future = asyncio.get_running_loop().create_future()
        # Mark a failure as retrieved even if nobody awaits it (an abort with no waiter is normal).
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        transfer = _Transfer(
            transfer_id=transfer_id,
            dst_per_layer=layers,
            future=future,
            num_remaining=sum(len(t) for t in layers),
        )
        transfer.idle.set()
        self._transfers[transfer_id] = transfer
        return future

    def claim(self, key: ChunkKey, num_bytes: int) -> torch.Tensor | None:
        """The tensor to write this chunk into, or None when it must be dropped (read into scratch)."""
        transfer = self._transfers.get(key.transfer_id)
        if transfer is None:
            log = logger.debug if key.transfer_id in self._recently_ended else logger.warning
            log("%s: dropping chunk %s of a transfer that is not posted (%d bytes)", self._server_name, key, num_bytes)
            return None
        if transfer.is_ended:
            logger.debug("%s: dropping chunk %s of an ended transfer", self._server_name, key)
            return None
        if key.layer >= len(transfer.dst_per_layer) or key.chunk >= len(transfer.dst_per_layer[key.layer]):
            self._fail(transfer, f"unexpected chunk {key.chunk} of layer {key.layer} (sender and receiver layouts differ)")
            return None
        if (key.layer, key.chunk) in transfer.claimed:
            self._fail(transfer, f"chunk {key.chunk} of layer {key.layer} arrived twice")
            return None
        dst = transfer.dst_per_layer[key.layer][key.chunk]
        if num_bytes != nbytes(dst):
            self._fail(
                transfer,
                f"chunk {key.chunk} of layer {key.layer} has {num_bytes} bytes, expected {nbytes(dst)} "
                "(sender and receiver disagree on layout, dtype or shape)",
            )
            return None
        transfer.claimed.add((key.layer, key.chunk))
        transfer.num_inflight += 1
        transfer.idle.clear()
        return dst

    def landed(self, key: ChunkKey, num_bytes: int) -> None:
        """A claimed chunk is fully written."""
        transfer = self._transfers[key.transfer_id]  # a claimed write keeps its transfer in the table
        transfer.num_inflight -= 1
        if not transfer.is_ended:
            transfer.num_bytes += num_bytes
            transfer.num_remaining -= 1
            if transfer.num_remaining == 0:
                transfer.is_ended = True
                transfer.future.set_result(transfer.num_bytes)
        self._retire_if_idle(transfer)

    def chunk_failed(self, key: ChunkKey, reason: str) -> None:
        """A claimed chunk's write failed (peer died, connection closed): the transfer fails."""
        transfer = self._transfers[key.transfer_id]
        transfer.num_inflight -= 1
        self._fail(transfer, f"chunk {key.chunk} of layer {key.layer} failed: {reason}")
        self._retire_if_idle(transfer)

    async def cancel(self, transfer_id: int, reason: str = "cancelled") -> None:
        transfer = self._transfers.get(transfer_id)
        if transfer is None:
            return
        self._fail(transfer, reason)
        self._retire_if_idle(transfer)
        if transfer.num_inflight:
            try:
                await asyncio.wait_for(transfer.idle.wait(), self._cancel_timeout_s)
            except TimeoutError:
                raise CancelIncomplete(
                    f"{self._server_name}: {transfer.num_inflight} chunk write(s) of transfer {transfer_id} still under "
                    f"way after {self._cancel_timeout_s}s; do not reuse its blocks"
                ) from None

    async def cancel_all(self, reason: str) -> None:
        errors = []
        for transfer_id in list(self._transfers):
            try:
                await self.cancel(transfer_id, reason)
            except CancelIncomplete as error:
                errors.append(error)
        if errors:
            raise errors[0]

    def _fail(self, transfer: _Transfer, reason: str) -> None:
        transfer.is_ended = True
        if not transfer.future.done():
            transfer.future.set_exception(TransferAborted(None, reason))

    def _retire_if_idle(self, transfer: _Transfer) -> None:
        if transfer.num_inflight:
            return
        transfer.idle.set()
        if transfer.is_ended and self._transfers.get(transfer.transfer_id) is transfer:
            del self._transfers[transfer.transfer_id]
            self._recently_ended[transfer.transfer_id] = None
            while len(self._recently_ended) > _NUM_REMEMBERED_ENDED:
                self._recently_ended.popitem(last=False)
