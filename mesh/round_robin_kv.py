"""The persistent KV cache of a context-parallel prefill mesh: one `RoundRobinKVStore` per rank, holding its share
of every stored sequence in `mesh.cp_sharding`'s round-robin layout (position p of a sequence on cp rank p % cp),
for the layers of its pipeline stage and the KV heads of its tp rank.

Why round-robin: it depends only on (length, cp), so it stays valid however a sequence's history was chunked
into steps (module docstring of `mesh.cp_sharding`), and it is exactly the cached-prefix layout `ring_attention`
takes. A follow-up turn therefore prefills only its new tokens against what is stored (partial prefill).

Who calls it: the prefill rank actors (one store per rank, passed to every CP forward as `cp_store`, with
`AttentionBatch.seq_keys` naming the stored sequences); `CausalLM.forward` reads the cached prefix per layer and,
after each layer's attention, sends the step's new K/V rows (held in the load-balanced 2N-chunk layout) to their
round-robin owners with one all-to-all per layer; the store commits them when the forward ends. `gather` rebuilds a
whole sequence on every cp rank (what a KV transfer to an unsharded decode mesh needs; tests use it too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable

import torch

from mesh import comm
from mesh.cp_sharding import PADDING, CPShardPlan


class RoundRobinKVStore:
    """K and V rows per (sequence key, stage-local layer): [num_rows_here, num_kv_heads_local, head_dim], rows
    ordered by position (positions cp_rank, cp_rank + cp, ...)."""

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, cp_size: int, cp_rank: int,
                 dtype: torch.dtype = torch.float32, device: Any = "cpu") -> None:
        if not 0 <= cp_rank < cp_size:
            raise ValueError(f"RoundRobinKVStore: cp_rank {cp_rank} is outside 0..{cp_size - 1}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.cp_size, self.cp_rank = cp_size, cp_rank
        self.dtype, self.device = dtype, torch.device(device)
        self._k: dict[Hashable, list[torch.Tensor]] = {}
        self._v: dict[Hashable, list[torch.Tensor]] = {}
        self._lengths: dict[Hashable, int] = {}

    @classmethod
    def for_model(cls, model: Any) -> RoundRobinKVStore:
        """A store shaped for this rank of `model` (a `mesh.model.CausalLM`)."""
        dims = model.dims
        return cls(num_layers=model.num_layers, num_kv_heads=model.num_kv_heads_local, head_dim=model.head_dim,
                   cp_size=dims.cp_size, cp_rank=dims.cp_rank, dtype=model.dtype, device=model.device)

    def num_tokens(self, key: Hashable) -> int:
        """The sequence's stored length over all cp ranks (0 for an unknown key)."""
        return self._lengths.get(key, 0)

    def keys(self) -> list[Hashable]:
        return list(self._lengths)

    def drop(self, key: Hashable) -> bool:
        """Forget a sequence (every cp rank must drop it too). False if it was not stored."""
        self._k.pop(key, None)
        self._v.pop(key, None)
        return self._lengths.pop(key, None) is not None

    def rows(self, key: Hashable, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's stored K and V rows of one sequence and stage-local layer."""
        if key not in self._lengths:
            return self._empty(), self._empty()
        return self._k[key][layer], self._v[key][layer]

    def begin_step(self, plan: CPShardPlan, seq_keys: list[Hashable], group: Any) -> StoreStep:
        """Checks that the step extends exactly what is stored (context_lens[i] == num_tokens(seq_keys[i])) and
        returns the per-step handle the model uses layer by layer."""
        if len(seq_keys) != len(plan.query_lens) or len(set(seq_keys)) != len(seq_keys):
            raise ValueError(f"RoundRobinKVStore: need one distinct key per sequence ({len(plan.query_lens)}), got "
                             f"{list(seq_keys)}")
        if plan.cp_size != self.cp_size:
            raise ValueError(f"RoundRobinKVStore: plan for cp={plan.cp_size}, store for cp={self.cp_size}")
        for key, context in zip(seq_keys, plan.context_lens):
            if self.num_tokens(key) != context:
                raise ValueError(f"RoundRobinKVStore: sequence {key!r} has {self.num_tokens(key)} stored tokens but "
                                 f"the step says context_len={context}; a step must extend exactly what is stored")
        return StoreStep(self, plan, list(seq_keys), group)

    def gather(self, key: Hashable, group: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Collective over the cp group (every cp rank calls it for the same key): per stage-local layer, the
        sequence's whole K and V [num_tokens, num_kv_heads_local, head_dim] in position order."""
        length = self.num_tokens(key)
        rows_per_rank = -(-length // self.cp_size)
        out = []
        for layer in range(self.num_layers):
            k, v = self.rows(key, layer)
            local = torch.zeros((rows_per_rank, 2, self.num_kv_heads, self.head_dim), dtype=self.dtype,
                                device=self.device)
            local[:k.shape[0], 0], local[:k.shape[0], 1] = k, v
            if self.cp_size == 1:
                parts = [local]
            else:
                parts = [torch.empty_like(local) for _ in range(self.cp_size)]
                # Not part of a forward step (the tiers do not call it); counted with the store's traffic.
                comm.all_gather(parts, local, group=group, kind="cp_kv_exchange")
            # Row j of rank r is position j * cp + r: stacking ranks on dim 1 and flattening interleaves them.
            whole = torch.stack(parts, dim=1).flatten(0, 1)[:length]
            out.append((whole[:, 0], whole[:, 1]))
        return out

    def _empty(self) -> torch.Tensor:
        return torch.zeros((0, self.num_kv_heads, self.head_dim), dtype=self.dtype, device=self.device)

    def _append(self, key: Hashable, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if key not in self._k:
            self._k[key] = [self._empty() for _ in range(self.num_layers)]
            self._v[key] = [self._empty() for _ in range(self.num_layers)]
        self._k[key][layer] = torch.cat([self._k[key][layer], k.to(self.dtype)])
        self._v[key][layer] = torch.cat([self._v[key][layer], v.to(self.dtype)])


@dataclass(eq=False)
class _Exchange:
    """Which of this rank's new-token rows go to which round-robin owner, and where received rows belong. A pure
    function of the plan: every rank knows every other rank's rows, so receivers need no metadata message."""

    send_rows: torch.Tensor  # local shard rows, grouped by owner rank
    send_splits: list[int]
    recv_splits: list[int]
    recv_order: torch.Tensor  # received rows (sources concatenated) -> sorted by (sequence, position)
    recv_per_seq: list[int]  # rows of each sequence after sorting

    @classmethod
    def build(cls, plan: CPShardPlan, rank: int) -> _Exchange:
        cp = plan.cp_size

        def owned(source: int) -> tuple[torch.Tensor, torch.Tensor]:
            is_real = plan.seq_ids[source] != PADDING
            return is_real, plan.positions[source] % cp

        is_real, owner = owned(rank)
        send_rows, send_splits = [], []
        for dest in range(cp):
            rows = ((owner == dest) & is_real).nonzero().flatten()  # shard order: sequence, then position
            send_rows.append(rows)
            send_splits.append(rows.numel())
        recv_seq, recv_pos, recv_splits = [], [], []
        for source in range(cp):
            source_real, source_owner = owned(source)
            rows = ((source_owner == rank) & source_real).nonzero().flatten()
            recv_seq.append(plan.seq_ids[source][rows])
            recv_pos.append(plan.positions[source][rows])
            recv_splits.append(rows.numel())
        seq, pos = torch.cat(recv_seq), torch.cat(recv_pos)
        max_position = int(pos.max()) + 1 if pos.numel() else 1
        recv_order = torch.argsort(seq * max_position + pos)
        recv_per_seq = torch.bincount(seq, minlength=len(plan.query_lens)).tolist()
        return cls(torch.cat(send_rows), send_splits, recv_splits, recv_order, recv_per_seq)


class StoreStep:
    """One forward's view of the store: `cached(layer)` for ring attention, `send_new(layer, k, v)` after the
    layer's attention, `commit()` when the forward ends (appends every layer and updates the lengths)."""

    def __init__(self, store: RoundRobinKVStore, plan: CPShardPlan, seq_keys: list[Hashable], group: Any) -> None:
        self.store, self.plan, self.seq_keys, self.group = store, plan, seq_keys, group
        self.exchange = _Exchange.build(plan, store.cp_rank)
        self._send_rows = self.exchange.send_rows.to(store.device)
        self._recv_order = self.exchange.recv_order.to(store.device)
        self._pending: list[tuple[int, torch.Tensor, Any]] = []

    @property
    def has_cache(self) -> bool:
        return self.plan.num_cached_tokens > 0

    def cached(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's cached-prefix rows of the step's sequences, packed in the plan's order."""
        ks, vs = zip(*(self.store.rows(key, layer) for key in self.seq_keys))
        return torch.cat(ks), torch.cat(vs)

    def send_new(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Posts the all-to-all moving this layer's new rows (the rank's 2N-chunk shard) to their owners."""
        ex = self.exchange
        outgoing = torch.stack([k[self._send_rows], v[self._send_rows]], dim=1).contiguous()  # [rows, 2, H, D]
        incoming = outgoing.new_empty((sum(ex.recv_splits), *outgoing.shape[1:]))
        if self.store.cp_size == 1:
            incoming.copy_(outgoing)
            work = None
        else:
            work = comm.all_to_all_single(incoming, outgoing, ex.recv_splits, ex.send_splits, group=self.group,
                                          kind="cp_kv_exchange", async_op=True)
        self._pending.append((layer, incoming, work))

    def commit(self) -> None:
        """Waits for every layer's exchange and appends the rows; then the stored lengths include the step."""
        if len(self._pending) != self.store.num_layers:
            raise RuntimeError(f"StoreStep.commit: {len(self._pending)} of {self.store.num_layers} layers sent")
        for layer, incoming, work in self._pending:
            if work is not None:
                work.wait()
            rows = incoming[self._recv_order]
            for key, part in zip(self.seq_keys, rows.split(self.exchange.recv_per_seq)):
                self.store._append(key, layer, part[:, 0], part[:, 1])
        for key, context, new in zip(self.seq_keys, self.plan.context_lens, self.plan.query_lens):
            self.store._lengths[key] = context + new
        self._pending.clear()
