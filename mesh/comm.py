"""The one door every model collective in mesh/ goes through: it counts the payload into the current ledger and
hands the call to the implementation registered for the process group (torch.distributed unless one is plugged).

Who calls it: the parallel layers and steps of mesh/ (layers.py, moe.py, context_parallel.py, ring_attention.py,
round_robin_kv.py, pipeline.py) instead of torch.distributed; the tier rank steps open a ledger around each forward
(`with comm.ledger_scope() as ledger:`) and attribute its bytes to the step's requests (`attribute`);
mesh/dda*.py plugs direct-access GPU collectives into chosen groups with `register_group_impl`.

What is counted ("payload", as orchestrator/planner/volumes.py defines it, so counted bytes equal the closed
forms exactly): an all-reduce counts its buffer, an all-gather this rank's input, a send the tensor sent (a receive
counts nothing: its sender counted it), an all-to-all the part of this rank's send buffer addressed to other ranks,
a broadcast the buffer on its source rank only. Every rank counts what it hands over; a replica's figure is the sum
over its ranks.

Cost: with no ledger active a call costs one thread-local read and one dict lookup beyond the collective itself;
with one active, an integer add. No synchronisation, no allocation per call.

Ledger scope: thread-local (a rank runs its forward on one compute thread), so two engines in one process (tests)
or an event loop beside the compute thread never count into each other's ledgers.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

COMM_KINDS = ("tp_allreduce", "tp_allgather", "pp_send", "cp_ring", "cp_all_to_all", "cp_row_gather",
              "cp_kv_exchange", "ep_all_to_all", "ep_allgather")
# Kinds whose payload is proportional to the rows each sequence has in a step; the others below scale with the
# sequence's returned logits rows (one per sequence) or, for pass-KV, with its new plus cached rows.
_PER_LOGIT_KINDS = frozenset({"tp_allgather", "cp_row_gather"})


class CommLedger:
    """Payload bytes by kind, for one rank and one step (or whatever span the scope covers)."""

    __slots__ = ("bytes_by_kind",)

    def __init__(self) -> None:
        self.bytes_by_kind: dict[str, int] = dict.fromkeys(COMM_KINDS, 0)

    def add(self, kind: str, num_bytes: int) -> None:
        if kind not in self.bytes_by_kind:
            raise ValueError(f"CommLedger: unknown communication kind {kind!r}; expected one of {COMM_KINDS}")
        self.bytes_by_kind[kind] += num_bytes

    def nonzero(self) -> dict[str, int]:
        return {kind: n for kind, n in self.bytes_by_kind.items() if n}

    @property
    def total(self) -> int:
        return sum(self.bytes_by_kind.values())


_state = threading.local()


def active_ledger() -> CommLedger | None:
    return getattr(_state, "ledger", None)


@contextmanager
def ledger_scope(ledger: CommLedger | None = None) -> Iterator[CommLedger]:
    """Counts this thread's collectives into `ledger` (a new one by default) until the block ends; nests (the outer
    ledger is restored, and does not see the inner block's bytes)."""
    ledger = CommLedger() if ledger is None else ledger
    previous = active_ledger()
    _state.ledger = ledger
    try:
        yield ledger
    finally:
        _state.ledger = previous


def _count(kind: str, tensor: torch.Tensor) -> None:
    """Adds `tensor`'s bytes to the thread's ledger, if one is open (sizes are only computed then)."""
    ledger = getattr(_state, "ledger", None)
    if ledger is not None:
        ledger.add(kind, tensor.numel() * tensor.element_size())


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


# --- pluggable implementations per process group ------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class GroupImpl:
    """Replacement collectives for one process group; None keeps torch.distributed's.
    all_reduce(tensor) -> None: sums in place over the group.
    all_to_all_single(output, input, output_split_sizes, input_split_sizes) -> None: as torch's, synchronous (an
    async caller then gets no work handle and finds the output ready)."""

    all_reduce: Callable[[torch.Tensor], None] | None = None
    all_to_all_single: Callable[..., None] | None = None

    def __post_init__(self) -> None:
        for name in ("all_reduce", "all_to_all_single"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise TypeError(f"GroupImpl.{name} must be callable or None, got {type(value).__name__}")


_impls: dict[Any, GroupImpl] = {}


def register_group_impl(group: Any, *, all_reduce: Callable[[torch.Tensor], None] | None = None,
                        all_to_all_single: Callable[..., None] | None = None) -> None:
    """Routes this group's all-reduces / all-to-alls (those given) to the callables from now on, in this process.
    Who calls it: a rank that set up a faster path for one of its groups (mesh/dda*.py), after the group exists and
    before the forward; every rank of the group must register alike (the callables are collectives too)."""
    if group is None:
        raise ValueError("register_group_impl: pass a process group (None means 'no communication' in mesh/)")
    _impls[group] = GroupImpl(all_reduce=all_reduce, all_to_all_single=all_to_all_single)


def unregister_group_impl(group: Any) -> bool:
    """Back to torch.distributed for this group; False if nothing was registered."""
    return _impls.pop(group, None) is not None


def group_impl(group: Any) -> GroupImpl | None:
    return _impls.get(group)


# --- the collectives ------------------------------------------------------------------------------------------------

def all_reduce(tensor: torch.Tensor, *, group: Any, kind: str) -> None:
    """Sum in place over `group`; counts the buffer."""
    _count(kind, tensor)
    impl = _impls.get(group)
    if impl is not None and impl.all_reduce is not None:
        impl.all_reduce(tensor)
    else:
        dist.all_reduce(tensor, group=group)


def all_gather(outputs: list[torch.Tensor], tensor: torch.Tensor, *, group: Any, kind: str) -> None:
    """Every rank's `tensor` into `outputs` (one per rank); counts this rank's input."""
    _count(kind, tensor)
    dist.all_gather(outputs, tensor, group=group)


def all_gather_into_tensor(output: torch.Tensor, tensor: torch.Tensor, *, group: Any, kind: str) -> None:
    """Every rank's `tensor` concatenated along dim 0 into `output`; counts this rank's input."""
    _count(kind, tensor)
    dist.all_gather_into_tensor(output, tensor, group=group)


def all_to_all_single(output: torch.Tensor, input: torch.Tensor, output_split_sizes: list[int] | None = None,
                      input_split_sizes: list[int] | None = None, *, group: Any, kind: str,
                      async_op: bool = False) -> Any:
    """As torch.distributed.all_to_all_single; counts the rows of `input` addressed to other ranks (equal splits
    when none are given). Returns a work handle with async_op (None when a plugged implementation ran)."""
    ledger = getattr(_state, "ledger", None)
    if ledger is not None:
        ledger.add(kind, _leaving_bytes(input, input_split_sizes, group))
    impl = _impls.get(group)
    if impl is not None and impl.all_to_all_single is not None:
        impl.all_to_all_single(output, input, output_split_sizes, input_split_sizes)
        return None
    return dist.all_to_all_single(output, input, output_split_sizes, input_split_sizes, group=group,
                                  async_op=async_op)


def _leaving_bytes(input: torch.Tensor, input_split_sizes: list[int] | None, group: Any) -> int:
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    total = _nbytes(input)
    if input_split_sizes is None:
        return total * (size - 1) // size
    num_rows = input.shape[0] if input.dim() else 1
    row_bytes = total // num_rows if num_rows else 0
    return (sum(input_split_sizes) - input_split_sizes[rank]) * row_bytes


def isend(tensor: torch.Tensor, *, group: Any, group_dst: int, tag: int = 0, kind: str) -> Any:
    """Non-blocking send to group rank `group_dst`; counts the tensor."""
    _count(kind, tensor)
    return dist.isend(tensor, group=group, group_dst=group_dst, tag=tag)


def irecv(tensor: torch.Tensor, *, group: Any, group_src: int, tag: int = 0) -> Any:
    """Non-blocking receive from group rank `group_src`; counts nothing (the sender did)."""
    return dist.irecv(tensor, group=group, group_src=group_src, tag=tag)


def exchange(send: torch.Tensor, recv: torch.Tensor, *, group: Any, send_peer: int, recv_peer: int,
             kind: str) -> list:
    """Posts send -> group rank `send_peer` and receive <- `recv_peer` together (batch_isend_irecv, so a ring of
    such calls cannot deadlock) and returns the work handles; counts the tensor sent."""
    _count(kind, send)
    ops = [dist.P2POp(dist.isend, send, group=group, group_peer=send_peer),
           dist.P2POp(dist.irecv, recv, group=group, group_peer=recv_peer)]
    return dist.batch_isend_irecv(ops)


def broadcast(tensor: torch.Tensor, *, group: Any, group_src: int, kind: str) -> None:
    """From group rank `group_src` to the others; the source counts the buffer."""
    if getattr(_state, "ledger", None) is not None and dist.get_rank(group) == group_src:
        _count(kind, tensor)
    dist.broadcast(tensor, group=group, group_src=group_src)


# --- attribution to requests ----------------------------------------------------------------------------------------

def attribute(bytes_by_kind: dict[str, int], *, rows: list[int], kv_rows: list[int] | None = None,
              ) -> list[dict[str, int]]:
    """Splits one rank's step ledger over the step's sequences: per-row kinds in proportion to `rows` (the rows
    each sequence has on this rank in the step: its new tokens, or its padded CP shard), the logits kinds
    (tp_allgather, cp_row_gather) evenly (one returned row each), cp_ring in proportion to `kv_rows` when given
    (pass-KV blocks carry each sequence's new and cached rows). Exact integers: the shares of a kind sum to its
    total, and equal the closed form per sequence whenever the kind is linear in those weights (volumes.py).
    Who calls it: the prefill and decode rank steps, after each forward."""
    num_seqs = len(rows)
    if num_seqs == 0:
        raise ValueError("comm.attribute: a step has at least one sequence")
    if kv_rows is not None and len(kv_rows) != num_seqs:
        raise ValueError(f"comm.attribute: kv_rows has {len(kv_rows)} entries for {num_seqs} sequences")
    shares: list[dict[str, int]] = [{} for _ in range(num_seqs)]
    for kind, total in bytes_by_kind.items():
        if not total:
            continue
        if kind in _PER_LOGIT_KINDS:
            weights = [1] * num_seqs
        elif kind == "cp_ring" and kv_rows is not None:
            weights = kv_rows
        else:
            weights = rows
        for share, part in zip(shares, split_exact(total, weights)):
            if part:
                share[kind] = part
    return shares


def attribute_step(bytes_by_kind: dict[str, int], *, query_lens: list[int], context_lens: list[int] | None = None,
                   cp_size: int = 1, cp_rank: int = 0, is_sharded: bool = False) -> list[dict[str, int]]:
    """`attribute` with the weights of one forward step of CausalLM on this rank: rows are each sequence's new
    tokens, or, on a CP-sharded step (`is_sharded`: cp > 1 without a paged cache, or any step through a
    round-robin store, even at cp == 1), its padded shard 2 * ceil(L / 2N) on every rank;
    pass-KV ring blocks add its cached rows ceil(C / N) (the step ran pass-KV when it moved no cp_all_to_all bytes;
    a step whose micro-batches chose different modes is split by rows); the round-robin store exchange weighs the
    rows of each sequence that leave this rank for their owner (position p lives on rank p % N)."""
    context_lens = list(context_lens or [0] * len(query_lens))
    if not is_sharded:
        return attribute(bytes_by_kind, rows=list(query_lens))
    rows = [2 * -(-n // (2 * cp_size)) for n in query_lens]
    kv_rows = None
    if not bytes_by_kind.get("cp_all_to_all"):
        kv_rows = [r + -(-c // cp_size) for r, c in zip(rows, context_lens)]
    shares = attribute({k: n for k, n in bytes_by_kind.items() if k != "cp_kv_exchange"}, rows=rows, kv_rows=kv_rows)
    exchanged = bytes_by_kind.get("cp_kv_exchange", 0)
    if exchanged:
        leaving = [_rows_leaving(n, c, cp_size, cp_rank) for n, c in zip(query_lens, context_lens)]
        for share, part in zip(shares, split_exact(exchanged, leaving)):
            if part:
                share["cp_kv_exchange"] = part
    return shares


def _rows_leaving(length: int, context: int, cp_size: int, cp_rank: int) -> int:
    """Rows of one sequence's shard on `cp_rank` (chunks cp_rank and 2N-1-cp_rank of ceil(L / 2N) positions after
    its cached prefix) whose round-robin owner is another rank."""
    chunk = -(-length // (2 * cp_size))
    leaving = 0
    for index in (cp_rank, 2 * cp_size - 1 - cp_rank):
        start, stop = context + index * chunk, context + min((index + 1) * chunk, length)
        leaving += sum(1 for position in range(start, stop) if position % cp_size != cp_rank)
    return leaving


def split_exact(total: int, weights: list[int]) -> list[int]:
    """Integer shares of `total` in proportion to `weights` that sum to `total` (largest remainder; all weights
    zero: even split)."""
    if not weights:
        return []
    if sum(weights) <= 0:
        weights = [1] * len(weights)
    weight_sum = sum(weights)
    shares = [total * w // weight_sum for w in weights]
    remainders = sorted(range(len(weights)), key=lambda i: -(total * weights[i] % weight_sum))
    for i in remainders[:total - sum(shares)]:
        shares[i] += 1
    return shares


class RequestTally:
    """Per-request totals over many steps on one rank (a decode rank: a request runs in many steps).

    Who calls it: the rank's step thread calls `add_step` after each forward (in step order); the event loop calls
    `take` when a request finishes, after `num_steps` reached the finishing step. Thread-safe. Requests nobody takes
    (aborted, failed) are dropped oldest first beyond `max_requests`, so the tally stays bounded."""

    def __init__(self, *, max_requests: int = 4096) -> None:
        if max_requests < 1:
            raise ValueError(f"RequestTally: max_requests must be >= 1, got {max_requests}")
        self.max_requests = max_requests
        self._by_request: OrderedDict[str, dict[str, int]] = OrderedDict()
        self._num_steps = 0
        self._lock = threading.Lock()

    @property
    def num_steps(self) -> int:
        """Steps recorded so far (every forward this rank ran, whatever it moved)."""
        return self._num_steps

    def add_step(self, request_ids: tuple[str, ...] | list[str], query_lens: tuple[int, ...] | list[int],
                 ledger: CommLedger) -> None:
        """One forward over these sequences (no CP sharding: decode steps), split by rows (query_lens: 1 per decode
        row, the chunk's length for a prompt chunk), hence evenly over a decode-only step."""
        shares = attribute(ledger.nonzero(), rows=list(query_lens)) if ledger.total and request_ids else []
        with self._lock:
            for request_id, share in zip(request_ids, shares):
                if share:
                    add_into(self._by_request.setdefault(request_id, {}), share)
                    self._by_request.move_to_end(request_id)
            while len(self._by_request) > self.max_requests:
                self._by_request.popitem(last=False)
            self._num_steps += 1

    def take(self, request_id: str) -> dict[str, int]:
        """The request's bytes by kind so far, forgotten here ({} when it moved none)."""
        with self._lock:
            return self._by_request.pop(request_id, {})


def add_into(target: dict[str, int], source: dict[str, int]) -> dict[str, int]:
    """target += source, by kind (who calls it: whoever sums ranks' or steps' shares of one request)."""
    for kind, n in source.items():
        target[kind] = target.get(kind, 0) + n
    return target
