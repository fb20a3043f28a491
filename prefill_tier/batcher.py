"""Prefill batching policy: which queued prompts go into the next prefill forward.

Pure Python, no torch. The prefill replica (prefill_tier/replica.py) add()s each request when it arrives, calls
next_batch() whenever its mesh is free, and remove()s a request that the router cancels before it ran.

Policy: strict first-come-first-served. A batch takes prompts from the head of the queue while they fit the token
budget and the sequence limit; it stops at the first prompt that does not fit rather than skipping ahead, so a
long prompt is never starved by a stream of short ones. A prompt longer than the whole token budget is sent alone
(chunking it is the model's concern, not this policy's), so no request waits forever.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol


class PrefillItem(Protocol):
    """What the batcher needs from a queued request; the replica's own request type satisfies it."""

    @property
    def request_id(self) -> str: ...

    @property
    def num_tokens(self) -> int:
        """Prompt tokens this request adds to a prefill forward."""
        ...


class PrefillBatcher:
    """FCFS queue of prefill requests packed into batches of at most max_batch_tokens / max_batch_seqs.

    Not thread-safe: the replica calls it from one event loop.
    """

    def __init__(self, max_batch_tokens: int, max_batch_seqs: int) -> None:
        for name, value in (("max_batch_tokens", max_batch_tokens), ("max_batch_seqs", max_batch_seqs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_seqs = max_batch_seqs
        # request_id -> (item, num_tokens at add time); insertion order is arrival order, removal is O(1).
        self._queue: OrderedDict[str, tuple[PrefillItem, int]] = OrderedDict()
        self._num_queued_tokens = 0

    def add(self, item: PrefillItem) -> None:
        """Queue item at the back. A request_id already queued, or a prompt of no tokens, raises ValueError."""
        request_id = item.request_id
        num_tokens = item.num_tokens
        if request_id in self._queue:
            raise ValueError(f"request {request_id!r} is already queued for prefill")
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"request {request_id!r}: num_tokens must be a positive int, got {num_tokens!r}")
        self._queue[request_id] = (item, num_tokens)
        self._num_queued_tokens += num_tokens

    def next_batch(self) -> list[PrefillItem]:
        """Pop and return the next batch in arrival order; [] when the queue is empty.

        Never returns an empty batch while something is queued: the head always goes, alone if it is longer
        than max_batch_tokens.
        """
        batch: list[PrefillItem] = []
        num_batch_tokens = 0
        while self._queue and len(batch) < self.max_batch_seqs:
            request_id, (item, num_tokens) = next(iter(self._queue.items()))
            if batch and num_batch_tokens + num_tokens > self.max_batch_tokens:
                break
            del self._queue[request_id]
            self._num_queued_tokens -= num_tokens
            batch.append(item)
            num_batch_tokens += num_tokens
            if num_batch_tokens >= self.max_batch_tokens:
                break
        return batch

    def remove(self, request_id: str) -> bool:
        """Drop a queued request (client cancel, deadline). Returns False if it is not queued (already batched or
        never added), so calling it twice is harmless."""
        entry = self._queue.pop(request_id, None)
        if entry is None:
            return False
        self._num_queued_tokens -= entry[1]
        return True

    def __len__(self) -> int:
        return len(self._queue)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._queue

    @property
    def num_queued_tokens(self) -> int:
        """Prompt tokens waiting; the router's prefill load signal."""
        return self._num_queued_tokens
