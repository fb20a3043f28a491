"""The process group of one replica's rank actors and the control channel rank 0 drives them with.

Who calls it: the tier actors (prefill_tier, decode_tier) when a replica has more than one rank.
- Rank 0 calls `open_rendezvous(host, world_size)`: it starts the TCP key-value store that torch.distributed
  rendezvous through, on its own node address and a port the OS picks (no race over a "free" port), and returns
  the picklable `Rendezvous` to hand to the other ranks plus the store it keeps.
- Every rank calls `RankGroup.join(rendezvous, rank, store=...)` (rank 0 passes its store; the others connect
  to it). It blocks until all ranks have joined. Then every rank builds `mesh.parallel.ParallelDims` (its
  group creation is collective too) and loads its shard of the model.
- Each step, rank 0 calls `group.broadcast(step)` and the others `group.broadcast()` to receive it; results
  come back with `group.gather(result)` (rank 0 gets the list) or `group.broadcast(value, src=r)`.

The control channel is its own Gloo group, whatever the backend of the model's collectives (NCCL on GPU): step
descriptions are small pickled Python objects, and a separate group keeps them from interleaving with tensor
collectives. Non-zero ranks wait on it while the replica is idle, so its timeout is long (`idle_timeout_s`); a
dead rank 0 closes its sockets and the waiting ranks fail at once rather than at the timeout.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mesh.parallel import MeshShape, ParallelDims

_BACKENDS = ("gloo", "nccl")


@dataclass(frozen=True, kw_only=True)
class Rendezvous:
    """Where the ranks of one replica meet (rank 0's store) and how their world is set up. Picklable."""

    host: str
    port: int
    world_size: int
    backend: str = "gloo"  # of the model's collectives: gloo on CPU, nccl on GPU
    timeout_s: float = 600.0  # joining, and any one collective of a step
    idle_timeout_s: float = 30 * 24 * 3600.0  # a control-channel wait (an idle replica waits for its next step)

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("Rendezvous.host must be the address rank 0's store listens on")
        if not 0 < self.port < 65536:
            raise ValueError(f"Rendezvous.port must be a TCP port, got {self.port}")
        if self.world_size < 1:
            raise ValueError(f"Rendezvous.world_size must be >= 1, got {self.world_size}")
        if self.backend not in _BACKENDS:
            raise ValueError(f"Rendezvous.backend must be one of {_BACKENDS}, got {self.backend!r}")
        if not (self.timeout_s > 0 and self.idle_timeout_s > 0):
            raise ValueError("Rendezvous timeouts must be > 0")


def open_rendezvous(host: str, world_size: int, *, backend: str = "gloo",
                    timeout_s: float = 600.0) -> tuple[Rendezvous, dist.TCPStore]:
    """Rank 0: start the store on `host` (an address the other ranks reach) at an OS-chosen port."""
    store = dist.TCPStore(host, 0, world_size, True, timeout=datetime.timedelta(seconds=timeout_s),
                          wait_for_workers=False)
    return Rendezvous(host=host, port=store.port, world_size=world_size, backend=backend, timeout_s=timeout_s), store


class RankGroup:
    """One rank's membership of its replica's world. Create with `join`; one per process."""

    def __init__(self, rank: int, world_size: int, control: Any):
        self.rank = rank
        self.world_size = world_size
        self._control = control

    @classmethod
    def join(cls, rendezvous: Rendezvous, rank: int, *, store: dist.TCPStore | None = None,
             device: Any = None) -> RankGroup:
        """Blocks until every rank joined. `store`: rank 0's own store from `open_rendezvous`. `device`: this rank's
        CUDA device with NCCL (binds the communicator to it), None on CPU."""
        if not 0 <= rank < rendezvous.world_size:
            raise ValueError(f"rank {rank} is outside the world of {rendezvous.world_size} ranks")
        if dist.is_initialized():
            raise RuntimeError("this process already belongs to a torch.distributed world (one rank per process)")
        timeout = datetime.timedelta(seconds=rendezvous.timeout_s)
        if store is None:
            store = dist.TCPStore(rendezvous.host, rendezvous.port, rendezvous.world_size, False, timeout=timeout)
        bind = {"device_id": torch.device(device)} if device is not None and rendezvous.backend == "nccl" else {}
        dist.init_process_group(rendezvous.backend, store=store, rank=rank, world_size=rendezvous.world_size,
                                timeout=timeout, **bind)
        control = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=rendezvous.idle_timeout_s))
        return cls(rank, rendezvous.world_size, control)

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def broadcast(self, value: Any = None, *, src: int = 0) -> Any:
        """Collective: every rank gets `src`'s value (the others' `value` is ignored)."""
        box = [value if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, group=self._control)
        return box[0]

    def gather(self, value: Any) -> list[Any] | None:
        """Collective: rank 0 gets every rank's value in rank order; the others get None."""
        out = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(value, out, dst=0, group=self._control)
        return out

    def close(self) -> None:
        """Leave the world (best effort: the other ranks may already be gone)."""
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def join_mesh(rendezvous: Rendezvous | None, rank: int, shape: MeshShape, *, store: dist.TCPStore | None = None,
              device: Any = None) -> tuple[RankGroup | None, ParallelDims]:
    """Join the replica's world and build this rank's `ParallelDims` (both collective, in the same order on every
    rank). A one-rank mesh needs no rendezvous and touches no torch.distributed: (None, ParallelDims.single())."""
    if shape.world_size == 1:
        return None, ParallelDims.single()
    if rendezvous is None or rendezvous.world_size != shape.world_size:
        raise ValueError(f"a {shape.world_size}-rank mesh {shape} needs a rendezvous for {shape.world_size} ranks, "
                         f"got {rendezvous}")
    group = RankGroup.join(rendezvous, rank, store=store, device=device)
    return group, ParallelDims(shape, rank)
