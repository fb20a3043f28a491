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
        match_starts = [start for stop in self._stops if (start := window.find(stop)) >= 0]
        if match_starts:
            self.is_stopped = True
            self._held = ""
            return window[: min(match_starts)]
        num_held = self._num_chars_to_hold(window)
        self._held = window[len(window) - num_held :]
        return window[: len(window) - num_held]

    def flush(self) -> str:
        """The stream ended without a stop string: the held tail is plain text after all."""
        held, self._held = self._held, ""
        return held

    def _num_chars_to_hold(self, window: str) -> int:
        # The longest suffix of the window that is a proper prefix of some stop string.
        for num_chars in range(min(len(window), self._max_held_chars), 0, -1):
            suffix = window[-num_chars:]
            if any(stop.startswith(suffix) for stop in self._stops):
                return num_chars
        return 0
