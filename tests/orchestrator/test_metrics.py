"""Request records from the router, the JSON request log line, and the Prometheus series built from them."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import urllib.request

import pytest
import router_harness
from prometheus_client.parser import text_string_to_metric_families
from router_harness import RunningRouter, wait_until

from orchestrator.client import Client, PdclusterError
from orchestrator.fake_backend import DECODE_REPLICA, PREFILL_REPLICA, FakeBackend
from orchestrator.metrics import ClusterMetrics, MetricsServer, ReplicaPoller
from orchestrator.request_log import REQUEST_LOGGER_NAME, RequestLog, RequestRecord, configure_logging
from orchestrator.router import build_server


def samples(metrics: ClusterMetrics) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} parsed from the exposition text, as a scraper sees it."""
    text = metrics.exposition().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def recording_router(monkeypatch):
    """A fake-backend router whose request records land in `records` (and in a ClusterMetrics)."""
    records: list[RequestRecord] = []
    metrics = ClusterMetrics()

    def on_done(record: RequestRecord) -> None:
        records.append(record)
        metrics.observe_request(record)

    def start(backend=None, **options) -> RunningRouter:
        monkeypatch.setattr(router_harness, "build_server", functools.partial(build_server, on_request_done=on_done))
        running = RunningRouter(backend, **options)
        metrics.bind_in_flight(lambda: running.server.num_inflight)
        opened.append(running)
        return running

    opened: list[RunningRouter] = []
    yield start, records, metrics
    for running in opened:
        running.close()


def _wait_records(records: list, count: int) -> None:
    # The record is made when the call's task ends, just after the client read the final message.
    wait_until(lambda: len(records) >= count, what=f"{count} request records")


def test_completed_requests_make_records_and_series(recording_router):
    start, records, metrics = recording_router
    router = start()
    with Client(router.address, timeout=10) as client:
        client.generate_text("hello ", max_tokens=8, request_id="rec-1")
        client.generate_text("abcabc", max_tokens=8, stop=["c"], request_id="rec-2")
    _wait_records(records, 2)
    first, second = records
    assert (first.request_id, first.outcome, first.code) == ("rec-1", "length", "OK")
    assert (first.prompt_tokens, first.completion_tokens) == (6, 8)
    assert (first.prefill_replica, first.decode_replica) == (PREFILL_REPLICA, DECODE_REPLICA)
    assert 0 < first.ttft_ms <= first.e2e_ms and first.tpot_ms > 0
    assert first.kv_bytes == 1024 * 6 and first.prefill_ms == pytest.approx(1.0)
    assert (second.outcome, second.completion_tokens) == ("stop", 3)  # "abc" was streamed, the stop string cut it
    got = samples(metrics)
    pair = (("decode_replica", DECODE_REPLICA), ("prefill_replica", PREFILL_REPLICA))
    assert got[("pdcluster_requests_total", (("outcome", "length"),))] == 1
    assert got[("pdcluster_requests_total", (("outcome", "stop"),))] == 1
    assert got[("pdcluster_requests_total", (("outcome", "rejected"),))] == 0  # present from the start
    assert got[("pdcluster_ttft_seconds_count", pair)] == 2
    assert got[("pdcluster_tpot_seconds_count", pair)] == 2
    assert got[("pdcluster_e2e_latency_seconds_count", pair)] == 2
    # The record that ended at the stop string never saw the backend's FinishEvent, so only one KV figure.
    assert got[("pdcluster_kv_transfer_bytes_sum", pair)] == 1024 * 6
    assert got[("pdcluster_generation_tokens_total", (("replica", DECODE_REPLICA),))] == 11
    assert got[("pdcluster_prompt_tokens_total", (("replica", PREFILL_REPLICA),))] == 12
    assert got[("pdcluster_requests_in_flight", ())] == 0


def test_failed_requests_are_named_by_their_grpc_code(recording_router):
    start, records, metrics = recording_router
    router = start(FakeBackend(fail_after_tokens=1), max_inflight=8)
    with Client(router.address, timeout=10) as client:
        with pytest.raises(PdclusterError):
            client.generate_text("x", top_p=2.0, request_id="bad-1")
        with pytest.raises(PdclusterError):
            client.generate_text("xyz", max_tokens=5, request_id="dies-1")
    _wait_records(records, 2)
    by_id = {r.request_id: r for r in records}
    assert (by_id["bad-1"].outcome, by_id["bad-1"].code) == ("invalid", "INVALID_ARGUMENT")
    assert "top_p" in by_id["bad-1"].error and by_id["bad-1"].completion_tokens == 0
    assert (by_id["dies-1"].outcome, by_id["dies-1"].code) == ("unavailable", "UNAVAILABLE")
    assert by_id["dies-1"].completion_tokens == 1 and by_id["dies-1"].prefill_replica == PREFILL_REPLICA
    got = samples(metrics)
    assert got[("pdcluster_requests_total", (("outcome", "invalid"),))] == 1
    assert got[("pdcluster_requests_total", (("outcome", "unavailable"),))] == 1
    assert not any(name == "pdcluster_e2e_latency_seconds_count" for name, _ in got)  # only completed calls


def test_capacity_and_cancel_outcomes(recording_router):
    start, records, metrics = recording_router
    backend = FakeBackend(token_delay_s=0.02)
    router = start(backend, max_inflight=1)
    with Client(router.address, timeout=10) as client:
        stream = client.generate("abc", max_tokens=200, request_id="cancel-1")
        next(stream)
        with Client(router.address, timeout=10) as other, pytest.raises(PdclusterError):
            other.generate_text("x", max_tokens=1, request_id="full-1")
        stream.close()
    _wait_records(records, 2)
    by_id = {r.request_id: r for r in records}
    assert by_id["full-1"].outcome == "rejected" and by_id["full-1"].code == "RESOURCE_EXHAUSTED"
    assert by_id["cancel-1"].outcome == "cancelled" and by_id["cancel-1"].completion_tokens >= 1
    got = samples(metrics)
    assert got[("pdcluster_requests_total", (("outcome", "cancelled"),))] == 1
    assert got[("pdcluster_requests_total", (("outcome", "rejected"),))] == 1


def test_in_flight_gauge_reads_the_router(recording_router):
    start, records, metrics = recording_router
    router = start(FakeBackend(token_delay_s=0.02))
    with Client(router.address, timeout=10) as client:
        stream = client.generate("abc", max_tokens=100)
        next(stream)
        assert samples(metrics)[("pdcluster_requests_in_flight", ())] == 1
        stream.close()


def test_request_log_line_is_one_json_object(caplog):
    record = RequestRecord(request_id="r-1", outcome="length", code="OK", prefill_replica="prefill-0",
                           decode_replica="decode-0", prompt_tokens=5, completion_tokens=3, ttft_ms=12.3456,
                           e2e_ms=40.0, kv_bytes=2048, end_time=1_700_000_000.25)
    with caplog.at_level(logging.INFO, logger=REQUEST_LOGGER_NAME):
        RequestLog().write(record)
    (line,) = [r.getMessage() for r in caplog.records if r.name == REQUEST_LOGGER_NAME]
    fields = json.loads(line)
    assert fields["event"] == "request" and fields["ts"] == "2023-11-14T22:13:20.250Z"
    assert (fields["request_id"], fields["outcome"], fields["code"]) == ("r-1", "length", "OK")
    assert (fields["prompt_tokens"], fields["completion_tokens"], fields["kv_bytes"]) == (5, 3, 2048)
    assert fields["ttft_ms"] == 12.346 and "error" not in fields
    failed = json.loads(RequestRecord(request_id="r-2", outcome="invalid", code="INVALID_ARGUMENT",
                                      error="sampling.top_p must be in (0, 1]").to_json())
    assert failed["error"] == "sampling.top_p must be in (0, 1]"


def test_configure_logging_writes_bare_json_lines(tmp_path):
    path = tmp_path / "log.txt"
    with open(path, "w") as stream:
        configure_logging("INFO", stream=stream)
        RequestLog().write(RequestRecord(request_id="r-3", outcome="stop", code="OK"))
        configure_logging("WARNING", stream=stream)
        RequestLog().write(RequestRecord(request_id="r-4", outcome="stop", code="OK"))  # below the level
    lines = path.read_text().splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == ["r-3"]
    with pytest.raises(ValueError):
        configure_logging("LOUD")


def _replica_stats(num_batches: int, num_steps: int, *, decode_ids=("decode-0",)) -> dict:
    return {
        "prefill": [{"id": "prefill-0", "state": "ready",
                     "stats": {"num_queued": 3, "num_running": 2, "num_batches": num_batches}}],
        "decode": [{"id": d, "state": "ready", "stats": {"num_free_blocks": 40, "num_total_blocks": 64,
                                                        "num_running": 5, "num_waiting_kv": 1, "num_steps": num_steps}}
                   for d in decode_ids],
    }


def test_replica_series_follow_the_polled_stats():
    metrics = ClusterMetrics()
    metrics.update_replicas(_replica_stats(4, 100, decode_ids=("decode-0", "decode-1")))
    metrics.update_replicas(_replica_stats(6, 130, decode_ids=("decode-0", "decode-1")))
    got = samples(metrics)
    assert got[("pdcluster_prefill_batches_total", (("replica", "prefill-0"),))] == 6
    assert got[("pdcluster_decode_steps_total", (("replica", "decode-0"),))] == 130
    assert got[("pdcluster_queue_depth", (("replica", "prefill-0"), ("tier", "prefill")))] == 3
    assert got[("pdcluster_queue_depth", (("replica", "decode-0"), ("tier", "decode")))] == 1
    assert got[("pdcluster_running_requests", (("replica", "decode-1"), ("tier", "decode")))] == 5
    assert got[("pdcluster_kv_blocks", (("replica", "decode-0"), ("state", "used")))] == 24
    assert got[("pdcluster_kv_blocks", (("replica", "decode-0"), ("state", "free")))] == 40
    assert got[("pdcluster_replica_up", (("replica", "decode-1"), ("tier", "decode")))] == 1
    # A replica that restarted reports small totals again: the counter keeps growing; a removed one disappears.
    metrics.update_replicas(_replica_stats(2, 10))
    got = samples(metrics)
    assert got[("pdcluster_prefill_batches_total", (("replica", "prefill-0"),))] == 8
    assert got[("pdcluster_decode_steps_total", (("replica", "decode-0"),))] == 140
    assert ("pdcluster_kv_blocks", (("replica", "decode-1"), ("state", "free"))) not in got
    assert ("pdcluster_replica_up", (("replica", "decode-1"), ("tier", "decode"))) not in got
    # A replica that does not answer is down.
    metrics.update_replicas({"prefill": [{"id": "prefill-0", "state": "dead", "stats": {}}], "decode": []})
    assert samples(metrics)[("pdcluster_replica_up", (("replica", "prefill-0"), ("tier", "prefill")))] == 0


def test_prefix_cache_counters_follow_the_prefill_stats():
    metrics = ClusterMetrics()
    for hits, misses, tokens in ((2, 3, 64), (5, 4, 160)):
        metrics.update_replicas({"prefill": [{"id": "prefill-0", "state": "ready", "stats": {
            "prefix_cache_hits": hits, "prefix_cache_misses": misses, "prefix_cache_cached_tokens": tokens}}],
            "decode": []})
    got = samples(metrics)
    replica = (("replica", "prefill-0"),)
    assert got[("pdcluster_prefix_cache_hits_total", replica)] == 5
    assert got[("pdcluster_prefix_cache_misses_total", replica)] == 4
    assert got[("pdcluster_prefix_cache_tokens_total", replica)] == 160


def test_replica_counters_and_placeholders():
    metrics = ClusterMetrics()
    metrics.count_replica_request("prefill", "prefill-0", "finished")
    metrics.count_replica_request("prefill", "prefill-0", "finished")
    metrics.count_replica_request("decode", "decode-0", "error")
    got = samples(metrics)
    assert got[("pdcluster_replica_requests_total",
                (("outcome", "finished"), ("replica", "prefill-0"), ("tier", "prefill")))] == 2
    assert got[("pdcluster_replica_requests_total",
                (("outcome", "error"), ("replica", "decode-0"), ("tier", "decode")))] == 1
    assert got[("pdcluster_retries_total", (("tier", "decode"),))] == 0
    metrics.count_retry("decode")
    assert samples(metrics)[("pdcluster_retries_total", (("tier", "decode"),))] == 1
    assert got[("pdcluster_autoscaler_decisions_total", (("action", "scale_up"), ("tier", "prefill")))] == 0


class _StatsBackend:
    def __init__(self) -> None:
        self.num_calls = 0

    async def replica_stats(self) -> dict:
        self.num_calls += 1
        if self.num_calls == 2:
            raise RuntimeError("a replica hiccup")  # polling must go on
        return _replica_stats(self.num_calls, 10 * self.num_calls)


def test_poller_keeps_polling_through_errors():
    metrics, backend = ClusterMetrics(), _StatsBackend()

    async def run() -> None:
        poller = ReplicaPoller(backend, metrics, interval_s=0.01)
        await poller.start()
        while backend.num_calls < 4:
            await asyncio.sleep(0.01)
        await poller.stop()

    asyncio.run(asyncio.wait_for(run(), 10))
    assert samples(metrics)[("pdcluster_decode_steps_total", (("replica", "decode-0"),))] >= 40


def test_metrics_server_serves_the_exposition():
    metrics = ClusterMetrics()
    metrics.requests.labels("stop").inc(3)
    server = MetricsServer(metrics, host="127.0.0.1", port=0)
    port = server.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        server.stop()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    (stop,) = [s for s in families["pdcluster_requests"].samples if s.labels == {"outcome": "stop"}
               and s.name == "pdcluster_requests_total"]
    assert stop.value == 3


def test_metrics_server_on_a_taken_port_says_so():
    busy = MetricsServer(ClusterMetrics(), host="127.0.0.1", port=0)
    taken = busy.start()
    try:
        with pytest.raises(OSError, match="metrics server cannot listen"):
            MetricsServer(ClusterMetrics(), host="127.0.0.1", port=taken).start()
    finally:
        busy.stop()
