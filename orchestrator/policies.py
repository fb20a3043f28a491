"""Routing policies: which replica of a tier gets the next request.

A policy orders the ready replicas by preference; the router tries them in that order (a decode replica can refuse
a reservation when its KV pool is full). Chosen by name per tier in cluster.yaml (`prefill.policy`,
`decode.policy`, both defaulting to `router.policy`); one policy object per tier, built once by the cluster backend
(orchestrator/cluster.py) with `get_policy(name, options)`.

Who calls what: `order(candidates, load, prompt_token_ids=...)` once per request and tier; `record(replica,
prompt_token_ids)` after a replica of the tier prefilled a prompt (only prefix-aware uses it); `forget(replica)` when
a replica's state is gone (restarted, removed). Candidates are the router's replica handles (anything with a
`replica_id`, or plain ids in tests).

`load(handle)` returns {"inflight": requests the router has in flight there, "num_free_blocks": last known free KV
blocks (decode only, else 0)}.
"""

from __future__ import annotations

import itertools
import random
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from prefill_tier.prefix_cache import block_hashes

T = TypeVar("T")
LoadFn = Callable[[object], dict]


@dataclass(frozen=True, kw_only=True)
class PolicyOptions:
    """Settings a policy may read (cluster.yaml `prefill.prefix_cache.block_size` and `prefill.prefix_routing`).
    block_size must equal the prefill replicas' prefix-cache block size, so both name a prefix the same way."""

    block_size: int = 16
    max_imbalance: int = 4  # prefix-aware: in-flight requests above the least-loaded replica it still accepts
    index_blocks: int = 65536  # prefix-aware: block hashes remembered per replica

    def __post_init__(self) -> None:
        for name, minimum in (("block_size", 1), ("max_imbalance", 0), ("index_blocks", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"PolicyOptions.{name} must be an int >= {minimum}, got {value!r}")


class Policy(Protocol):
    def order(self, candidates: Sequence[T], load: LoadFn, *, prompt_token_ids: Sequence[int] = ()) -> Iterable[T]:
        ...

    def record(self, replica: object, prompt_token_ids: Sequence[int]) -> None: ...

    def forget(self, replica: object) -> None: ...


_REGISTRY: dict[str, Callable[[PolicyOptions], Policy]] = {}


def register_policy(name: str):
    def wrap(factory):
        _REGISTRY[name] = factory
        return factory
    return wrap


def get_policy(name: str, options: PolicyOptions | None = None) -> Policy:
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None
    return factory(options or PolicyOptions())


def _replica_id(handle: object) -> object:
    return getattr(handle, "replica_id", handle)


def _key(load: LoadFn):
    def key(handle) -> tuple:
        stats = load(handle)
        # fewest requests in flight first; among equals, the most free KV blocks
        return (stats.get("inflight", 0), -stats.get("num_free_blocks", 0))
    return key


class _Stateless:
    """Policies that keep nothing about past requests."""

    def record(self, replica, prompt_token_ids) -> None:
        pass

    def forget(self, replica) -> None:
        pass


@register_policy("least-loaded")
class LeastLoaded(_Stateless):
    def __init__(self, options: PolicyOptions | None = None):
        pass

    def order(self, candidates, load, *, prompt_token_ids=()):
        return sorted(candidates, key=_key(load))


@register_policy("power-of-two")
class PowerOfTwo(_Stateless):
    """Sample two replicas, prefer the less loaded one; the rest follow in random order as fallbacks."""

    def __init__(self, options: PolicyOptions | None = None, *, seed: int | None = None):
        self._rng = random.Random(seed)

    def order(self, candidates, load, *, prompt_token_ids=()):
        shuffled = list(candidates)
        self._rng.shuffle(shuffled)
        head = sorted(shuffled[:2], key=_key(load))
        return head + shuffled[2:]


@register_policy("round-robin")
class RoundRobin(_Stateless):
    def __init__(self, options: PolicyOptions | None = None):
        self._counter = itertools.count()

    def order(self, candidates, load, *, prompt_token_ids=()):
        if not candidates:
            return []
        start = next(self._counter) % len(candidates)
        return list(candidates[start:]) + list(candidates[:start])


@register_policy("prefix-aware")
class PrefixAware:
    """A follow-up turn goes where its prefix is cached, so that replica prefills only the new tokens.

    The router remembers, per replica, the block hashes of the prompts it recently sent there (bounded by
    `index_blocks`, least recently used forgotten first: an approximation of the replica's own LRU cache). A request
    goes to the replica holding the most leading blocks of its prompt, unless that replica has more than
    `max_imbalance` requests in flight beyond the least-loaded one: then, and when nothing matches, least-loaded
    order. The other replicas follow in least-loaded order as fallbacks."""

    def __init__(self, options: PolicyOptions | None = None):
        self.options = options or PolicyOptions()
        self._index: dict[object, OrderedDict[int, None]] = {}  # replica id -> block hashes, oldest first

    def order(self, candidates, load, *, prompt_token_ids=()):
        ranked = sorted(candidates, key=_key(load))
        if not ranked or not prompt_token_ids:
            return ranked
        hashes = block_hashes(prompt_token_ids, self.options.block_size)
        matched = {id(h): self.num_matched_blocks(_replica_id(h), hashes) for h in ranked}
        best = max(ranked, key=lambda h: matched[id(h)])  # max keeps the first (least loaded) among equals
        if matched[id(best)] == 0:
            return ranked
        least_inflight = load(ranked[0]).get("inflight", 0)
        if load(best).get("inflight", 0) - least_inflight > self.options.max_imbalance:
            return ranked
        return [best] + [h for h in ranked if h is not best]

    def num_matched_blocks(self, replica: object, hashes: Sequence[int]) -> int:
        """Leading blocks of the prompt (its chained `hashes`) that `replica` was last seen holding."""
        known = self._index.get(replica)
        if not known:
            return 0
        count = 0
        for value in hashes:
            if value not in known:
                break
            count += 1
        return count

    def record(self, replica, prompt_token_ids) -> None:
        replica = _replica_id(replica)
        known = self._index.setdefault(replica, OrderedDict())
        for value in block_hashes(prompt_token_ids, self.options.block_size):
            known[value] = None
            known.move_to_end(value)
        while len(known) > self.options.index_blocks:
            known.popitem(last=False)

    def forget(self, replica) -> None:
        self._index.pop(_replica_id(replica), None)
