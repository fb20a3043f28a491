"""Stop-string matching over streamed text, for the router.

Stop strings are matched on decoded text, so they can span token (and message) boundaries. The matcher
holds back the shortest tail of the text that could still be the start of a stop string, and releases it
once it is clear it is not; text from the first stop string on is never released.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Feed text deltas in order with `push`; send what it returns. Call `flush` when the stream ends."""

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not stop for stop in stops):
            raise ValueError("stop strings must be non-empty")
        self._stops = tuple(stops)
        self._max_held_chars = max((len(stop) for stop in self._stops), default=1) - 1
        self._held = ""
        self.is_stopped = False

    def push(self, text: str) -> str:
        """Returns the text that is safe to send now; sets is_stopped when a stop string completed."""
        if self.is_stopped:
            return ""
        if not self._stops:
            return text
        # A match cannot start before the held tail: anything earlier was released because no stop string
        # could start there.
        window = self._held + text
        first_match = self._first_match(window)
        start_of_tail = len(window) - self._num_chars_to_hold(window)
        if first_match is not None and start_of_tail >= first_match:
            self.is_stopped = True
            self._held = ""
            return window[:first_match]
        # Either no stop string completed, or one did but another one that starts earlier may still complete
        # with more text ("baa" vs "a" on "ba"): the first occurrence wins, so hold from the earliest candidate.
        self._held = window[start_of_tail:]
        return window[:start_of_tail]

    def flush(self) -> str:
        """The stream ended: the held tail is text, up to a stop string it may hold (then is_stopped is set)."""
        held, self._held = self._held, ""
        first_match = self._first_match(held)
        if first_match is not None:
            self.is_stopped = True
            return held[:first_match]
        return held

    def _first_match(self, window: str) -> int | None:
        starts = [start for stop in self._stops if (start := window.find(stop)) >= 0]
        return min(starts) if starts else None

    def _num_chars_to_hold(self, window: str) -> int:
        # The longest suffix of the window that is a proper prefix of some stop string: where the earliest stop
        # string that has not completed yet could still start.
        for num_chars in range(min(len(window), self._max_held_chars), 0, -1):
            suffix = window[-num_chars:]
            if any(stop.startswith(suffix) for stop in self._stops):
                return num_chars
        return 0
