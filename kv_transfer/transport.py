"""The transport interface and its registry.

A transport moves the chunks of KV transfers from prefill replicas (clients) into the paged cache of a decode
replica (server). Backends register under a name and are imported lazily, so `local` and `nccl` need no ucxx:

    backend = get_transport("ucx")                  # or "nccl", or "local" (in-process, for tests)
    server = backend.make_server(token=cluster_token)
    address = await server.start(host)             # decode replica, once
    client = backend.make_client(token=cluster_token)
    await client.send(address, transfer_id, layer, chunks)   # prefill replica, connects once per address

Most callers use `kv_transfer.session` (KVReceiver / KVSender) instead of this interface directly.

Threading: every method must be called on the event loop that started the object (in a Ray async actor: its
loop). A compute thread hands work over with `asyncio.run_coroutine_threadsafe`.

Receive semantics every backend keeps (the decode side relies on them to reuse blocks right after an abort):
- a chunk is written only into the tensor posted for exactly its (transfer id, layer, chunk index), and only if
  its byte size matches; anything else (unknown or cancelled transfer, wrong size, duplicate) is read into a
  scratch buffer and dropped, and a wrong size or duplicate fails that transfer;
- once `cancel(transfer_id)` returns, no byte of that transfer lands in its posted tensors anymore.
"""

from __future__ import annotations

import abc
import asyncio
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch

from kv_transfer.errors import TransportError, UnknownTransportError


@dataclass(frozen=True, kw_only=True)
class TransportOptions:
    """Timeouts and polling of a transport; the defaults suit a LAN or one host."""

    connect_timeout_s: float = 5.0  # endpoint creation and handshake reply, client side
    handshake_timeout_s: float = 5.0  # server waits this long for a new peer's hello, then drops it
    poll_interval_s: float = 0.001  # how often the UCX server looks for arriving chunks while transfers are live
    idle_poll_interval_s: float = 0.05  # ... and while none is (stray late chunks still get drained)
    cancel_timeout_s: float = 10.0  # cancel waits at most this long for chunk writes already under way
    peer_name: str = ""  # shown in the other side's logs

    def __post_init__(self) -> None:
        for name in ("connect_timeout_s", "handshake_timeout_s", "poll_interval_s", "idle_poll_interval_s",
                     "cancel_timeout_s"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"TransportOptions.{name} must be > 0, got {value}")


@dataclass(frozen=True, kw_only=True)
class TransferStats:
    """What one side measured for one transfer."""

    num_bytes: int
    seconds: float  # receiver: reserve -> last chunk landed; sender: first push -> last send completed


class KVServer(abc.ABC):
    """Decode side. Accepts authenticated clients and lands their chunks in posted destination tensors."""

    @property
    @abc.abstractmethod
    def address(self) -> str:
        """The address clients connect to (valid after `start`)."""

    @abc.abstractmethod
    async def start(self, host: str | None = None, port: int = 0) -> str:
        """Start listening and return the address to hand to peers. `host` is the address peers can reach
        (None: the backend picks one); `port` 0 lets the OS choose."""

    @abc.abstractmethod
    def new_transfer_id(self) -> int:
        """A transfer id unused by any live or recently cancelled transfer of this server."""

    @abc.abstractmethod
    def post_recv(self, transfer_id: int, dst_per_layer: Sequence[Sequence[torch.Tensor]]) -> asyncio.Future:
        """Expect `dst_per_layer[layer][chunk]` for every layer and chunk of the transfer; each tensor must be
        contiguous and exactly the size of the message the sender sends for that (layer, chunk).

        Returns a future that resolves to the number of bytes once every chunk landed, or fails with
        `TransferAborted` (cancel, peer failure, mismatch). On failure call `cancel` before reusing the memory:
        chunks already under way may still be landing.
        """

    @abc.abstractmethod
    async def cancel(self, transfer_id: int) -> None:
        """Stop the transfer: fail its future (if pending) and return once no write of it can land anymore.
        Raises `CancelIncomplete` if writes under way did not finish within `cancel_timeout_s`. Unknown or
        finished ids are a no-op."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Cancel every transfer, disconnect every peer and stop listening. Idempotent."""


class KVClient(abc.ABC):
    """Prefill side. One cached, authenticated connection per server address."""

    @abc.abstractmethod
    async def connect(self, address: str) -> None:
        """Connect and authenticate once; later calls for the same address return at once. Concurrent calls
        share one attempt. Raises `AuthenticationError` if refused, `TransportError` if unreachable."""

    @abc.abstractmethod
    async def send(self, address: str, transfer_id: int, layer: int, tensors: Sequence[torch.Tensor]) -> int:
        """Send `tensors[i]` as chunk i of `layer` of the transfer (connecting first if needed); returns the
        bytes sent once the transport is done with the tensors. Raises `TransportError` when the connection
        fails (the cached connection is then dropped, so a later call reconnects)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close every connection. Idempotent."""


class Transport(abc.ABC):
    """A registered backend: a factory for its server and client."""

    name: ClassVar[str] = ""

    @classmethod
    @abc.abstractmethod
    def make_server(cls, *, token: str, options: TransportOptions | None = None) -> KVServer: ...

    @classmethod
    @abc.abstractmethod
    def make_client(cls, *, token: str, options: TransportOptions | None = None) -> KVClient: ...


# Built-in backends, imported on first use so that importing kv_transfer never needs ucxx.
_LAZY_MODULES = {
    "ucx": "kv_transfer.ucx_transport",
    "nccl": "kv_transfer.nccl_transport",
    "local": "kv_transfer.local_transport",
}
_REGISTRY: dict[str, type[Transport]] = {}

T = TypeVar("T", bound=type[Transport])


def register_transport(name: str) -> Callable[[T], T]:
    """Class decorator: make a `Transport` subclass available as `get_transport(name)`."""

    def decorate(cls: T) -> T:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"transport {name!r} is already registered by {existing.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def known_transports() -> list[str]:
    return sorted(set(_LAZY_MODULES) | set(_REGISTRY))


def get_transport(name: str) -> type[Transport]:
    """The transport registered as `name`, importing its module on first use."""
    if name not in _REGISTRY:
        module_name = _LAZY_MODULES.get(name)
        if module_name is None:
            raise UnknownTransportError(
                f"unknown KV transport {name!r}; known transports: {', '.join(known_transports())}"
            )
        try:
            importlib.import_module(module_name)
        except ImportError as error:
            hint = " (install pdcluster[ucx-cu12] or pdcluster[ucx-cu13])" if name == "ucx" else ""
            raise TransportError(f"KV transport {name!r} is unavailable: {error}{hint}") from error
        if name not in _REGISTRY:
            raise TransportError(f"module {module_name} did not register transport {name!r}")
    return _REGISTRY[name]
