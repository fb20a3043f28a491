"""In-process transport: same interface and receive semantics as `ucx`, for unit tests of the tiers.

Servers register in a per-process table under `local://<n>`. A client and a server may live on the same event
loop or on two loops of two threads; a chunk is copied on the server's loop. `delivery_delay_s` makes each
claimed chunk stay "under way" for a while before it is written, the way a large network receive does, so
tests can abort in the middle of a transfer.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import threading
from collections.abc import Sequence

import torch

from kv_transfer.buffers import byte_view, nbytes
from kv_transfer.errors import AuthenticationError, TransportError
from kv_transfer.recv_table import RecvTable
from kv_transfer.transport import KVClient, KVServer, Transport, TransportOptions, register_transport
from kv_transfer.wire import ChunkKey, encode_tag

logger = logging.getLogger(__name__)

SCHEME = "local://"
_servers: dict[str, "LocalKVServer"] = {}
_servers_lock = threading.Lock()
_next_server_number = itertools.count()


class LocalKVServer(KVServer):
    def __init__(self, *, token: str, options: TransportOptions | None = None, delivery_delay_s: float = 0.0):
        if not token:
            raise ValueError("token must be a non-empty string")
        self._token = token
        self._options = options or TransportOptions()
        self._delivery_delay_s = delivery_delay_s
        self._address: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._table = RecvTable(cancel_timeout_s=self._options.cancel_timeout_s, server_name="local kv server")
        self._is_closed = False

    @property
    def address(self) -> str:
        if self._address is None:
            raise RuntimeError("server not started")
        return self._address

    async def start(self, host: str | None = None, port: int = 0) -> str:
        if self._address is not None:
            return self._address
        self._loop = asyncio.get_running_loop()
        with _servers_lock:
            self._address = f"{SCHEME}{next(_next_server_number)}"
            _servers[self._address] = self
        return self._address

    def new_transfer_id(self) -> int:
        return self._table.new_transfer_id()

    def post_recv(self, transfer_id: int, dst_per_layer: Sequence[Sequence[torch.Tensor]]) -> asyncio.Future:
        if self._is_closed:
            raise TransportError("server is closed")
        return self._table.post(transfer_id, dst_per_layer)

    async def cancel(self, transfer_id: int) -> None:
        await self._table.cancel(transfer_id)

    async def close(self) -> None:
        if self._is_closed:
            return
        self._is_closed = True
        with _servers_lock:
            _servers.pop(self._address, None)
        await self._table.cancel_all("server closed")

    # Called by clients, on this server's loop.
    def _authenticate(self, token: str, peer_name: str) -> None:
        if self._is_closed:
            raise TransportError(f"{self._address} is closed")
        if not hmac.compare_digest(token.encode(), self._token.encode()):
            logger.warning("local kv server %s: refused peer %r (wrong cluster token)", self._address, peer_name)
            raise AuthenticationError(f"{self._address} refused the connection: wrong cluster token")

    async def _deliver(self, key: ChunkKey, source: torch.Tensor) -> None:
        if self._is_closed:
            raise TransportError(f"{self._address} is closed")
        size = nbytes(source)
        dst = self._table.claim(key, size)
        if dst is None:
            return  # dropped, as the UCX server drains it
        try:
            if self._delivery_delay_s:
                await asyncio.sleep(self._delivery_delay_s)
            byte_view(dst).copy_(byte_view(source))
        except BaseException as error:
            self._table.chunk_failed(key, repr(error))
            raise
        self._table.landed(key, size)


class LocalKVClient(KVClient):
    def __init__(self, *, token: str, options: TransportOptions | None = None):
        self._token = token
        self._options = options or TransportOptions()
        self._connected: dict[str, LocalKVServer] = {}
        self._is_closed = False

    async def connect(self, address: str) -> None:
        if self._is_closed:
            raise TransportError("client is closed")
        if address in self._connected:
            return
        if not address.startswith(SCHEME):
            raise TransportError(f"local transport cannot reach {address!r} (expected {SCHEME}<n>)")
        with _servers_lock:
            server = _servers.get(address)
        if server is None:
            raise TransportError(f"no local kv server at {address}")
        await _on_loop(server._loop, _call_async(server._authenticate, self._token, self._options.peer_name))
        self._connected[address] = server

    async def send(self, address: str, transfer_id: int, layer: int, tensors: Sequence[torch.Tensor]) -> int:
        await self.connect(address)
        server = self._connected[address]
        total = 0
        for chunk, tensor in enumerate(tensors):
            key = ChunkKey(transfer_id=transfer_id, layer=layer, chunk=chunk)
            encode_tag(key)  # same limits as on the wire
            byte_view(tensor)  # same contiguity requirement as on the wire
            try:
                await _on_loop(server._loop, server._deliver(key, tensor))
            except TransportError:
                self._connected.pop(address, None)
                raise
            total += nbytes(tensor)
        return total

    async def close(self) -> None:
        self._is_closed = True
        self._connected.clear()


async def _call_async(function, *args):
    return function(*args)


async def _on_loop(loop: asyncio.AbstractEventLoop, coroutine):
    """Run `coroutine` on `loop`, from this loop or another thread's."""
    if loop is asyncio.get_running_loop():
        return await coroutine
    if loop.is_closed():
        coroutine.close()
        raise TransportError("the server's event loop is closed")
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, loop))


@register_transport("local")
class LocalTransport(Transport):
    @classmethod
    def make_server(cls, *, token: str, options: TransportOptions | None = None) -> LocalKVServer:
        return LocalKVServer(token=token, options=options)

    @classmethod
    def make_client(cls, *, token: str, options: TransportOptions | None = None) -> LocalKVClient:
        return LocalKVClient(token=token, options=options)
