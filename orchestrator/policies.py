"""Routing policies: which replica of a tier gets the next request.

A policy orders the ready replicas by preference; the router tries them in that order (a decode replica can refuse
a reservation when its KV pool is full). Chosen by name in cluster.yaml (`router.policy`); the registry keeps the
set open for the routing work to come (prefix-aware, KV-aware).

`load(handle)` returns {"inflight": requests the router has in flight there, "num_free_blocks": last known free KV
blocks (decode only, else 0)}.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, TypeVar

T = TypeVar("T")
LoadFn = Callable[[object], dict]


class Policy(Protocol):
    def order(self, candidates: Sequence[T], load: LoadFn) -> Iterable[T]: ...


_REGISTRY: dict[str, Callable[[], Policy]] = {}


def register_policy(name: str):
    def wrap(factory):
        _REGISTRY[name] = factory
        return factory
    return wrap


def get_policy(name: str) -> Policy:
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def _key(load: LoadFn):
    def key(handle) -> tuple:
        stats = load(handle)
        # fewest requests in flight first; among equals, the most free KV blocks
        return (stats.get("inflight", 0), -stats.get("num_free_blocks", 0))
    return key


@register_policy("least-loaded")
class LeastLoaded:
    def order(self, candidates, load):
        return sorted(candidates, key=_key(load))


@register_policy("power-of-two")
class PowerOfTwo:
    """Sample two replicas, prefer the less loaded one; the rest follow in random order as fallbacks."""

    def __init__(self, seed: int | None = None):
        self._rng = random.Random(seed)

    def order(self, candidates, load):
        shuffled = list(candidates)
        self._rng.shuffle(shuffled)
        head = sorted(shuffled[:2], key=_key(load))
        return head + shuffled[2:]


@register_policy("round-robin")
class RoundRobin:
    def __init__(self):
        self._counter = itertools.count()

    def order(self, candidates, load):
        if not candidates:
            return []
        start = next(self._counter) % len(candidates)
        return list(candidates[start:]) + list(candidates[:start])
