"""Per-request KV transfer protocol between a prefill replica and a decode replica.

Decode side (`KVReceiver`, owner of the paged KV cache, on the transport server's event loop):

    receiver = KVReceiver(server, engine.kv_cache, block_size)
    info = receiver.reserve(request_id, block_ids, num_prompt_tokens, lease_s=30.0)   # -> the router
    stats = await receiver.wait_complete(request_id)   # every layer landed: admit the sequence
    # or: raises TransferAborted (abort, lease expiry, sender failure, layout/checksum mismatch): free the blocks
    await receiver.abort(request_id)                   # client cancel etc.; blocks reusable once it returns

Prefill side (`KVSender`, on the transport client's event loop; from the model's layer hook on a compute
thread use `asyncio.run_coroutine_threadsafe(sender.push_layer(...), loop)`):

    await sender.push_layer(info, layer, k, v)   # k, v: [num_tokens, kv_heads, head_dim]; returns once queued
    stats = await sender.finish(info)            # all layers sent (raises TransferAborted otherwise)

Guarantee the decode replica relies on: when `wait_complete` raises `TransferAborted` or `abort` returns, no
byte of that transfer lands in its blocks anymore, so they can be handed to another request at once. If the
transport cannot confirm that within its bound they raise `CancelIncomplete` instead: do not reuse the blocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kv_transfer.checksum import checksum_tensor, empty_checksum_tensor, layer_checksum
from kv_transfer.errors import TransferAborted
from kv_transfer.layout import Chunk, chunk_plan, chunk_views, pack_chunks
from kv_transfer.transport import KVClient, KVServer, TransferStats
from kv_transfer.wire import MAX_LAYERS

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ReservationInfo:
    """Everything a prefill replica needs to push one request's KV; made by `KVReceiver.reserve`, carried by
    the router (picklable). `block_ids` may be longer than the prompt needs (room for generated tokens)."""

    request_id: str
    transfer_id: int
    address: str
    block_ids: tuple[int, ...]
    num_tokens: int
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name without "torch.", e.g. "float32"
    has_checksum: bool = False

    def chunks(self) -> tuple[Chunk, ...]:
        return chunk_plan(self.block_ids, self.num_tokens, self.block_size)


@dataclass(eq=False)
class _Reservation:
    info: ReservationInfo
    landed: asyncio.Future  # the transport's: bytes, or TransferAborted
    reserved_at: float
    lease_timer: asyncio.TimerHandle | None = None
    checksums: list[torch.Tensor] = field(default_factory=list)  # received per-layer checksums (debug)
    abort_reason: str | None = None  # set by abort / lease expiry
    ending: asyncio.Task | None = None  # the transport cancel, once started


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class KVReceiver:
    """Decode side: reservations of KV blocks that a prefill replica fills layer by layer.

    `kv_cache` is the decode engine's cache, one `[num_blocks, 2, block_size, num_kv_heads, head_dim]` contiguous
    tensor per layer; chunks are received straight into it. Call every method on the server's event loop.
    """

    def __init__(self, server: KVServer, kv_cache: Sequence[torch.Tensor], block_size: int, *, checksum: bool = False):
        if not kv_cache:
            raise ValueError("kv_cache has no layers")
        if len(kv_cache) > MAX_LAYERS:
            raise ValueError(f"at most {MAX_LAYERS} layers can be transferred, the cache has {len(kv_cache)}")
        first = kv_cache[0]
        if first.dim() != 5 or first.shape[1] != 2 or first.shape[2] != block_size:
            raise ValueError(
                f"kv_cache layers must be [num_blocks, 2, block_size={block_size}, heads, head_dim], "
                f"got {tuple(first.shape)}"
            )
        for layer, tensor in enumerate(kv_cache):
            if tensor.shape != first.shape or tensor.dtype != first.dtype or tensor.device != first.device:
                raise ValueError(f"kv_cache layer {layer} differs from layer 0 in shape, dtype or device")
            if not tensor.is_contiguous():
                raise ValueError(f"kv_cache layer {layer} is not contiguous")
        self._server = server
        self._kv_cache = list(kv_cache)
        self._block_size = block_size
        self._has_checksum = checksum
        self._reservations: dict[str, _Reservation] = {}

    @property
    def num_pending(self) -> int:
        return len(self._reservations)

    def is_pending(self, request_id: str) -> bool:
        return request_id in self._reservations

    def reserve(self, request_id: str, block_ids: Sequence[int], num_tokens: int, lease_s: float) -> ReservationInfo:
        """Post receives for every layer of the request's first `num_tokens` tokens into `block_ids` and start
        its lease: if not every layer has landed `lease_s` seconds from now, the transfer is aborted."""
        if request_id in self._reservations:
            raise ValueError(f"request {request_id!r} already has a pending reservation")
        if not lease_s > 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s}")
        num_blocks = self._kv_cache[0].shape[0]
        if any(not 0 <= b < num_blocks for b in block_ids):
            raise ValueError(f"block ids must be in [0, {num_blocks}), got {list(block_ids)}")
        chunks = chunk_plan(block_ids, num_tokens, self._block_size)
        device = self._kv_cache[0].device
        checksums = [empty_checksum_tensor(device) for _ in self._kv_cache] if self._has_checksum else []
        dst_per_layer = []
        for layer, layer_cache in enumerate(self._kv_cache):
            views = chunk_views(layer_cache, chunks)
            dst_per_layer.append(views + [checksums[layer]] if checksums else views)
        transfer_id = self._server.new_transfer_id()
        landed = self._server.post_recv(transfer_id, dst_per_layer)
        shape = self._kv_cache[0].shape
        info = ReservationInfo(
            request_id=request_id,
            transfer_id=transfer_id,
            address=self._server.address,
            block_ids=tuple(int(b) for b in block_ids),
            num_tokens=num_tokens,
            block_size=self._block_size,
            num_layers=len(self._kv_cache),
            num_kv_heads=shape[3],
            head_dim=shape[4],
            dtype=_dtype_name(self._kv_cache[0].dtype),
            has_checksum=self._has_checksum,
        )
        reservation = _Reservation(info=info, landed=landed, reserved_at=time.monotonic(), checksums=checksums)
        loop = asyncio.get_running_loop()
        reservation.lease_timer = loop.call_later(lease_s, self._expire, reservation, lease_s)
        landed.add_done_callback(lambda _: reservation.lease_timer.cancel())
        self._reservations[request_id] = reservation
        return info

    async def wait_complete(self, request_id: str) -> TransferStats:
        """Wait until every layer of the request landed; the reservation then ends (call once).

        Raises `TransferAborted` (after making sure nothing more lands) when it was aborted, its lease expired,
        the sender failed or sent something that does not match the reservation."""
        reservation = self._reservations.get(request_id)
        if reservation is None:
            raise KeyError(f"no pending reservation for request {request_id!r}")
        try:
            num_bytes = await asyncio.shield(reservation.landed)
        except TransferAborted as error:
            reason = reservation.abort_reason or error.reason
            try:
                await self._end(reservation)  # may raise CancelIncomplete: then the blocks must not be reused
            finally:
                self._forget(reservation)
            raise TransferAborted(request_id, reason) from None
        seconds = time.monotonic() - reservation.reserved_at
        self._forget(reservation)
        if reservation.abort_reason is not None:  # aborted after the last chunk landed but before we resumed
            raise TransferAborted(request_id, reservation.abort_reason)
        if reservation.checksums:
            self._verify_checksums(reservation)
        return TransferStats(num_bytes=num_bytes, seconds=seconds)

    async def abort(self, request_id: str, reason: str = "aborted by the decode replica") -> bool:
        """End the reservation; once this returns nothing more lands in its blocks. False if none was pending."""
        reservation = self._reservations.get(request_id)
        if reservation is None:
            return False
        if reservation.abort_reason is None:
            reservation.abort_reason = reason
        try:
            await self._end(reservation)
        finally:
            self._forget(reservation)
        return True

    async def close(self) -> None:
        """Abort every pending reservation (the server itself is closed by its owner)."""
        for request_id in list(self._reservations):
            await self.abort(request_id, "receiver closed")

    def _expire(self, reservation: _Reservation, lease_s: float) -> None:
        if reservation.landed.done() or reservation.ending is not None:
            return
        reason = f"lease of {lease_s:g}s expired before every layer arrived"
        logger.warning("KV transfer of request %r: %s", reservation.info.request_id, reason)
        if reservation.abort_reason is None:
            reservation.abort_reason = reason
        self._start_ending(reservation)

    def _start_ending(self, reservation: _Reservation) -> asyncio.Task:
        if reservation.ending is None:
            reservation.lease_timer.cancel()
            reservation.ending = asyncio.get_running_loop().create_task(self._server.cancel(reservation.info.transfer_id))
            reservation.ending.add_done_callback(lambda t: t.cancelled() or t.exception())
        return reservation.ending

    async def _end(self, reservation: _Reservation) -> None:
        # Shielded: a caller giving up must not interrupt the cancel that protects the blocks.
        await asyncio.shield(self._start_ending(reservation))

    def _forget(self, reservation: _Reservation) -> None:
        request_id = reservation.info.request_id
        if self._reservations.get(request_id) is reservation:
            del self._reservations[request_id]

    def _verify_checksums(self, reservation: _Reservation) -> None:
        chunks = reservation.info.chunks()
        for layer, received in enumerate(reservation.checksums):
            expected = int(received.item())
            actual = layer_checksum(chunk_views(self._kv_cache[layer], chunks))
            if actual != expected:
                raise TransferAborted(
                    reservation.info.request_id,
                    f"checksum mismatch in layer {layer}: sender {expected:#010x}, blocks {actual:#010x}",
                )


@dataclass(eq=False)
class _Push:
    info: ReservationInfo
    chunks: tuple[Chunk, ...]
    first_push_at: float
    layers: set[int] = field(default_factory=set)
    sends: list[asyncio.Task] = field(default_factory=list)


class KVSender:
    """Prefill side: ships each layer's K and V into a reservation as soon as it is computed.

    Call every method on the client's event loop (from a compute thread: `asyncio.run_coroutine_threadsafe`).
    """

    def __init__(self, client: KVClient):
        self._client = client
        self._pushes: dict[tuple[str, int, str], _Push] = {}

    async def connect(self, address: str) -> None:
        """Optional warm-up: connect before the first push (otherwise the first push connects)."""
        await self._client.connect(address)

    async def push_layer(self, info: ReservationInfo, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Pack layer `layer` (k, v: `[info.num_tokens, num_kv_heads, head_dim]`) into the reservation's chunks
        and queue their sends; returns without waiting for the network. The tensors may be reused afterwards.
        Errors of the sends surface in `finish`. CUDA tensors: packing runs on this thread's current stream,
        so the work that produced k and v must be complete or ordered before it (e.g. synchronize the
        compute stream or record an event and wait on it before handing the layer over)."""
        if not 0 <= layer < info.num_layers:
            raise ValueError(f"layer {layer} outside [0, {info.num_layers})")
        push = self._pushes.get(_push_key(info))
        if push is not None and layer in push.layers:
            raise ValueError(f"layer {layer} of request {info.request_id!r} was already pushed")
        expected_shape = (info.num_tokens, info.num_kv_heads, info.head_dim)
        for name, tensor in (("k", k), ("v", v)):
            if tuple(tensor.shape) != expected_shape:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, the reservation expects {expected_shape}")
            if _dtype_name(tensor.dtype) != info.dtype:
                raise ValueError(f"{name} is {_dtype_name(tensor.dtype)}, the reservation expects {info.dtype}")
        if push is None:
            push = _Push(info=info, chunks=info.chunks(), first_push_at=time.monotonic())
            self._pushes[_push_key(info)] = push
        chunks = pack_chunks(k, v, push.chunks, info.block_size)
        if info.has_checksum:
            chunks.append(checksum_tensor(layer_checksum(chunks), device=k.device))
        push.layers.add(layer)
        send = asyncio.get_running_loop().create_task(self._send(info, layer, chunks))
        send.add_done_callback(lambda t: t.cancelled() or t.exception())
        push.sends.append(send)

    async def _send(self, info: ReservationInfo, layer: int, chunks: list[torch.Tensor]) -> int:
        if chunks[0].is_cuda:
            # UCX reads device memory outside torch's streams: the packing kernels must be done first.
            await _until_device_done(chunks[0].device)
        return await self._client.send(info.address, info.transfer_id, layer, chunks)

    async def finish(self, info: ReservationInfo, timeout_s: float | None = 60.0) -> TransferStats:
        """Wait for every send of the request; raises `TransferAborted` if a layer was never pushed, a send
        failed, or the sends did not complete within `timeout_s` (None: no bound)."""
        push = self._pushes.pop(_push_key(info), None)
        if push is None:
            raise TransferAborted(info.request_id, "finish() without any push_layer()")
        done, pending = await asyncio.wait(push.sends, timeout=timeout_s) if push.sends else (set(), set())
        if pending:
            # Not cancelled: each send owns its tensors until UCX is done reading them.
            raise TransferAborted(info.request_id, f"{len(pending)} layer send(s) did not complete within {timeout_s}s")
        for send in push.sends:
            if send.exception() is not None:
                raise TransferAborted(info.request_id, f"sending KV failed: {send.exception()}")
        missing = sorted(set(range(info.num_layers)) - push.layers)
        if missing:
            raise TransferAborted(info.request_id, f"layers {missing} were never pushed")
        num_bytes = sum(send.result() for send in push.sends)
        return TransferStats(num_bytes=num_bytes, seconds=time.monotonic() - push.first_push_at)

    def abort(self, info: ReservationInfo) -> None:
        """Forget the request (prefill cancelled). Sends already queued finish in the background; the
        receiver drops them if it no longer wants them."""
        self._pushes.pop(_push_key(info), None)

    @property
    def num_pending(self) -> int:
        return len(self._pushes)


async def _until_device_done(device: torch.device) -> None:
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(device))
    while not done.query():
        await asyncio.sleep(0.0001)


def _push_key(info: ReservationInfo) -> tuple[str, int, str]:
    return (info.address, info.transfer_id, info.request_id)
