"""UCX transport through ucxx: TCP or shared memory between host buffers, CUDA IPC / RDMA between GPUs.

Receiving: no receive is ever posted ahead of time. ucxx cannot cancel one posted tagged receive (its Python
request has no cancel; only a whole endpoint or worker can be cancelled), and a posted receive into KV blocks
could still be filled after an abort, when the blocks already belong to another request. Instead the server
polls UCX's unexpected-message queue with a mask for KV chunk tags (`tag_probe(remove=True)`), and for each
arriving chunk decides on the event loop, atomically with any abort: still wanted -> receive it straight into
its KV blocks (`recv_with_handle`, zero staging); not wanted -> receive it into scratch memory and drop it.
A cancel waits for the receives it already started (see recv_table). Cost: one probe (~5-15 us) per poll
interval while transfers are live, and up to one poll interval of extra latency per chunk.

Addresses look like `ucx://<host>:<port>`. See ucx_runtime for the event-loop and shutdown rules of ucxx.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Sequence

import numpy as np
import torch

from kv_transfer import ucx_runtime
from kv_transfer.buffers import nbytes, wire_buffer
from kv_transfer.errors import AuthenticationError, CancelIncomplete, TransportError
from kv_transfer.recv_table import RecvTable
from kv_transfer.transport import KVClient, KVServer, Transport, TransportOptions, register_transport
from kv_transfer.wire import (
    ACCEPT,
    KIND_MASK,
    KIND_SHIFT,
    KV_KIND,
    ChunkKey,
    decode_hello,
    decode_reply,
    decode_tag,
    encode_hello,
    encode_refuse,
    encode_tag,
)

ucxx = ucx_runtime.ucxx
logger = logging.getLogger(__name__)

SCHEME = "ucx://"
_PROBE_BATCH = 64  # chunks matched per poll before yielding to the loop
_REFUSE_LINGER_S = 1.0  # after a refusal, give the peer this long to read it before we close


def parse_address(address: str) -> tuple[str, int]:
    if not address.startswith(SCHEME):
        raise TransportError(f"not a UCX address: {address!r} (expected {SCHEME}<host>:<port>)")
    host, _, port = address[len(SCHEME) :].rpartition(":")
    if not host or not port.isdigit():
        raise TransportError(f"malformed UCX address {address!r} (expected {SCHEME}<host>:<port>)")
    return host.strip("[]"), int(port)


def _as_bytes(message) -> bytes:
    return np.asarray(message, dtype=np.uint8).tobytes()


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


class UcxKVServer(KVServer):
    def __init__(self, *, token: str, options: TransportOptions | None = None):
        if not token:
            raise ValueError("token must be a non-empty string")
        self._token = token.encode()
        self._options = options or TransportOptions()
        self._table = RecvTable(cancel_timeout_s=self._options.cancel_timeout_s, server_name="ucx kv server")
        self._address: str | None = None
        self._listener = None
        self._matcher: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._peers: dict[int, tuple[object, str]] = {}  # id(endpoint) -> (endpoint, peer name)
        self._tasks: set[asyncio.Task] = set()  # chunk receives and drains
        self._handshakes: set[asyncio.Task] = set()
        self._is_closing = False
        self._holds_runtime = False

    @property
    def address(self) -> str:
        if self._address is None:
            raise RuntimeError("server not started")
        return self._address

    @property
    def num_peers(self) -> int:
        return len(self._peers)

    async def start(self, host: str | None = None, port: int = 0) -> str:
        if self._address is not None:
            return self._address
        ucx_runtime.acquire()
        self._holds_runtime = True
        self._loop = asyncio.get_running_loop()
        self._listener = ucxx.create_listener(self._on_connect, port)
        advertised = host or ucxx.get_address()
        if ":" in advertised:
            advertised = f"[{advertised}]"
        self._address = f"{SCHEME}{advertised}:{self._listener.port}"
        self._matcher = self._loop.create_task(self._match_chunks())
        logger.info("ucx kv server listening at %s", self._address)
        return self._address

    def new_transfer_id(self) -> int:
        return self._table.new_transfer_id()

    def post_recv(self, transfer_id: int, dst_per_layer: Sequence[Sequence[torch.Tensor]]) -> asyncio.Future:
        if self._address is None or self._is_closing:
            raise TransportError("server is not running")
        for tensors in dst_per_layer:
            for tensor in tensors:
                wire_buffer(tensor)  # fail now, not when the chunk arrives, on unsupported memory
        future = self._table.post(transfer_id, dst_per_layer)
        self._wake.set()
        return future

    async def cancel(self, transfer_id: int) -> None:
        await self._table.cancel(transfer_id)

    async def close(self) -> None:
        if self._is_closing:
            return
        self._is_closing = True
        self._wake.set()
        if self._matcher is not None:
            await self._matcher
        try:
            await self._table.cancel_all("server closed")
        except CancelIncomplete as error:
            logger.error("%s", error)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self._options.cancel_timeout_s)
        for handshake in list(self._handshakes):
            handshake.cancel()
        if self._handshakes:
            await asyncio.wait(list(self._handshakes), timeout=self._options.handshake_timeout_s)
        for endpoint, _ in list(self._peers.values()):
            await _close_endpoint(endpoint)
        self._peers.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._holds_runtime:
            self._holds_runtime = False
            ucx_runtime.release()

    # --- connections -------------------------------------------------------------------------------

    async def _on_connect(self, endpoint) -> None:
        """Listener callback (ucxx runs it on our loop): authenticate the peer or drop it."""
        # Tracked so that close() can stop handshakes still under way (they never touch KV memory).
        task = asyncio.current_task()
        self._handshakes.add(task)
        try:
            await self._handshake(endpoint)
        finally:
            self._handshakes.discard(task)

    async def _handshake(self, endpoint) -> None:
        if self._is_closing:
            await _close_endpoint(endpoint)
            return
        try:
            hello = await asyncio.wait_for(endpoint.am_recv(), self._options.handshake_timeout_s)
            token, peer_name = decode_hello(_as_bytes(hello))
        except Exception as error:
            logger.warning("ucx kv server: dropped a connection without a valid hello (%s)", _describe(error))
            await _close_endpoint(endpoint)
            return
        if self._is_closing or not hmac.compare_digest(token.encode(), self._token):
            reason = "server closing" if self._is_closing else "wrong cluster token"
            logger.warning("ucx kv server %s: refused peer %r (%s)", self._address, peer_name, reason)
            try:
                await asyncio.wait_for(endpoint.am_send(np.frombuffer(encode_refuse(reason), np.uint8)), 1.0)
                await self._linger_until_closed(endpoint)
            except Exception:
                pass
            finally:
                await _close_endpoint(endpoint)
            return
        key = id(endpoint)
        self._peers[key] = (endpoint, peer_name)
        loop = self._loop

        def on_closed() -> None:  # runs on the UCX progress thread
            try:
                loop.call_soon_threadsafe(self._forget_peer, key)
            except RuntimeError:  # loop already closed
                pass

        endpoint.set_close_callback(on_closed)
        try:
            await endpoint.am_send(np.frombuffer(ACCEPT, np.uint8))
        except Exception as error:
            logger.warning("ucx kv server: peer %r left during the handshake (%s)", peer_name, _describe(error))
            self._forget_peer(key)
            return
        logger.info("ucx kv server %s: accepted peer %r", self._address, peer_name)

    def _forget_peer(self, key: int) -> None:
        entry = self._peers.pop(key, None)
        if entry is not None:
            logger.info("ucx kv server %s: peer %r disconnected", self._address, entry[1])

    async def _linger_until_closed(self, endpoint) -> None:
        deadline = self._loop.time() + _REFUSE_LINGER_S
        while not endpoint.closed and self._loop.time() < deadline:
            await asyncio.sleep(0.01)

    # --- chunks -----------------------------------------------------------------------------------

    async def _match_chunks(self) -> None:
        """Move arriving KV chunks from UCX's unexpected queue to their blocks (or to scratch)."""
        worker = ucx_runtime.context().worker
        kv_tag = ucxx.types.Tag(KV_KIND << KIND_SHIFT)
        kv_mask = ucxx.types.TagMask(KIND_MASK)
        while not self._is_closing:
            num_matched = 0
            try:
                while num_matched < _PROBE_BATCH:
                    probe = worker.tag_probe(kv_tag, kv_mask, remove=True)
                    if not probe.matched:
                        break
                    num_matched += 1
                    self._dispatch(probe)
            except Exception:  # keep matching: a dead matcher would leave every transfer to its lease
                logger.exception("ucx kv server %s: matching arriving chunks failed", self._address)
                num_matched = 0
            if num_matched == _PROBE_BATCH:
                await asyncio.sleep(0)
                continue
            is_busy = self._table.num_live > 0 or bool(self._tasks)
            interval = self._options.poll_interval_s if is_busy else self._options.idle_poll_interval_s
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), interval)
            except TimeoutError:
                pass

    def _dispatch(self, probe) -> None:
        length = probe.length
        key = decode_tag(probe.sender_tag.value)
        dst = self._table.claim(key, length) if key is not None else None
        if dst is None:
            self._spawn(self._drain(probe, length))
        else:
            self._spawn(self._receive(key, dst, probe, length))

    def _spawn(self, coroutine) -> None:
        task = self._loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _receive(self, key: ChunkKey, dst: torch.Tensor, probe, length: int) -> None:
        # Never cancelled from our side: UCX may be writing into dst until the request completes.
        try:
            await ucx_runtime.context().recv_with_handle(wire_buffer(dst), probe)
        except Exception as error:
            self._table.chunk_failed(key, _describe(error))
            return
        self._table.landed(key, length)

    async def _drain(self, probe, length: int) -> None:
        try:
            await ucx_runtime.context().recv_with_handle(np.empty(length, dtype=np.uint8), probe)
        except Exception as error:
            logger.debug("ucx kv server: draining a dropped chunk failed (%s)", _describe(error))


class UcxKVClient(KVClient):
    def __init__(self, *, token: str, options: TransportOptions | None = None):
        self._token = token
        self._options = options or TransportOptions()
        self._endpoints: dict[str, object] = {}
        self._connecting: dict[str, asyncio.Future] = {}
        self._holds_runtime = False
        self._is_closed = False

    async def connect(self, address: str) -> None:
        if self._is_closed:
            raise TransportError("client is closed")
        endpoint = self._endpoints.get(address)
        if endpoint is not None and not endpoint.closed:
            return
        pending = self._connecting.get(address)
        if pending is not None:
            await asyncio.shield(pending)
            return
        pending = asyncio.get_running_loop().create_future()
        pending.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._connecting[address] = pending
        try:
            self._endpoints[address] = await self._open(address)
            pending.set_result(None)
        except BaseException as error:
            pending.set_exception(error if isinstance(error, Exception) else TransportError("connect cancelled"))
            raise
        finally:
            del self._connecting[address]

    async def _open(self, address: str):
        host, port = parse_address(address)
        if not self._holds_runtime:
            ucx_runtime.acquire()
            self._holds_runtime = True
        timeout = self._options.connect_timeout_s
        try:
            endpoint = await asyncio.wait_for(ucxx.create_endpoint(host, port, connect_timeout=timeout), timeout)
        except Exception as error:
            raise TransportError(f"cannot connect to {address}: {_describe(error)}") from None
        try:
            hello = encode_hello(self._token, self._options.peer_name)
            await asyncio.wait_for(endpoint.am_send(np.frombuffer(hello, np.uint8)), timeout)
            reply = _as_bytes(await asyncio.wait_for(endpoint.am_recv(), timeout))
        except Exception as error:
            await _close_endpoint(endpoint)
            raise TransportError(f"handshake with {address} failed: {_describe(error)}") from None
        refusal = decode_reply(reply)
        if refusal is not None:
            await _close_endpoint(endpoint)
            raise AuthenticationError(f"{address} refused the connection: {refusal}")
        loop = asyncio.get_running_loop()

        endpoint_id = id(endpoint)

        def on_closed() -> None:  # runs on the UCX progress thread
            try:  # by id: a queued callback holding the endpoint would keep ucxx from resetting
                loop.call_soon_threadsafe(self._forget_endpoint, address, endpoint_id)
            except RuntimeError:  # loop already closed
                pass

        endpoint.set_close_callback(on_closed)
        return endpoint

    def _forget_endpoint(self, address: str, endpoint_id: int) -> None:
        if id(self._endpoints.get(address)) == endpoint_id:
            del self._endpoints[address]
            logger.info("ucx kv client: connection to %s closed", address)

    async def send(self, address: str, transfer_id: int, layer: int, tensors: Sequence[torch.Tensor]) -> int:
        messages = [
            (wire_buffer(tensor), encode_tag(ChunkKey(transfer_id=transfer_id, layer=layer, chunk=chunk)))
            for chunk, tensor in enumerate(tensors)
        ]
        await self.connect(address)
        endpoint = self._endpoints.get(address)
        if endpoint is None:
            raise TransportError(f"connection to {address} closed")
        # Wait for every send even if one fails: UCX reads the buffers until each request completes.
        results = await asyncio.gather(
            *(endpoint.send(buffer, tag=tag, force_tag=True) for buffer, tag in messages), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            self._forget_endpoint(address, id(endpoint))
            raise TransportError(f"sending layer {layer} to {address} failed: {_describe(errors[0])}")
        return sum(nbytes(tensor) for tensor in tensors)

    async def close(self) -> None:
        if self._is_closed:
            return
        self._is_closed = True
        endpoints, self._endpoints = list(self._endpoints.values()), {}
        for endpoint in endpoints:
            await _close_endpoint(endpoint)
        del endpoints
        if self._holds_runtime:
            self._holds_runtime = False
            ucx_runtime.release()


async def _close_endpoint(endpoint) -> None:
    try:
        await endpoint.close()
    except Exception as error:
        logger.debug("closing a ucx endpoint failed (%s)", _describe(error))


@register_transport("ucx")
class UcxTransport(Transport):
    @classmethod
    def make_server(cls, *, token: str, options: TransportOptions | None = None) -> UcxKVServer:
        return UcxKVServer(token=token, options=options)

    @classmethod
    def make_client(cls, *, token: str, options: TransportOptions | None = None) -> UcxKVClient:
        return UcxKVClient(token=token, options=options)
