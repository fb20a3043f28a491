"""How quickly each replica actor answers a trivial call while a phase runs: a stalled actor event loop shows here.

Who calls it: benchmarks/load.py around its phases. A background thread of the benchmark (the Ray driver) calls
`get_stats()` on every replica every `interval_s` and records the round trip. The router's requests (reserve,
prefill, the decode token streams) queue behind the same actor loop, so a slow answer here is time the router
waits that no tier timing reports; the router's health check gives up after 2 s, which is why it is tracked.
"""

from __future__ import annotations

import threading
import time

from benchmarks._report import summarize


class ActorProbe:
    def __init__(self, actors: dict, *, interval_s: float = 0.5, timeout_s: float = 30.0) -> None:
        """actors: {label: Ray actor handle with an async get_stats()}."""
        self._actors = actors
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.latencies_ms: dict[str, list[float]] = {label: [] for label in actors}
        self.num_timeouts: dict[str, int] = {label: 0 for label in actors}

    def __enter__(self) -> "ActorProbe":
        self._thread = threading.Thread(target=self._run, name="actor-probe", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._timeout_s + 5)

    def _run(self) -> None:
        import ray

        while not self._stop.is_set():
            for label, actor in self._actors.items():
                started = time.perf_counter()
                try:
                    ray.get(actor.get_stats.remote(), timeout=self._timeout_s)
                    self.latencies_ms[label].append((time.perf_counter() - started) * 1e3)
                except Exception:  # a timeout or a dead actor: counted, the probe goes on
                    self.num_timeouts[label] += 1
            self._stop.wait(self._interval_s)

    def summary(self) -> dict:
        """Per actor: percentile summary of the round trips (ms), how many exceeded 2 s (the router's health-check
        timeout) and how many got no answer within the probe's own timeout."""
        return {label: {**summarize(values), "num_over_2s": sum(1 for v in values if v > 2000),
                        "num_timeouts": self.num_timeouts[label]}
                for label, values in self.latencies_ms.items()}
