"""Prefix cache bookkeeping of a prefill replica: which prompts' KV its ranks still hold, found by token-block
hashes, bounded by a token budget, evicted least-recently-used.

Pure Python (no torch): rank 0 of a prefill replica (prefill_tier/replica.py) owns one `PrefixCacheIndex` and
decides everything here; every rank then applies the decision to its own share of the KV (its layers, heads and
cp rows, prefill_tier/prefix_store.py) when it runs the step. The router imports `block_hashes` alone
(orchestrator/policies.py, the `prefix-aware` policy) so that both sides name a prefix the same way.

Keys: a prompt is cut into blocks of `block_size` tokens; block i's hash covers the hash of block i - 1 and its own
tokens (a chain), so one hash names the whole prefix up to the end of its block. A follow-up turn whose prompt
starts with the previous prompt (then the answer, then new user tokens) matches the previous prompt's full blocks.
Only full blocks are hashed; a prompt's last partial block is stored but never matched.

One entry = one prefilled prompt, whole (its KV rows under a store key on every rank). A request that reuses an
entry's prefix gets a fresh entry holding its own whole prompt (the cached rows copied, the new ones appended); the
source entry, if the new prompt covers all of it, is dropped after the step as redundant.
"""

from __future__ import annotations

import hashlib
import itertools
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Chained hashes of the prompt's full blocks (a stable 64-bit digest: equal across processes and hosts, unlike
    Python's salted hash of bytes). Element i names tokens [0, (i + 1) * block_size)."""
    if block_size < 1:
        raise ValueError(f"block_hashes: block_size must be >= 1, got {block_size}")
    hashes: list[int] = []
    previous = b""
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        digest = hashlib.blake2b(previous, digest_size=8)
        digest.update(array("q", token_ids[start:start + block_size]).tobytes())
        previous = digest.digest()
        hashes.append(int.from_bytes(previous, "little"))
    return hashes


@dataclass(frozen=True, kw_only=True)
class PrefixCacheConfig:
    """max_tokens: tokens of KV the replica may keep over all entries (0 disables the cache); block_size: tokens
    per hashed block (the match granularity; the router's prefix-aware policy must use the same)."""

    max_tokens: int = 0
    block_size: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ValueError(f"PrefixCacheConfig.max_tokens must be an int >= 0 (0 disables), got {self.max_tokens!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"PrefixCacheConfig.block_size must be an int >= 1, got {self.block_size!r}")

    @property
    def is_enabled(self) -> bool:
        return self.max_tokens > 0


@dataclass(frozen=True, kw_only=True)
class PrefixStepPlan:
    """What every rank does with its prefix store around one prefill step (picklable; part of the PrefillStep).

    Per request i (in step order): `store_keys[i]` names the request's rows in the store during the step; it
    starts as a copy of the first `num_cached_tokens[i]` tokens of `source_keys[i]` (None: nothing cached) and the
    step appends the prompt's remaining tokens. `drop_before` are evicted first; `drop_after` when the step ends
    (requests not kept, sources made redundant)."""

    store_keys: tuple[str, ...]
    source_keys: tuple[str | None, ...]
    num_cached_tokens: tuple[int, ...]
    drop_before: tuple[str, ...] = ()
    drop_after: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not len(self.store_keys) == len(self.source_keys) == len(self.num_cached_tokens):
            raise ValueError("PrefixStepPlan: store_keys, source_keys and num_cached_tokens differ in length")
        for source, cached in zip(self.source_keys, self.num_cached_tokens):
            if cached < 0 or (cached > 0) != (source is not None):
                raise ValueError(f"PrefixStepPlan: {cached} cached tokens with source {source!r}: a source is "
                                 "needed exactly when tokens are cached")


@dataclass
class _Entry:
    key: str
    num_tokens: int
    hashes: tuple[int, ...]
    num_pins: int = 0  # steps planned on it that have not ended: never evicted while > 0


@dataclass
class PrefixCacheStats:
    num_hits: int = 0  # requests that reused a cached prefix
    num_misses: int = 0
    num_cached_tokens: int = 0  # prompt tokens reused (not recomputed), over all requests
    num_prompt_tokens: int = 0  # prompt tokens of every planned request
    num_evictions: int = 0


@dataclass
class _PendingStep:
    plan: PrefixStepPlan
    prompts: list[tuple[int, ...]]
    kept: list[bool]
    sources: list[str] = field(default_factory=list)


class PrefixCacheIndex:
    """Rank 0's map of the replica's cached prompts. The replica calls `plan(prompts)` right before a step,
    `commit(plan)` after every rank ran it, `abort(plan)` if it failed. Not thread-safe: one event loop."""

    def __init__(self, config: PrefixCacheConfig) -> None:
        if not config.is_enabled:
            raise ValueError("PrefixCacheIndex: the cache is disabled (max_tokens == 0); do not build an index")
        self.config = config
        self.stats = PrefixCacheStats()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._by_hash: dict[int, dict[str, None]] = {}  # block hash -> entries holding that prefix
        self._num_stored_tokens = 0
        self._num_reserved_tokens = 0  # entries of planned steps not committed yet
        self._pending: dict[int, _PendingStep] = {}
        self._drops: list[str] = []  # keys every rank must still drop (aborted steps)
        self._key_counter = itertools.count()

    @property
    def num_entries(self) -> int:
        return len(self._entries)

    @property
    def num_stored_tokens(self) -> int:
        return self._num_stored_tokens

    def keys(self) -> list[str]:
        """Entry keys, least recently used first."""
        return list(self._entries)

    def match(self, prompt: Sequence[int]) -> tuple[str | None, int]:
        """(entry key, tokens reusable) for the longest cached full-block prefix; at least one prompt token is
        always left to compute (its logits give the first token). (None, 0) when nothing matches."""
        hashes = block_hashes(prompt, self.config.block_size)
        # Chained hashes: if block i is held, blocks 0..i are held by the same entry, so scan from the end.
        for index in range(len(hashes) - 1, -1, -1):
            holders = self._by_hash.get(hashes[index])
            if holders:
                key = next(reversed(holders))  # the most recently stored holder
                return key, min((index + 1) * self.config.block_size, len(prompt) - 1)
        return None, 0

    def plan(self, prompts: Sequence[Sequence[int]]) -> PrefixStepPlan:
        """Decide, for one step's requests, what is reused and what is kept; pins the sources until
        commit/abort. Evicts least-recently-used unpinned entries to make room for the new ones."""
        store_keys, source_keys, num_cached, kept = [], [], [], []
        for prompt in prompts:
            source, cached = self.match(prompt)
            if cached <= 0:
                source, cached = None, 0
            store_keys.append(f"prefix{next(self._key_counter)}")
            source_keys.append(source)
            num_cached.append(cached)
            self.stats.num_prompt_tokens += len(prompt)
            if source is None:
                self.stats.num_misses += 1
            else:
                self.stats.num_hits += 1
                self.stats.num_cached_tokens += cached
                self._entries[source].num_pins += 1
                self._entries.move_to_end(source)
        sources = [s for s in source_keys if s is not None]
        # Room for the new entries, oldest first; a prompt longer than the whole budget is not kept.
        drop_before: list[str] = list(self._drops)
        self._drops.clear()
        for prompt in prompts:
            size = len(prompt)
            is_kept = size <= self.config.max_tokens and self._make_room(size, drop_before)
            if is_kept:
                self._num_reserved_tokens += size
            kept.append(is_kept)
        drop_after = [key for key, is_kept in zip(store_keys, kept) if not is_kept]
        plan = PrefixStepPlan(store_keys=tuple(store_keys), source_keys=tuple(source_keys),
                              num_cached_tokens=tuple(num_cached), drop_before=tuple(drop_before),
                              drop_after=tuple(drop_after + self._redundant(prompts, source_keys, num_cached, kept)))
        self._pending[id(plan)] = _PendingStep(plan, [tuple(p) for p in prompts], kept, sources)
        return plan

    def commit(self, plan: PrefixStepPlan) -> None:
        """Every rank ran the step: its kept requests become entries, redundant sources leave the index."""
        pending = self._pending.pop(id(plan))
        self._unpin(pending)
        for key in plan.drop_after:
            self._remove(key)
        for key, prompt, is_kept in zip(plan.store_keys, pending.prompts, pending.kept):
            if is_kept:
                self._num_reserved_tokens -= len(prompt)
                self._add(_Entry(key, len(prompt), tuple(block_hashes(prompt, self.config.block_size))))

    def abort(self, plan: PrefixStepPlan) -> None:
        """The step failed: nothing it stored is trusted; every rank drops its keys before the next step."""
        pending = self._pending.pop(id(plan))
        self._unpin(pending)
        for prompt, is_kept in zip(pending.prompts, pending.kept):
            if is_kept:
                self._num_reserved_tokens -= len(prompt)
        # Dropping a key a rank does not hold is harmless, so the evictions are repeated too (the failed step may
        # have stopped before a rank applied them).
        self._drops.extend(plan.drop_before + plan.store_keys)

    def _unpin(self, pending: _PendingStep) -> None:
        for source in pending.sources:
            entry = self._entries.get(source)
            if entry is not None:
                entry.num_pins -= 1

    def _make_room(self, num_tokens: int, evicted: list[str]) -> bool:
        """Evict unpinned entries, least recently used first, until num_tokens more fit. False if they cannot."""
        budget = self.config.max_tokens
        while self._num_stored_tokens + self._num_reserved_tokens + num_tokens > budget:
            victim = next((e for e in self._entries.values() if e.num_pins == 0), None)
            if victim is None:
                return False
            self._remove(victim.key)
            evicted.append(victim.key)
            self.stats.num_evictions += 1
        return True

    def _redundant(self, prompts, source_keys, num_cached, kept) -> list[str]:
        """Sources whose whole prompt a kept new entry also holds: the new entry answers every match they would."""
        redundant = []
        for prompt, source, cached, is_kept in zip(prompts, source_keys, num_cached, kept):
            entry = self._entries.get(source) if source is not None else None
            # Only full blocks are ever matched, so an entry's partial last block does not make it worth keeping.
            if (is_kept and entry is not None and source not in redundant
                    and cached >= entry.num_tokens - entry.num_tokens % self.config.block_size):
                redundant.append(source)
        return redundant

    def _add(self, entry: _Entry) -> None:
        self._entries[entry.key] = entry
        self._num_stored_tokens += entry.num_tokens
        for value in entry.hashes:
            self._by_hash.setdefault(value, {})[entry.key] = None

    def _remove(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self._num_stored_tokens -= entry.num_tokens
        for value in entry.hashes:
            holders = self._by_hash.get(value)
            if holders is not None:
                holders.pop(key, None)
                if not holders:
                    del self._by_hash[value]
