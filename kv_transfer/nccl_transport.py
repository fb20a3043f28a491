"""`nccl` transport: KV chunks over a torch.distributed point-to-point process group per prefill/decode pair.

CUDA tensors travel through NCCL (GPU to GPU: NVLink / PCIe peer access, or the network NCCL finds); host tensors
through Gloo with the same code, which is what the CPU tests run. Addresses look like `nccl://<host>:<port>`.

Set-up (kv_transfer.nccl_wire has the messages): the decode-side server listens on a small TCP control port and
owns one TCPStore. A client connects, authenticates with the cluster token (the handshake of kv_transfer.wire)
and gets a random session id; at its first send it asks for a group of the backend its tensors need, and both
sides build a 2-rank group (server rank 0, client rank 1) on the store under `pdkv/<session>`
(kv_transfer.nccl_link: constructed directly, never through the default process group).

Receiving, and why nothing lands after a cancel: a process-group receive cannot be cancelled once posted (NCCL
has no such call; an aborted communicator takes every other transfer of the pair down with it). So no receive
is posted ahead of time. For each layer the client first sends a header (transfer id, layer, chunk sizes) on the
control channel; the server decides on its event loop, atomically with any cancel (kv_transfer.recv_table),
which chunks it still wants, posts receives for exactly those, and answers with a grant; the client sends the
granted chunks and nothing else. A cancel therefore only waits for receives that were granted before it: their
data is already on its way, so they complete (and `cancel` returns) within one chunk's transfer time. Chunks
of cancelled or unknown transfers are never sent at all (no draining into scratch memory). If the peer dies with
granted receives outstanding, Gloo fails them when its sockets close; NCCL's communicator is aborted; if that
does not settle them within `cancel_timeout_s`, the cancel raises `CancelIncomplete` as the interface says.
Cost: one control round trip per layer, overlapped with the previous layers' data.

Small chunks (fragmented block tables) are bundled into a few messages per layer and scattered into their blocks
on the receiving device (nccl_wire.group_messages); large chunks land in place.

Security: the token guards the control channel and only authenticated peers learn the session id, but the TCPStore
and the NCCL / Gloo data connections are unauthenticated like every torch.distributed group: keep them on the
cluster's network.
"""

from __future__ import annotations

import asyncio
import datetime
import hmac
import logging
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist

from kv_transfer.buffers import byte_view
from kv_transfer.errors import AuthenticationError, CancelIncomplete, TransportError
from kv_transfer.nccl_link import CLIENT_RANK, SERVER_RANK, GroupSpec, PeerLink
from kv_transfer.nccl_wire import (
    decode_grant,
    decode_message,
    decode_sizes,
    encode_grant,
    encode_message,
    encode_sizes,
    format_address,
    group_messages,
    parse_address,
    read_frame,
    write_frame,
)
from kv_transfer.recv_table import RecvTable
from kv_transfer.transport import KVClient, KVServer, Transport, TransportOptions, register_transport
from kv_transfer.wire import ACCEPT, ChunkKey, decode_hello, decode_reply, encode_hello, encode_refuse, encode_tag

logger = logging.getLogger(__name__)

_REFUSE_LINGER_S = 1.0  # after a refusal, give the peer this long to read it before we close
_STORE_TIMEOUT_S = 30.0


def backend_for(device: torch.device) -> str:
    """The process-group backend that moves tensors of this device."""
    if device.type == "cuda":
        return "nccl"
    if device.type == "cpu":
        return "gloo"
    raise TransportError(f"the nccl transport moves CUDA or host tensors, not {device.type}")


def _check_backend_available(backend: str) -> str | None:
    """None when this process can build a group of `backend`, else why not."""
    if not dist.is_available():
        return "torch.distributed is not available in this build of torch"
    if backend == "gloo":
        return None if dist.is_gloo_available() else "Gloo is not available in this build of torch"
    if backend == "nccl":
        if not dist.is_nccl_available() or not torch.cuda.is_available():
            return "NCCL needs a CUDA build of torch and a GPU"
        return None
    return f"unknown process-group backend {backend!r}"


def _default_host() -> str:
    """An address of this machine that peers can reach: the one the default route uses (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("10.255.255.255", 1))
            return probe.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _int_field(message: dict, name: str, upper: int) -> int:
    value = message.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= upper:
        raise TransportError(f"control message field {name!r} must be an integer in [0, {upper}], got {value!r}")
    return value


# --- server -----------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _ServerPeer:
    """One authenticated client connection of a server."""

    name: str
    session: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    local_host: str
    link: PeerLink | None = None
    device_type: str = ""


class NcclKVServer(KVServer):
    def __init__(self, *, token: str, options: TransportOptions | None = None):
        if not token:
            raise ValueError("token must be a non-empty string")
        self._token = token.encode()
        self._options = options or TransportOptions()
        self._table = RecvTable(cancel_timeout_s=self._options.cancel_timeout_s, server_name="nccl kv server")
        self._address: str | None = None
        self._tcp_server: asyncio.Server | None = None
        self._store = None
        self._peers: set[_ServerPeer] = set()
        self._links: set[PeerLink] = set()  # of current and dropped peers, until their threads exited
        self._connections: set[asyncio.Task] = set()
        self._is_closing = False

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
        advertised = host or _default_host()
        self._tcp_server = await asyncio.start_server(self._on_connect, host=advertised, port=port)
        bound_port = self._tcp_server.sockets[0].getsockname()[1]
        # One store for every peer of this server; each pair uses its own prefix of it.
        self._store = dist.TCPStore(advertised, 0, None, True, datetime.timedelta(seconds=_STORE_TIMEOUT_S),
                                    wait_for_workers=False)
        self._address = format_address(advertised, bound_port)
        logger.info("nccl kv server listening at %s (store port %d)", self._address, self._store.port)
        return self._address

    def new_transfer_id(self) -> int:
        return self._table.new_transfer_id()

    def post_recv(self, transfer_id: int, dst_per_layer: Sequence[Sequence[torch.Tensor]]) -> asyncio.Future:
        if self._address is None or self._is_closing:
            raise TransportError("server is not running")
        for tensors in dst_per_layer:
            for tensor in tensors:
                backend_for(tensor.device)  # fail now, not when the chunk arrives, on unsupported memory
        return self._table.post(transfer_id, dst_per_layer)

    async def cancel(self, transfer_id: int) -> None:
        await self._table.cancel(transfer_id)

    async def close(self) -> None:
        if self._is_closing:
            return
        self._is_closing = True
        if self._tcp_server is not None:
            self._tcp_server.close()
        try:
            await self._table.cancel_all("server closed")
        except CancelIncomplete as error:
            logger.error("%s", error)
        for peer in list(self._peers):
            self._drop(peer, "server closed", peer_gone=False)
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=self._options.handshake_timeout_s)
        await _wait_links_closed(self._links, self._options.cancel_timeout_s)
        self._store = None

    # --- connections -------------------------------------------------------------------------------------------

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            peer = await self._handshake(reader, writer)
            if peer is not None:
                await self._serve(peer)
        except asyncio.CancelledError:
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def _handshake(self, reader, writer) -> _ServerPeer | None:
        if self._is_closing:
            return None
        try:
            hello = await asyncio.wait_for(read_frame(reader), self._options.handshake_timeout_s)
            token, peer_name = decode_hello(hello)
        except Exception as error:
            logger.warning("nccl kv server: dropped a connection without a valid hello (%s)", _describe(error))
            return None
        if self._is_closing or not hmac.compare_digest(token.encode(), self._token):
            reason = "server closing" if self._is_closing else "wrong cluster token"
            logger.warning("nccl kv server %s: refused peer %r (%s)", self._address, peer_name, reason)
            try:
                write_frame(writer, encode_refuse(reason))
                await asyncio.wait_for(writer.drain(), _REFUSE_LINGER_S)
                await asyncio.wait_for(reader.read(), _REFUSE_LINGER_S)  # until the peer closes, bounded
            except Exception:
                pass
            return None
        session = secrets.token_hex(16)
        write_frame(writer, ACCEPT)
        write_frame(writer, encode_message({"store_port": self._store.port, "session": session}))
        local_host = writer.get_extra_info("sockname")[0]
        peer = _ServerPeer(name=peer_name, session=session, reader=reader, writer=writer, local_host=local_host)
        self._peers.add(peer)
        logger.info("nccl kv server %s: accepted peer %r", self._address, peer_name)
        return peer

    async def _serve(self, peer: _ServerPeer) -> None:
        reason, peer_gone = "peer disconnected", True
        try:
            while True:
                message = decode_message(await read_frame(peer.reader))
                op = message.get("op")
                if op == "layer":
                    self._on_layer(peer, message)
                elif op == "group":
                    self._on_group(peer, message)
                else:
                    raise TransportError(f"unknown control op {op!r}")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            reason, peer_gone = "server closed", False
        except TransportError as error:
            reason = f"protocol error: {error}"
            logger.warning("nccl kv server %s: dropping peer %r (%s)", self._address, peer.name, reason)
        finally:
            self._drop(peer, reason, peer_gone=peer_gone)

    def _on_group(self, peer: _ServerPeer, message: dict) -> None:
        backend = message.get("backend")
        problem = _check_backend_available(backend) if isinstance(backend, str) else "no backend named"
        if problem is None and peer.link is not None:
            problem = f"this connection already has a {peer.link.backend_name} group"
        if problem is not None:
            write_frame(peer.writer, encode_message({"op": "group", "ok": False, "reason": problem}))
            return
        peer.link = PeerLink(name=f"server-{peer.name}", on_failure=partial(self._on_link_failure, peer))
        self._links.add(peer.link)
        peer.device_type = "cuda" if backend == "nccl" else "cpu"
        peer.link.start_group(GroupSpec(
            backend=backend, rank=SERVER_RANK, prefix=f"pdkv/{peer.session}", store=self._store,
            store_host="", store_port=self._store.port, local_host=peer.local_host, store_timeout_s=_STORE_TIMEOUT_S,
        ))
        write_frame(peer.writer, encode_message({"op": "group", "ok": True}))

    def _on_layer(self, peer: _ServerPeer, message: dict) -> None:
        if peer.link is None:
            raise TransportError("layer header before the process group was set up")
        seq = _int_field(message, "seq", 2**62)
        transfer_id = _int_field(message, "t", 2**62)
        layer = _int_field(message, "l", 2**62)
        sizes = decode_sizes(message.get("sizes"))
        wanted: list[tuple[ChunkKey, int, torch.Tensor]] = []
        is_wanted = []
        for chunk, size in enumerate(sizes):
            key = ChunkKey(transfer_id=transfer_id, layer=layer, chunk=chunk)
            dst = self._table.claim(key, size)
            if dst is not None and dst.device.type != peer.device_type:
                self._table.chunk_failed(key, f"the sender's {peer.device_type} tensors cannot land in {dst.device} "
                                              "memory (both sides must be GPUs, or both host memory)")
                dst = None
            is_wanted.append(dst is not None)
            if dst is not None:
                wanted.append((key, size, dst))
        if wanted:
            messages = [[wanted[p][2] for p in group] for group in group_messages([size for _, size, _ in wanted])]
            peer.link.submit(is_send=False, messages=messages, on_done=partial(self._landed, wanted))
        write_frame(peer.writer, encode_message({"op": "grant", "seq": seq, "go": encode_grant(is_wanted)}))

    def _landed(self, wanted: list[tuple[ChunkKey, int, torch.Tensor]], error: str | None) -> None:
        for key, size, _ in wanted:
            if error is None:
                self._table.landed(key, size)
            else:
                self._table.chunk_failed(key, error)

    def _on_link_failure(self, peer: _ServerPeer, reason: str) -> None:
        logger.warning("nccl kv server %s: process group with peer %r failed (%s)", self._address, peer.name, reason)
        peer.writer.close()  # ends _serve, which drops the peer

    def _drop(self, peer: _ServerPeer, reason: str, *, peer_gone: bool) -> None:
        if peer not in self._peers:
            return
        self._peers.discard(peer)
        if peer.link is not None:
            peer.link.close(peer_gone=peer_gone)
        peer.writer.close()
        logger.info("nccl kv server %s: peer %r left (%s)", self._address, peer.name, reason)


# --- client -----------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _PendingSend:
    views: list[torch.Tensor]
    result: asyncio.Future  # bytes sent, or TransportError
    layer: int


@dataclass(eq=False)
class _Connection:
    address: str
    host: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    session: str
    store_port: int
    local_host: str
    link: PeerLink | None = None
    requested_backend: str = ""
    group: asyncio.Future | None = None  # resolves once the server agreed to build the group
    next_seq: int = 0
    awaiting_grant: dict[int, _PendingSend] = field(default_factory=dict)
    in_flight: set[asyncio.Future] = field(default_factory=set)  # granted sends not yet completed
    reader_task: asyncio.Task | None = None
    error: str | None = None  # set when the connection broke


class NcclKVClient(KVClient):
    def __init__(self, *, token: str, options: TransportOptions | None = None):
        self._token = token
        self._options = options or TransportOptions()
        self._connections: dict[str, _Connection] = {}
        self._connecting: dict[str, asyncio.Future] = {}
        self._links: set[PeerLink] = set()  # of current and broken connections, until their threads exited
        self._is_closed = False

    async def connect(self, address: str) -> None:
        await self._connection(address)

    async def _connection(self, address: str) -> _Connection:
        if self._is_closed:
            raise TransportError("client is closed")
        connection = self._connections.get(address)
        if connection is not None and connection.error is None:
            return connection
        pending = self._connecting.get(address)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            pending.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._connecting[address] = pending
            try:
                connection = await self._open(address)
                self._connections[address] = connection
                pending.set_result(connection)
            except BaseException as error:
                pending.set_exception(error if isinstance(error, Exception) else TransportError("connect cancelled"))
                raise
            finally:
                del self._connecting[address]
            return connection
        return await asyncio.shield(pending)

    async def _open(self, address: str) -> _Connection:
        host, port = parse_address(address)
        timeout = self._options.connect_timeout_s
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except Exception as error:
            raise TransportError(f"cannot connect to {address}: {_describe(error)}") from None
        try:
            write_frame(writer, encode_hello(self._token, self._options.peer_name))
            reply = await asyncio.wait_for(read_frame(reader), timeout)
            refusal = decode_reply(reply)
            if refusal is not None:
                raise AuthenticationError(f"{address} refused the connection: {refusal}")
            session = decode_message(await asyncio.wait_for(read_frame(reader), timeout))
            store_port, session_id = session.get("store_port"), session.get("session")
            if not isinstance(store_port, int) or not isinstance(session_id, str):
                raise TransportError(f"malformed session message {session!r}")
        except AuthenticationError:
            writer.close()
            raise
        except Exception as error:
            writer.close()
            raise TransportError(f"handshake with {address} failed: {_describe(error)}") from None
        connection = _Connection(address=address, host=host, reader=reader, writer=writer, session=session_id,
                                 store_port=store_port, local_host=writer.get_extra_info("sockname")[0])
        connection.reader_task = asyncio.get_running_loop().create_task(self._read(connection))
        return connection

    async def send(self, address: str, transfer_id: int, layer: int, tensors: Sequence[torch.Tensor]) -> int:
        if not tensors:
            raise ValueError("send needs at least one tensor")
        for chunk in range(len(tensors)):
            encode_tag(ChunkKey(transfer_id=transfer_id, layer=layer, chunk=chunk))  # same limits as every backend
        views = [byte_view(tensor) for tensor in tensors]
        devices = {view.device for view in views}
        if len(devices) != 1:
            raise ValueError(f"the chunks of one layer must share a device, got {sorted(map(str, devices))}")
        if any(view.numel() == 0 for view in views):
            raise ValueError("empty chunks cannot be sent")
        backend = backend_for(views[0].device)
        connection = await self._connection(address)
        await self._ensure_group(connection, backend)
        if connection.error is not None:
            raise TransportError(f"connection to {address} broke: {connection.error}")
        seq = connection.next_seq
        connection.next_seq += 1
        result = asyncio.get_running_loop().create_future()
        result.add_done_callback(lambda f: f.cancelled() or f.exception())
        connection.awaiting_grant[seq] = _PendingSend(views=views, result=result, layer=layer)
        header = {"op": "layer", "seq": seq, "t": transfer_id, "l": layer, "sizes": encode_sizes([v.numel() for v in views])}
        write_frame(connection.writer, encode_message(header))
        # Shielded: once granted, the chunks go out even if our caller stops waiting (the server posted receives).
        return await asyncio.shield(result)

    async def _ensure_group(self, connection: _Connection, backend: str) -> None:
        if connection.group is None:
            connection.group = asyncio.get_running_loop().create_future()
            connection.group.add_done_callback(lambda f: f.cancelled() or f.exception())
            if connection.error is not None:
                connection.group.set_exception(TransportError(connection.error))
            else:
                connection.link = PeerLink(name=f"client-{connection.address}",
                                           on_failure=partial(self._on_link_failure, connection))
                self._links.add(connection.link)
                connection.requested_backend = backend
                write_frame(connection.writer, encode_message({"op": "group", "backend": backend}))
        await asyncio.shield(connection.group)
        if connection.link.backend_name != backend:
            raise TransportError(f"the connection to {connection.address} carries {connection.link.backend_name} "
                                 f"tensors; one client cannot send both CUDA and host tensors to one server")

    async def _read(self, connection: _Connection) -> None:
        reason = "server disconnected"
        try:
            while True:
                message = decode_message(await read_frame(connection.reader))
                op = message.get("op")
                if op == "grant":
                    self._on_grant(connection, message)
                elif op == "group":
                    self._on_group_reply(connection, message)
                else:
                    raise TransportError(f"unknown control op {op!r}")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            reason = "client closed"
        except TransportError as error:
            reason = f"protocol error: {error}"
            logger.warning("nccl kv client: dropping the connection to %s (%s)", connection.address, reason)
        finally:
            self._break(connection, reason, peer_gone=reason != "client closed")

    def _on_group_reply(self, connection: _Connection, message: dict) -> None:
        if connection.group is None or connection.group.done():
            raise TransportError("unexpected group reply")
        if message.get("ok") is not True:
            connection.group.set_exception(TransportError(
                f"{connection.address} cannot build a {connection.requested_backend} group: {message.get('reason')}"))
            return
        connection.link.start_group(GroupSpec(
            backend=connection.requested_backend, rank=CLIENT_RANK, prefix=f"pdkv/{connection.session}",
            store_host=connection.host, store_port=connection.store_port, local_host=connection.local_host,
            store_timeout_s=_STORE_TIMEOUT_S,
        ))
        connection.group.set_result(None)

    def _on_grant(self, connection: _Connection, message: dict) -> None:
        seq = _int_field(message, "seq", 2**62)
        pending = connection.awaiting_grant.pop(seq, None)
        if pending is None:
            raise TransportError(f"grant for unknown layer header {seq}")
        is_wanted = decode_grant(message.get("go"), len(pending.views))
        granted = [view for view, wanted in zip(pending.views, is_wanted) if wanted]
        if not granted:
            pending.result.set_result(0)  # the server no longer wants this transfer
            return
        num_bytes = sum(view.numel() for view in granted)
        messages = [[granted[p] for p in group] for group in group_messages([view.numel() for view in granted])]
        connection.in_flight.add(pending.result)
        connection.link.submit(is_send=True, messages=messages,
                               on_done=partial(self._sent, connection, pending, num_bytes))

    def _sent(self, connection: _Connection, pending: _PendingSend, num_bytes: int, error: str | None) -> None:
        connection.in_flight.discard(pending.result)
        if pending.result.done():
            return
        if error is None:
            pending.result.set_result(num_bytes)
        else:
            pending.result.set_exception(
                TransportError(f"sending layer {pending.layer} to {connection.address} failed: {error}"))

    def _on_link_failure(self, connection: _Connection, reason: str) -> None:
        logger.warning("nccl kv client: process group with %s failed (%s)", connection.address, reason)
        connection.writer.close()  # ends _read, which breaks the connection

    def _break(self, connection: _Connection, reason: str, *, peer_gone: bool) -> None:
        if connection.error is not None:
            return
        connection.error = reason
        if self._connections.get(connection.address) is connection:
            del self._connections[connection.address]
        error = TransportError(f"connection to {connection.address} broke: {reason}")
        for pending in connection.awaiting_grant.values():
            if not pending.result.done():
                pending.result.set_exception(error)
        connection.awaiting_grant.clear()
        if connection.group is not None and not connection.group.done():
            connection.group.set_exception(error)
        if connection.link is not None:
            connection.link.close(peer_gone=peer_gone)  # granted sends still report through their on_done
        connection.writer.close()
        logger.info("nccl kv client: connection to %s closed (%s)", connection.address, reason)

    async def close(self) -> None:
        if self._is_closed:
            return
        self._is_closed = True
        connections, self._connections = list(self._connections.values()), {}
        for connection in connections:
            if connection.in_flight:  # the server posted receives for these: let them finish
                await asyncio.wait(list(connection.in_flight), timeout=self._options.cancel_timeout_s)
            if connection.reader_task is not None:
                connection.reader_task.cancel()
                await asyncio.gather(connection.reader_task, return_exceptions=True)
        await _wait_links_closed(self._links, self._options.cancel_timeout_s)


async def _wait_links_closed(links: set[PeerLink], timeout_s: float) -> None:
    """Wait (bounded) until the threads of every link stopped, so that the process can exit cleanly."""
    for link in list(links):
        link.close(peer_gone=False)  # no-op when already closed
        if await link.wait_closed(timeout_s):
            links.discard(link)
        else:
            logger.warning("nccl transport: the process group threads of %s did not stop within %ss",
                           link.name, timeout_s)


@register_transport("nccl")
class NcclTransport(Transport):
    @classmethod
    def make_server(cls, *, token: str, options: TransportOptions | None = None) -> NcclKVServer:
        return NcclKVServer(token=token, options=options)

    @classmethod
    def make_client(cls, *, token: str, options: TransportOptions | None = None) -> NcclKVClient:
        return NcclKVClient(token=token, options=options)
