"""One 2-rank torch.distributed process group between a KV server and one client, driven by two threads.

Who uses it: kv_transfer.nccl_transport, one `PeerLink` per connection on each side (server rank 0, client rank 1).

The group is built directly from its backend class (`ProcessGroupNCCL` for CUDA tensors, `ProcessGroupGloo` for
host tensors) on a `PrefixStore` of the server's TCPStore: no `init_process_group`, no default group, so it never
touches the model's own process groups of the same process.

NCCL and Gloo calls block (communicator set-up, Gloo waits), so they never run on the event loop:
- the *op thread* builds the group at the first operation (on that operation's device, which is when both ranks
  first meet) and issues every operation in submission order (point-to-point messages are matched in order, so
  the order of `submit` calls on the two sides must correspond). On CUDA it works on a private stream, so waiting
  for a transfer never waits for the compute on the default stream;
- the *completion thread* waits for each operation in the same order (Gloo: `work.wait()`; NCCL: an event
  recorded after the stream-side wait and the scatter) and reports back on the event loop.
Each `submit` gets exactly one `on_done(error or None)` call on the loop, after the operation's memory is no
longer touched by the group (or after it was never issued).

Messages: a message of one tensor is sent from / received into that tensor directly. A message of several
tensors (a bundle of small chunks, kv_transfer.nccl_wire.group_messages) is concatenated on the sending device
and received into a staging buffer that is scattered into its tensors before `on_done` (still "in flight" for
the receiving side's cancel accounting).

Peer death: the owner calls `close(peer_gone=True)`. Queued operations are then failed without being issued; an
NCCL operation already issued cannot be cancelled, so the group is aborted (ncclCommAbort stops its kernels);
a Gloo operation fails on its own once the peer's sockets close.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from kv_transfer.buffers import byte_view

logger = logging.getLogger(__name__)

SERVER_RANK = 0
CLIENT_RANK = 1
_TAG = 0  # one tag: messages are matched by order (NCCL has no tags; Gloo matches per tag in order)
OnDone = Callable[[str | None], None]


@dataclass(frozen=True, kw_only=True)
class GroupSpec:
    """How to build the pair's process group."""

    backend: str  # "nccl" or "gloo"
    rank: int  # SERVER_RANK or CLIENT_RANK
    prefix: str  # unique per connection, agreed over the control channel
    store_host: str
    store_port: int
    local_host: str  # Gloo binds its sockets to this address (the one the control connection uses)
    store: Any = None  # the server passes its own TCPStore; the client connects to store_host:store_port
    store_timeout_s: float = 30.0  # rendezvous of the two ranks
    op_timeout_s: float = 300.0  # an issued operation whose peer never sends fails after this (Gloo; NCCL watchdog)

    def __post_init__(self) -> None:
        if self.backend not in ("nccl", "gloo"):
            raise ValueError(f"GroupSpec.backend must be 'nccl' or 'gloo', got {self.backend!r}")
        if self.rank not in (SERVER_RANK, CLIENT_RANK):
            raise ValueError(f"GroupSpec.rank must be 0 or 1, got {self.rank}")
        if not self.store_timeout_s > 0 or not self.op_timeout_s > 0:
            raise ValueError("GroupSpec timeouts must be > 0")


@dataclass(eq=False)
class _Op:
    is_send: bool
    messages: list[list[torch.Tensor]]  # each: the contiguous tensors of one message
    on_done: OnDone


@dataclass(eq=False)
class _Issued:
    op: _Op
    works: list[Any]
    buffers: list[torch.Tensor]  # what travels; keeps staging alive until completion
    event: Any = None  # CUDA: recorded after the data is in place
    device: torch.device | None = None


@dataclass(eq=False)
class _Build:
    spec: GroupSpec


_STOP = object()
_live_links: weakref.WeakSet = weakref.WeakSet()  # links whose threads may still run (stopped at exit)
_EXIT_JOIN_S = 5.0


class PeerLink:
    """The process group of one connection and its op / completion threads. Create and call on the event loop."""

    def __init__(self, *, name: str, on_failure: Callable[[str], None] | None = None):
        self._loop = asyncio.get_running_loop()
        self._name = name
        self._on_failure = on_failure  # called on the loop once, when the link can no longer be used
        self._ops: queue.SimpleQueue = queue.SimpleQueue()
        self._completions: queue.SimpleQueue = queue.SimpleQueue()
        self._backend: Any = None
        self._backend_name = ""
        self._peer_rank = SERVER_RANK
        self._spec: GroupSpec | None = None
        self._stream: Any = None
        self._error: str | None = None  # set once: every later operation fails with it
        self._is_peer_gone = False
        self._is_closed = False
        self._num_issued = 0  # issued and not yet completed (op and completion threads; under _lock)
        self._lock = threading.Lock()
        self._closed = self._loop.create_future()  # resolved when both threads have exited
        self._threads: list[threading.Thread] = []

    @property
    def name(self) -> str:
        return self._name

    @property
    def backend_name(self) -> str:
        return self._backend_name

    def start_group(self, spec: GroupSpec) -> None:
        """Start the threads and build the group in the op thread (it blocks until the peer joins)."""
        if self._threads:
            raise RuntimeError("the process group of this link is already started")
        self._backend_name = spec.backend
        self._threads = [
            threading.Thread(target=self._run_ops, name=f"pdkv-{spec.backend}-ops-{self._name}", daemon=True),
            threading.Thread(target=self._run_completions, name=f"pdkv-{spec.backend}-done-{self._name}",
                             daemon=True),
        ]
        self._ops.put(_Build(spec))
        _register_exit_hook()
        _live_links.add(self)
        for thread in self._threads:
            thread.start()

    def submit(self, *, is_send: bool, messages: Sequence[Sequence[torch.Tensor]], on_done: OnDone) -> None:
        """Queue one batch of messages (a layer's granted chunks); `on_done` runs on the loop once it completed."""
        op = _Op(is_send=is_send, messages=[list(m) for m in messages], on_done=on_done)
        if self._is_closed or not self._threads:
            reason = "link closed" if self._is_closed else "process group not started"
            self._loop.call_soon(on_done, reason)
            return
        self._ops.put(op)

    def close(self, *, peer_gone: bool) -> None:
        """Stop after the queued operations (failed unissued when `peer_gone`); idempotent."""
        if peer_gone and not self._is_peer_gone:
            self._is_peer_gone = True
            with self._lock:
                has_issued = self._num_issued > 0
            if has_issued and self._backend_name == "nccl":
                # An issued NCCL receive waits forever for a dead sender: abort the communicator.
                threading.Thread(target=self._abort, name=f"pdkv-abort-{self._name}", daemon=True).start()
        if self._is_closed:
            return
        self._is_closed = True
        if not self._threads:
            self._closed.set_result(None)
            return
        self._ops.put(_STOP)

    async def wait_closed(self, timeout_s: float) -> bool:
        """True once both threads exited (after `close`); False if that took longer than `timeout_s`."""
        try:
            await asyncio.wait_for(asyncio.shield(self._closed), timeout_s)
            return True
        except TimeoutError:
            return False

    # --- op thread ------------------------------------------------------------------------------------------------

    def _run_ops(self) -> None:
        while True:
            item = self._ops.get()
            if item is _STOP:
                self._completions.put(_STOP)
                return
            if isinstance(item, _Build):
                self._spec = item.spec  # built at the first operation, once its device is known
                continue
            if self._error is not None or self._is_peer_gone:
                self._report(item.on_done, self._error or "peer disconnected")
                continue
            try:
                issued = self._issue(item)
            except Exception as error:  # the matching order is lost: the link is unusable from here on
                self._fail(f"{'send' if item.is_send else 'receive'} failed: {_describe(error)}")
                self._report(item.on_done, self._error)
                continue
            with self._lock:
                self._num_issued += 1
            self._completions.put(issued)

    def _build(self, spec: GroupSpec) -> None:
        self._peer_rank = CLIENT_RANK if spec.rank == SERVER_RANK else SERVER_RANK
        try:
            store = spec.store
            if store is None:
                store = dist.TCPStore(spec.store_host, spec.store_port, None, False,
                                      datetime.timedelta(seconds=spec.store_timeout_s))
            store = dist.PrefixStore(spec.prefix, store)
            timeout = datetime.timedelta(seconds=spec.op_timeout_s)
            if spec.backend == "gloo":
                options = dist.ProcessGroupGloo._Options()
                options._devices = [dist.ProcessGroupGloo.create_device(hostname=spec.local_host)]
                options._timeout = timeout
                self._backend = dist.ProcessGroupGloo(store, spec.rank, 2, options)
            else:
                options = dist.ProcessGroupNCCL.Options()
                options._timeout = timeout
                self._backend = dist.ProcessGroupNCCL(store, spec.rank, 2, options)
        except Exception as error:
            self._fail(f"building the {spec.backend} process group failed: {_describe(error)}")

    def _issue(self, op: _Op) -> _Issued:
        device = op.messages[0][0].device
        if device.type == "cuda" and self._stream is None:
            # Before the group exists: ProcessGroupNCCL binds to this thread's current device.
            torch.cuda.set_device(device)
            self._stream = torch.cuda.Stream(device)
        if self._backend is None:
            self._build(self._spec)  # blocks until the peer's first operation builds its side
            if self._error is not None:
                raise RuntimeError(self._error)
        if device.type == "cuda":
            with torch.cuda.stream(self._stream):
                issued = self._issue_on_current_stream(op, device)
                for work in issued.works:
                    work.wait()  # NCCL: makes our stream wait for the transfer (the host does not block)
                if not op.is_send:
                    _scatter(issued.buffers, op.messages)
                issued.event = torch.cuda.Event()
                issued.event.record(self._stream)
            return issued
        return self._issue_on_current_stream(op, device)

    def _issue_on_current_stream(self, op: _Op, device: torch.device) -> _Issued:
        buffers = []
        for tensors in op.messages:
            if len(tensors) == 1:
                buffers.append(byte_view(tensors[0]))
            elif op.is_send:
                buffers.append(torch.cat([byte_view(t) for t in tensors]))
            else:
                buffers.append(torch.empty(sum(t.numel() * t.element_size() for t in tensors), dtype=torch.uint8,
                                           device=device))
        call = self._backend.send if op.is_send else self._backend.recv
        works = [call([buffer], self._peer_rank, _TAG) for buffer in buffers]
        return _Issued(op=op, works=works, buffers=buffers, device=device)

    # --- completion thread ----------------------------------------------------------------------------------------

    def _run_completions(self) -> None:
        try:
            while True:
                issued = self._completions.get()
                if issued is _STOP:
                    return
                error = self._wait(issued)
                with self._lock:
                    self._num_issued -= 1
                if error is None and self._is_peer_gone and self._backend_name == "nccl":
                    error = "peer disconnected (communicator aborted)"  # the data may be partial
                if error is not None:
                    self._fail(error)
                self._report(issued.op.on_done, error)
                del issued
        finally:
            self._teardown()
            self._call_on_loop(lambda: self._closed.done() or self._closed.set_result(None))

    def _wait(self, issued: _Issued) -> str | None:
        try:
            if issued.event is not None:
                issued.event.synchronize()
            else:
                for work in issued.works:
                    work.wait()
                if not issued.op.is_send:
                    _scatter(issued.buffers, issued.op.messages)
        except Exception as error:
            kind = "send" if issued.op.is_send else "receive"
            return f"{kind} failed: {_describe(error)}"
        return None

    def _teardown(self) -> None:
        backend, self._backend = self._backend, None
        if backend is None:
            return
        try:
            if self._is_peer_gone and self._backend_name == "nccl":
                backend.abort()
            elif hasattr(backend, "shutdown") and self._backend_name == "nccl":
                backend.shutdown()
        except Exception as error:  # the group is dropped either way
            logger.debug("pdkv link %s: tearing down the process group: %s", self._name, _describe(error))

    # --- shared ----------------------------------------------------------------------------------------------------

    def _abort(self) -> None:
        backend = self._backend
        if backend is None:
            return
        try:
            backend.abort()
            logger.warning("pdkv link %s: aborted the NCCL communicator (peer gone with transfers in flight)",
                           self._name)
        except Exception as error:
            logger.error("pdkv link %s: aborting the NCCL communicator failed: %s", self._name, _describe(error))

    def _fail(self, reason: str) -> None:
        if self._error is not None:
            return
        self._error = reason
        if self._on_failure is not None:
            self._call_on_loop(self._on_failure, reason)

    def _report(self, on_done: OnDone, error: str | None) -> None:
        self._call_on_loop(on_done, error)

    def _call_on_loop(self, function, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(function, *args)
        except RuntimeError:  # the loop is closed: nobody is waiting anymore
            pass


def _stop_links_at_exit() -> None:
    """Daemon threads frozen inside a process group's C++ code abort the interpreter's exit: stop every live link
    and give its threads a bounded time to finish (a thread stuck in a transfer is left behind)."""
    links = list(_live_links)
    for link in links:
        link._ops.put(_STOP)
    deadline = _EXIT_JOIN_S
    for link in links:
        for thread in link._threads:
            started = time.monotonic()
            thread.join(max(0.0, deadline))
            deadline -= time.monotonic() - started


_is_exit_hook_registered = False


def _register_exit_hook() -> None:
    # threading._register_atexit runs before the interpreter's shutdown (plain atexit runs too late for threads).
    # It is private CPython API, so degrade to nothing if it disappears.
    global _is_exit_hook_registered
    if _is_exit_hook_registered:
        return
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        try:
            register(_stop_links_at_exit)
            _is_exit_hook_registered = True
        except RuntimeError:  # already shutting down
            pass


def _scatter(buffers: list[torch.Tensor], messages: list[list[torch.Tensor]]) -> None:
    """Copy each received bundle from its staging buffer into its tensors (single-tensor messages landed in place)."""
    for buffer, tensors in zip(buffers, messages):
        if len(tensors) == 1:
            continue
        views = [byte_view(t) for t in tensors]
        parts = buffer.split([v.numel() for v in views])
        if buffer.is_cuda and hasattr(torch, "_foreach_copy_"):
            torch._foreach_copy_(views, list(parts))  # a few kernels instead of one per block
        else:
            for view, part in zip(views, parts):
                view.copy_(part)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
