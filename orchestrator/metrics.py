"""Prometheus metrics of a running pdcluster: the router's per-request figures and each replica's state.

Who calls it: `orchestrator/serve.py` makes one `ClusterMetrics` per running cluster when cluster.yaml has a
`metrics.port`, feeds it from three places, and serves it with `MetricsServer`:
  - the router's `on_request_done` callback -> `observe_request(record)` (counts, latencies, tokens, KV transfer);
  - the Ray backend (orchestrator/cluster.py) -> `count_replica_request(tier, replica, outcome)` per replica;
  - `ReplicaPoller`, a task on the router's event loop -> `update_replicas(...)` every `interval_s` from the
    replicas' own counters (queue depth, running batch, KV blocks, batches and steps run).
Every metric lives in the instance's own `CollectorRegistry`, so several clusters (tests) can share a process.
docs/observability.md lists every name and label; docs/grafana-dashboard.json is built on them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from orchestrator.request_log import OUTCOMES, RequestRecord

log = logging.getLogger("pdcluster.metrics")

TIERS = ("prefill", "decode")
REPLICA_OUTCOMES = ("finished", "error", "cancelled")  # a request as one replica saw it
AUTOSCALER_ACTIONS = ("scale_up", "scale_down")
NO_REPLICA = "none"  # label value for requests that never reached a replica of that tier

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
_E2E_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_KV_BYTES_BUCKETS = tuple(float(1024 * 4 ** k) for k in range(12))  # 1 KiB .. 4 GiB
_KV_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class ClusterMetrics:
    """All pdcluster series. Methods are cheap and thread-safe (prometheus-client locks each child)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        replicas = ("prefill_replica", "decode_replica")
        self.requests = Counter("pdcluster_requests", "Generate calls that ended, by outcome", ["outcome"], registry=r)
        self.in_flight = Gauge("pdcluster_requests_in_flight", "Generate calls in flight at the router", registry=r)
        self.ttft = Histogram("pdcluster_ttft_seconds", "Time to first token, from arrival at the router",
                              replicas, buckets=_LATENCY_BUCKETS_S, registry=r)
        self.tpot = Histogram("pdcluster_tpot_seconds", "Mean time per output token after the first, per request",
                              replicas, buckets=_TPOT_BUCKETS_S, registry=r)
        self.e2e = Histogram("pdcluster_e2e_latency_seconds", "Arrival to last message of completed requests",
                             replicas, buckets=_E2E_BUCKETS_S, registry=r)
        self.prompt_tokens = Counter("pdcluster_prompt_tokens", "Prompt tokens of completed requests",
                                     ["replica"], registry=r)
        self.generation_tokens = Counter("pdcluster_generation_tokens", "Tokens streamed to clients",
                                         ["replica"], registry=r)
        self.prefill_queue = Histogram("pdcluster_prefill_queue_seconds", "Wait for a prefill batch", ["replica"],
                                       buckets=_LATENCY_BUCKETS_S, registry=r)
        self.prefill_time = Histogram("pdcluster_prefill_seconds", "Prefill forward of the batch a request was in",
                                      ["replica"], buckets=_LATENCY_BUCKETS_S, registry=r)
        self.kv_bytes = Histogram("pdcluster_kv_transfer_bytes", "KV bytes shipped per request, prefill -> decode",
                                  replicas, buckets=_KV_BYTES_BUCKETS, registry=r)
        self.kv_seconds = Histogram("pdcluster_kv_transfer_seconds",
                                    "KV shipping time per request after the prefill forward ended",
                                    replicas, buckets=_KV_SECONDS_BUCKETS, registry=r)
        self.comm_bytes = Counter("pdcluster_comm_bytes", "Payload bytes of the replicas' collectives, summed over "
                                  "their ranks, by kind (mesh/comm.py) and tier", ["kind", "tier"], registry=r)
        self.replica_requests = Counter("pdcluster_replica_requests", "Requests per replica, by how they ended there",
                                        ["tier", "replica", "outcome"], registry=r)
        self.replica_up = Gauge("pdcluster_replica_up", "1 while the replica is ready and answers", ["tier", "replica"],
                                registry=r)
        self.queue_depth = Gauge("pdcluster_queue_depth",
                                 "Requests waiting: prefill = queued prompts, decode = reserved, waiting for KV",
                                 ["tier", "replica"], registry=r)
        self.running = Gauge("pdcluster_running_requests",
                             "Requests being computed: prefill = the batch in the forward, decode = the running batch",
                             ["tier", "replica"], registry=r)
        self.kv_blocks = Gauge("pdcluster_kv_blocks", "Paged KV cache blocks of a decode replica",
                               ["replica", "state"], registry=r)
        self.prefill_batches = Counter("pdcluster_prefill_batches", "Prefill forwards run", ["replica"], registry=r)
        self.prefix_hits = Counter("pdcluster_prefix_cache_hits", "Prefill requests that reused a cached prefix",
                                   ["replica"], registry=r)
        self.prefix_misses = Counter("pdcluster_prefix_cache_misses", "Prefill requests with no cached prefix "
                                     "(prefix cache on)", ["replica"], registry=r)
        self.prefix_tokens = Counter("pdcluster_prefix_cache_tokens", "Prompt tokens taken from the prefix cache "
                                     "instead of computed", ["replica"], registry=r)
        self.decode_steps = Counter("pdcluster_decode_steps", "Decode steps run", ["replica"], registry=r)
        self.retries = Counter("pdcluster_retries", "Requests tried again after a replica of this tier failed",
                               ["tier"], registry=r)
        self.autoscaler_decisions = Counter("pdcluster_autoscaler_decisions",
                                            "Scaling decisions taken (no autoscaler yet)", ["tier", "action"],
                                            registry=r)
        # Series that exist from the start, so dashboards and alerts see zeros rather than nothing.
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        for tier in TIERS:
            self.retries.labels(tier)
            for action in AUTOSCALER_ACTIONS:
                self.autoscaler_decisions.labels(tier, action)
        self._lock = threading.Lock()
        self._last_cumulative: dict[tuple[str, str], float] = {}
        self._known_replicas: dict[str, set[str]] = {tier: set() for tier in TIERS}

    def bind_in_flight(self, read: Callable[[], int]) -> None:
        """The in-flight gauge reads the router's own count at scrape time."""
        self.in_flight.set_function(lambda: float(read()))

    def observe_request(self, record: RequestRecord) -> None:
        """Called once per Generate call when it ends (router's on_request_done)."""
        self.requests.labels(record.outcome).inc()
        pair = (record.prefill_replica or NO_REPLICA, record.decode_replica or NO_REPLICA)
        if record.completion_tokens > 0:
            self.ttft.labels(*pair).observe(record.ttft_ms / 1e3)
            self.generation_tokens.labels(pair[1] if record.decode_replica else pair[0]).inc(record.completion_tokens)
        if record.completion_tokens > 1:
            self.tpot.labels(*pair).observe(record.tpot_ms / 1e3)
        for tier, by_kind in (("prefill", record.prefill_comm_bytes), ("decode", record.decode_comm_bytes)):
            for kind, num_bytes in by_kind.items():  # moved whether or not the request then completed
                self.comm_bytes.labels(kind, tier).inc(num_bytes)
        if record.code != "OK":
            return
        self.e2e.labels(*pair).observe(record.e2e_ms / 1e3)
        if record.prefill_replica:
            self.prompt_tokens.labels(record.prefill_replica).inc(record.prompt_tokens)
            self.prefill_queue.labels(record.prefill_replica).observe(record.queue_ms / 1e3)
            self.prefill_time.labels(record.prefill_replica).observe(record.prefill_ms / 1e3)
        if record.kv_bytes > 0:
            self.kv_bytes.labels(*pair).observe(record.kv_bytes)
            self.kv_seconds.labels(*pair).observe(record.kv_transfer_ms / 1e3)

    def count_retry(self, tier: str) -> None:
        """Called by the backend each time a request is tried again after a replica of `tier` failed."""
        self.retries.labels(tier).inc()

    def count_replica_request(self, tier: str, replica: str, outcome: str) -> None:
        """Called by the backend when a request lets go of a replica (outcome in REPLICA_OUTCOMES)."""
        self.replica_requests.labels(tier, replica, outcome).inc()

    def update_replicas(self, replica_stats: dict[str, list[dict]]) -> None:
        """From `ClusterBackend.replica_stats()`: per tier a list of {"id", "state", "stats": dict} where stats are
        the replica's `get_stats()` ({} when it did not answer). Series of replicas no longer listed are removed."""
        with self._lock:
            for tier in TIERS:
                seen = set()
                for replica in replica_stats.get(tier, []):
                    replica_id, stats = replica["id"], replica.get("stats") or {}
                    seen.add(replica_id)
                    self.replica_up.labels(tier, replica_id).set(1.0 if replica.get("state") == "ready" and stats else 0.0)
                    if not stats:
                        continue
                    self.running.labels(tier, replica_id).set(stats.get("num_running", 0))
                    if tier == "prefill":
                        self.queue_depth.labels(tier, replica_id).set(stats.get("num_queued", 0))
                        self._advance(self.prefill_batches, replica_id, stats.get("num_batches"))
                        self._advance(self.prefix_hits, replica_id, stats.get("prefix_cache_hits"))
                        self._advance(self.prefix_misses, replica_id, stats.get("prefix_cache_misses"))
                        self._advance(self.prefix_tokens, replica_id, stats.get("prefix_cache_cached_tokens"))
                    else:
                        self.queue_depth.labels(tier, replica_id).set(stats.get("num_waiting_kv", 0))
                        num_free = stats.get("num_free_blocks", 0)
                        self.kv_blocks.labels(replica_id, "free").set(num_free)
                        self.kv_blocks.labels(replica_id, "used").set(stats.get("num_total_blocks", 0) - num_free)
                        self._advance(self.decode_steps, replica_id, stats.get("num_steps"))
                for gone in self._known_replicas[tier] - seen:
                    self._forget(tier, gone)
                self._known_replicas[tier] = seen

    def _advance(self, counter: Counter, replica_id: str, cumulative) -> None:
        """A replica reports running totals; the counter grows by the difference (by all of it after a restart)."""
        if cumulative is None:
            return
        key = (str(id(counter)), replica_id)
        last = self._last_cumulative.get(key, 0.0)
        delta = cumulative - last if cumulative >= last else cumulative
        self._last_cumulative[key] = float(cumulative)
        counter.labels(replica_id).inc(delta)

    def _forget(self, tier: str, replica_id: str) -> None:
        for gauge in (self.replica_up, self.queue_depth, self.running):
            _remove(gauge, tier, replica_id)
        if tier == "decode":
            for state in ("free", "used"):
                _remove(self.kv_blocks, replica_id, state)

    def exposition(self) -> bytes:
        """The text format, as /metrics serves it."""
        return generate_latest(self.registry)


def _remove(metric, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass


class ReplicaPoller:
    """Reads every replica's counters every `interval_s` into the metrics. Runs on the router's event loop:
    `start()` from a coroutine on that loop, `await stop()` on shutdown."""

    def __init__(self, backend, metrics: ClusterMetrics, *, interval_s: float = 1.0) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self._backend = backend
        self._metrics = metrics
        self._interval_s = interval_s
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="pdcluster-metrics-poller")

    async def poll_once(self) -> None:
        self._metrics.update_replicas(await self._backend.replica_stats())

    async def _run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bad poll must not end polling; the next one may succeed
                log.exception("polling replica stats for metrics failed")
            await asyncio.sleep(self._interval_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None


class MetricsServer:
    """Serves /metrics (any path, in fact) from its own thread, so a busy router loop never blocks a scrape."""

    def __init__(self, metrics: ClusterMetrics, *, host: str, port: int) -> None:
        self._metrics = metrics
        self._host, self._port = host, port
        self._httpd = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def start(self) -> int:
        """Binds and serves; returns the bound port (useful with port 0)."""
        from prometheus_client import start_http_server

        try:
            self._httpd, self._thread = start_http_server(self._port, addr=self._host, registry=self._metrics.registry)
        except OSError as error:
            raise OSError(f"metrics server cannot listen on {self._host}:{self._port}: {error}") from error
        self.port = self._httpd.server_port
        return self.port

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._httpd = self._thread = None
