"""One prefill rank's share of the prefix cache: the mesh's persistent KV store (`mesh.round_robin_kv`) plus the
one operation the prefix cache needs on top of it, `fork` (start a new sequence as a copy of a cached prefix).

Who calls it: `PrefillRankCore` (prefill_tier/rank_step.py) on every rank, applying rank 0's `PrefixStepPlan`
around a step: drops, forks, then the forward with `cp_store=` this store and `seq_keys=` the plan's store keys
(the model appends each request's new tokens after its copied prefix). The bookkeeping (what to keep, evict,
match) is rank 0's (prefill_tier/prefix_cache.py); a rank only does what the plan says, so all ranks stay equal.
"""

from __future__ import annotations

from collections.abc import Hashable

from mesh.round_robin_kv import RoundRobinKVStore
from prefill_tier.prefix_cache import PrefixStepPlan


class PrefixKVStore(RoundRobinKVStore):
    """A `RoundRobinKVStore` whose sequences can be forked. Rows are stored in position order, position p on cp
    rank p % cp, so the first n positions of a sequence are a prefix of each rank's rows."""

    def fork(self, source: Hashable, key: Hashable, num_tokens: int) -> None:
        """Store the first `num_tokens` positions of `source` under `key` (a new key). The copy is a view: the next
        step's commit concatenates the new rows onto it, which makes the new sequence its own tensors."""
        if key in self._lengths:
            raise ValueError(f"PrefixKVStore.fork: key {key!r} is already stored")
        stored = self.num_tokens(source)
        if not 0 < num_tokens <= stored:
            raise ValueError(f"PrefixKVStore.fork: cannot take {num_tokens} tokens of {source!r}, which holds {stored}")
        # Positions cp_rank, cp_rank + cp, ... below num_tokens.
        num_rows = max(0, -(-(num_tokens - self.cp_rank) // self.cp_size))
        self._k[key] = [k[:num_rows] for k in self._k[source]]
        self._v[key] = [v[:num_rows] for v in self._v[source]]
        self._lengths[key] = num_tokens

    def num_stored_tokens(self) -> int:
        """Tokens over all stored sequences (what the prefix cache's budget counts)."""
        return sum(self._lengths.values())

    def before_step(self, plan: PrefixStepPlan) -> None:
        """Evictions, then each request's cached prefix copied under its store key."""
        for key in plan.drop_before:
            self.drop(key)
        for key, source, num_cached in zip(plan.store_keys, plan.source_keys, plan.num_cached_tokens):
            if source is not None:
                self.fork(source, key, num_cached)

    def after_step(self, plan: PrefixStepPlan) -> None:
        for key in plan.drop_after:
            self.drop(key)

    def discard_step(self, plan: PrefixStepPlan) -> None:
        """The step failed on this rank: what it stored is not trusted (rank 0 drops it on every rank too)."""
        for key in plan.store_keys:
            self.drop(key)
