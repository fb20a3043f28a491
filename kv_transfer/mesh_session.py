"""Per-request KV transfer between a multi-rank prefill replica and a multi-rank decode replica.

The single-rank protocol of `kv_transfer.session` (reserve -> push layers -> commit, or abort) on every rank pair
that the transfer plan (`kv_transfer.plan.plan_transfer`) connects:

    # decode replica: every rank d posts its receives (rank 0 collects the targets into the reservation)
    target = receivers[d].post(request_id, src_layout, block_ids, num_tokens, lease_s)
    info = MeshReservation(..., targets=(target_0, target_1, ...))            # -> router -> prefill replica
    stats = await receivers[d].wait_complete(request_id)                       # every rank, then admit
    # prefill replica: every rank s pushes its own shard, layer by layer, then waits for its sends
    await senders[s].push_layer(info, layer, k, v); ...; await senders[s].finish(info)

Messages. Each decode rank's transfer is cut into message groups, one per (its layer, plan copy that carries that
layer to it), numbered in (layer, copy) order; both sides derive the numbering from the plan, and the group number
is what the transport calls the "layer" of a message (so the transport needs no change). A copy that carries all
of the destination rank's heads for all the prompt's tokens in order (`is_direct`: always the case when prefill
has no CP and the same or a finer head split) is sent as runs of whole destination blocks and lands in the paged
cache in place, exactly like the single-rank path, as long as the block table has few runs (`MAX_IN_PLACE_RUNS`).
Any other copy (or a direct one into a fragmented table) (a head subset, CP token runs that start
mid-block) lands in a staging tensor of its own and is scattered into the blocks with `plan.unpack_into` once
every message of the rank has landed.

Guarantee (as in `kv_transfer.session`): when `wait_complete` raises `TransferAborted` or `abort` returns, no byte
of that rank's transfer lands in its blocks anymore, and the staged scatter never runs after an abort (it runs on
the event loop, before `wait_complete` returns, and only when everything landed). A replica admits a sequence
only after `wait_complete` returned on every rank, and frees its blocks only after `abort` returned on every rank.
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
from kv_transfer.mesh_layout import DecodeLayout, PrefillLayout, TokenRun
from kv_transfer.plan import Copy, Message, TransferPlan, plan_transfer, unpack_into
from kv_transfer.transport import KVClient, KVServer, TransferStats
from kv_transfer.wire import MAX_LAYERS

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class RankTarget:
    """Where one decode rank receives one request: its KV server and the transfer id it posted."""

    address: str
    transfer_id: int


@dataclass(frozen=True, kw_only=True)
class MeshReservation:
    """Everything every prefill rank needs to push one request's KV into a decode replica; made by the decode
    replica's rank 0, carried by the router (picklable). `block_ids` may be longer than the prompt needs (room
    for generated tokens). `src` is the prefill mesh the decode ranks posted their receives for: a prefill
    replica with another mesh refuses the reservation."""

    request_id: str
    num_tokens: int
    block_ids: tuple[int, ...]
    src: PrefillLayout
    dst: DecodeLayout
    head_dim: int
    dtype: str  # torch dtype name without "torch."
    targets: tuple[RankTarget, ...]  # one per decode rank, in rank order
    has_checksum: bool = False
    # The decode side frees the reservation this long after posting it if the KV has not all landed: a sender has
    # no reason to wait longer for its sends (None: no lease known).
    lease_s: float | None = None

    def __post_init__(self) -> None:
        if len(self.targets) != self.dst.world_size:
            raise ValueError(f"MeshReservation needs one target per decode rank ({self.dst.world_size}), "
                             f"got {len(self.targets)}")

    @property
    def address(self) -> str:
        """Decode rank 0's KV server (what a single-rank caller connects to)."""
        return self.targets[0].address

    def plan(self) -> TransferPlan:
        return plan_transfer(self.src, self.dst, self.num_tokens, self.block_ids)


@dataclass(frozen=True)
class MessageGroup:
    """One transport "layer" of a decode rank's transfer: one copy's share of one layer."""

    index: int
    copy: Copy
    layer: int  # global layer
    block_chunks: tuple[Chunk, ...] | None  # direct: the block runs it lands in; None: one staged tensor


def is_direct(plan: TransferPlan, copy: Copy) -> bool:
    """True when the copy carries whole token rows of the destination, for every prompt token in order, so it can
    land straight in the paged blocks."""
    return copy.is_all_dst_heads and copy.token_runs == (TokenRun(0, 0, plan.num_tokens),)


# A direct copy lands in place only while its block table has at most this many runs of consecutive blocks. A
# fragmented table (a long-running decode pool hands out scattered blocks) would otherwise cost one message per run
# per layer (a 1K-token prompt with 16-token blocks: 64 messages a layer, 2048 for an 8B model), and per-message
# costs dominate (measured on 2 x H200: 0.85-4.4 GB/s fragmented against ~300 GB/s contiguous); one staged message
# per layer plus one scatter kernel on arrival costs a copy at device bandwidth instead.
MAX_IN_PLACE_RUNS = 4


def message_groups(plan: TransferPlan, dst_rank: int) -> tuple[MessageGroup, ...]:
    """The message groups of decode rank `dst_rank`, in the order both sides number them."""
    block_chunks = chunk_plan(plan.block_ids, plan.num_tokens, plan.dst.block_size)
    is_in_place_table = len(block_chunks) <= MAX_IN_PLACE_RUNS
    copies = plan.copies_to(dst_rank)
    groups: list[MessageGroup] = []
    for layer in plan.dst.layer_range(dst_rank):
        for copy in copies:
            if layer in copy.layers:
                chunks = block_chunks if is_in_place_table and is_direct(plan, copy) else None
                groups.append(MessageGroup(len(groups), copy, layer, chunks))
    if len(groups) > MAX_LAYERS:
        raise ValueError(f"decode rank {dst_rank} would receive {len(groups)} message groups per request, the wire "
                         f"carries at most {MAX_LAYERS}; use fewer prefill ranks per decode rank")
    return tuple(groups)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------------------------- decode side


@dataclass(eq=False)
class _Posted:
    request_id: str
    transfer_id: int
    plan: TransferPlan
    landed: asyncio.Future
    reserved_at: float
    staged: list[tuple[MessageGroup, torch.Tensor]]  # scattered into the cache once everything landed
    checksums: list[tuple[list[torch.Tensor], torch.Tensor]]  # (received tensors of a group, its checksum)
    lease_timer: asyncio.TimerHandle | None = None
    abort_reason: str | None = None
    ending: asyncio.Task | None = None


class RankKVReceiver:
    """One decode rank's reservations. `kv_cache`: this rank's cache tensors, one per layer of its pipeline stage
    in order, `[num_blocks, 2, block_size, local_kv_heads, head_dim]` each. Call every method on the server's
    event loop."""

    def __init__(self, server: KVServer, kv_cache: Sequence[torch.Tensor], layout: DecodeLayout, rank: int, *,
                 checksum: bool = False):
        stage = layout.layer_range(rank)
        if len(kv_cache) != len(stage):
            raise ValueError(f"decode rank {rank} holds layers {stage.start}..{stage.stop - 1}, "
                             f"kv_cache has {len(kv_cache)} tensors")
        expected_heads = len(layout.head_range(rank))
        for tensor in kv_cache:
            if tensor.dim() != 5 or tensor.shape[1] != 2 or tensor.shape[2] != layout.block_size \
                    or tensor.shape[3] != expected_heads or not tensor.is_contiguous():
                raise ValueError(f"decode rank {rank}: cache tensors must be contiguous [num_blocks, 2, "
                                 f"{layout.block_size}, {expected_heads}, head_dim], got {tuple(tensor.shape)}")
        self._server = server
        self._cache_by_layer = dict(zip(stage, kv_cache))
        self.layout = layout
        self.rank = rank
        self._has_checksum = checksum
        self._posted: dict[str, _Posted] = {}

    @property
    def num_pending(self) -> int:
        return len(self._posted)

    def is_pending(self, request_id: str) -> bool:
        return request_id in self._posted

    def post(self, request_id: str, src: PrefillLayout, block_ids: Sequence[int], num_tokens: int,
             lease_s: float) -> RankTarget:
        """Post this rank's receives for the request's first `num_tokens` tokens into `block_ids`, planned for a
        prefill replica of layout `src`, and start its lease (aborted if not everything landed in `lease_s`)."""
        if request_id in self._posted:
            raise ValueError(f"request {request_id!r} already has a pending reservation on decode rank {self.rank}")
        if not lease_s > 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s}")
        first = next(iter(self._cache_by_layer.values()))
        if any(not 0 <= b < first.shape[0] for b in block_ids):
            raise ValueError(f"block ids must be in [0, {first.shape[0]}), got {list(block_ids)}")
        plan = plan_transfer(src, self.layout, num_tokens, [int(b) for b in block_ids])
        staged: list[tuple[MessageGroup, torch.Tensor]] = []
        checksums: list[tuple[list[torch.Tensor], torch.Tensor]] = []
        dst_per_group: list[list[torch.Tensor]] = []
        head_dim = first.shape[4]
        for group in message_groups(plan, self.rank):
            cache = self._cache_by_layer[group.layer]
            if group.block_chunks is not None:
                tensors = chunk_views(cache, group.block_chunks)
            else:
                staging = cache.new_empty(group.copy.message_shape(head_dim, 1)[1:])  # [2, tokens, heads, D]
                staged.append((group, staging))
                tensors = [staging]
            if self._has_checksum:
                received = empty_checksum_tensor(cache.device)
                checksums.append((tensors, received))
                tensors = tensors + [received]
            dst_per_group.append(tensors)
        transfer_id = self._server.new_transfer_id()
        landed = self._server.post_recv(transfer_id, dst_per_group)
        posted = _Posted(request_id, transfer_id, plan, landed, time.monotonic(), staged, checksums)
        posted.lease_timer = asyncio.get_running_loop().call_later(lease_s, self._expire, posted, lease_s)
        landed.add_done_callback(lambda _: posted.lease_timer.cancel())
        self._posted[request_id] = posted
        return RankTarget(address=self._server.address, transfer_id=transfer_id)

    async def wait_complete(self, request_id: str) -> TransferStats:
        """Wait until every message of this rank landed, scatter the staged ones into the blocks, and end the
        reservation (call once). Raises `TransferAborted` once nothing more can land (abort, lease expiry, sender
        failure, layout or checksum mismatch)."""
        posted = self._posted.get(request_id)
        if posted is None:
            raise KeyError(f"no pending reservation for request {request_id!r} on decode rank {self.rank}")
        try:
            num_bytes = await asyncio.shield(posted.landed)
        except TransferAborted as error:
            reason = posted.abort_reason or error.reason
            try:
                await self._end(posted)
            finally:
                self._forget(posted)
            raise TransferAborted(request_id, reason) from None
        self._forget(posted)
        if posted.abort_reason is not None:  # aborted after the last message landed but before we resumed
            raise TransferAborted(request_id, posted.abort_reason)
        self._verify_checksums(posted)
        if posted.staged:
            messages = [Message(copy_index=g.copy.index, layers=range(g.layer, g.layer + 1), tensor=t.unsqueeze(0))
                        for g, t in posted.staged]
            unpack_into(posted.plan, self.rank, messages, self._cache_by_layer)
        return TransferStats(num_bytes=num_bytes, seconds=time.monotonic() - posted.reserved_at)

    async def abort(self, request_id: str, reason: str = "aborted by the decode replica") -> bool:
        """End the reservation; once this returns nothing more lands in its blocks. False if none was pending."""
        posted = self._posted.get(request_id)
        if posted is None:
            return False
        if posted.abort_reason is None:
            posted.abort_reason = reason
        try:
            await self._end(posted)
        finally:
            self._forget(posted)
        return True

    async def close(self) -> None:
        for request_id in list(self._posted):
            await self.abort(request_id, "receiver closed")

    def _expire(self, posted: _Posted, lease_s: float) -> None:
        if posted.landed.done() or posted.ending is not None:
            return
        reason = f"lease of {lease_s:g}s expired before every layer arrived on decode rank {self.rank}"
        logger.warning("KV transfer of request %r: %s", posted.request_id, reason)
        if posted.abort_reason is None:
            posted.abort_reason = reason
        self._start_ending(posted)

    def _start_ending(self, posted: _Posted) -> asyncio.Task:
        if posted.ending is None:
            posted.lease_timer.cancel()
            posted.ending = asyncio.get_running_loop().create_task(self._server.cancel(posted.transfer_id))
            posted.ending.add_done_callback(lambda t: t.cancelled() or t.exception())
        return posted.ending

    async def _end(self, posted: _Posted) -> None:
        # Shielded: a caller giving up must not interrupt the cancel that protects the blocks.
        await asyncio.shield(self._start_ending(posted))

    def _forget(self, posted: _Posted) -> None:
        if self._posted.get(posted.request_id) is posted:
            del self._posted[posted.request_id]

    def _verify_checksums(self, posted: _Posted) -> None:
        for index, (tensors, received) in enumerate(posted.checksums):
            expected, actual = int(received.item()), layer_checksum(tensors)
            if actual != expected:
                raise TransferAborted(posted.request_id, f"checksum mismatch in message group {index} on decode rank "
                                                         f"{self.rank}: sender {expected:#010x}, received {actual:#010x}")


# ---------------------------------------------------------------------------------------------- prefill side


@dataclass(eq=False)
class _Push:
    plan: TransferPlan
    groups: dict[tuple[int, int], MessageGroup]  # (copy index, layer) -> its group on the destination rank
    expected: set[tuple[int, int]]  # (copy index, layer) this rank must send
    first_push_at: float
    pushed: set[tuple[int, int]] = field(default_factory=set)
    sends: list[asyncio.Task] = field(default_factory=list)


class RankKVSender:
    """One prefill rank's pushes: for each layer it computes, its own KV shard goes to every decode rank the plan
    names. Call every method on the client's event loop (from a compute thread: `run_coroutine_threadsafe`,
    `finish` submitted after the last `push_layer` from the same thread)."""

    def __init__(self, client: KVClient, layout: PrefillLayout, rank: int):
        layout.coords(rank)  # validates the rank
        self._client = client
        self.layout = layout
        self.rank = rank
        self._pushes: dict[tuple[str, tuple[int, ...]], _Push] = {}

    async def push_layer(self, info: MeshReservation, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Queue the sends of global layer `layer` (in this rank's stage). k, v: `[rows, local_kv_heads, head_dim]`,
        this request's rows in this rank's order (CP shard order; padding rows may be included or cut off).
        Returns without waiting for the network; errors surface in `finish`."""
        push = self._push_for(info)
        if layer not in self.layout.layer_range(self.rank):
            raise ValueError(f"prefill rank {self.rank} holds layers {self.layout.layer_range(self.rank)}, "
                             f"not layer {layer}")
        for name, tensor in (("k", k), ("v", v)):
            if _dtype_name(tensor.dtype) != info.dtype:
                raise ValueError(f"{name} is {_dtype_name(tensor.dtype)}, the reservation expects {info.dtype}")
        loop = asyncio.get_running_loop()
        for copy in push.plan.copies_from(self.rank):
            if layer not in copy.layers:
                continue
            key = (copy.index, layer)
            if key in push.pushed:
                raise ValueError(f"layer {layer} of request {info.request_id!r} was already pushed")
            group = push.groups[key]
            tensors = _pack_group(push.plan, group, k, v)
            if info.has_checksum:
                tensors.append(checksum_tensor(layer_checksum(tensors), device=k.device))
            push.pushed.add(key)
            target = info.targets[copy.dst_rank]
            send = loop.create_task(self._send(target, group.index, tensors))
            send.add_done_callback(lambda t: t.cancelled() or t.exception())
            push.sends.append(send)

    async def _send(self, target: RankTarget, group_index: int, tensors: list[torch.Tensor]) -> int:
        if tensors[0].is_cuda:
            # UCX reads device memory outside torch's streams: the packing kernels must be done first.
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(tensors[0].device))
            while not done.query():
                await asyncio.sleep(0.0001)
        return await self._client.send(target.address, target.transfer_id, group_index, tensors)

    async def finish(self, info: MeshReservation, timeout_s: float | None = 60.0) -> TransferStats:
        """Wait for every send of this rank for the request; raises `TransferAborted` if one of its layers was never
        pushed, a send failed or they did not complete within `timeout_s`. A rank with nothing to send for this
        request (its heads are sent by a replica) returns 0 bytes."""
        push = self._pushes.pop(_key(info), None)
        if push is None:
            push = self._new_push(info)
        done, pending = await asyncio.wait(push.sends, timeout=timeout_s) if push.sends else (set(), set())
        if pending:
            raise TransferAborted(info.request_id, f"{len(pending)} KV send(s) of prefill rank {self.rank} did not "
                                                   f"complete within {timeout_s}s")
        for send in push.sends:
            if send.exception() is not None:
                raise TransferAborted(info.request_id, f"sending KV failed: {send.exception()}")
        missing = sorted(push.expected - push.pushed)
        if missing:
            layers = sorted({layer for _, layer in missing})
            raise TransferAborted(info.request_id, f"prefill rank {self.rank} never pushed layers {layers}")
        return TransferStats(num_bytes=sum(s.result() for s in push.sends),
                             seconds=time.monotonic() - push.first_push_at)

    def abort(self, info: MeshReservation) -> None:
        """Forget the request; sends already queued finish in the background and the receiver drops them."""
        self._pushes.pop(_key(info), None)

    @property
    def num_pending(self) -> int:
        return len(self._pushes)

    def _push_for(self, info: MeshReservation) -> _Push:
        push = self._pushes.get(_key(info))
        if push is None:
            push = self._pushes[_key(info)] = self._new_push(info)
        return push

    def _new_push(self, info: MeshReservation) -> _Push:
        if info.src != self.layout:
            raise ValueError(f"request {info.request_id!r}: the decode replica planned its receives for a prefill mesh "
                             f"pp={info.src.pp} cp={info.src.cp} tp={info.src.tp}, this replica is pp={self.layout.pp} "
                             f"cp={self.layout.cp} tp={self.layout.tp}")
        plan = info.plan()
        mine = plan.copies_from(self.rank)
        groups: dict[tuple[int, int], MessageGroup] = {}
        for dst_rank in sorted({c.dst_rank for c in mine}):
            for group in message_groups(plan, dst_rank):
                if group.copy.src_rank == self.rank:
                    groups[(group.copy.index, group.layer)] = group
        expected = {(c.index, layer) for c in mine for layer in c.layers}
        return _Push(plan=plan, groups=groups, expected=expected, first_push_at=time.monotonic())


def _pack_group(plan: TransferPlan, group: MessageGroup, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
    """The tensors of one message group, from one layer's local K/V of the source rank."""
    copy = group.copy
    heads = slice(copy.src_heads_local.start, copy.src_heads_local.stop)
    needed_rows = max(run.src_row + run.length for run in copy.token_runs)
    if k.shape != v.shape or k.dim() != 3 or k.shape[0] < needed_rows:
        raise ValueError(f"k and v must be [>= {needed_rows} rows, local heads, head_dim], got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if group.block_chunks is not None:
        # Direct: rows 0..num_tokens are the prompt in order; lay them out as whole destination blocks.
        rows = slice(0, plan.num_tokens)
        return pack_chunks(k[rows, heads], v[rows, heads], group.block_chunks, plan.dst.block_size)
    out = k.new_empty(copy.message_shape(k.shape[-1], 1)[1:])  # [2, tokens, heads, D], tokens in run order
    offset = 0
    for run in copy.token_runs:
        rows = slice(run.src_row, run.src_row + run.length)
        out[0, offset:offset + run.length] = k[rows, heads]
        out[1, offset:offset + run.length] = v[rows, heads]
        offset += run.length
    return [out]


def _key(info: MeshReservation) -> tuple[str, tuple[int, ...]]:
    return (info.request_id, tuple(t.transfer_id for t in info.targets))
