"""Per-request communication bytes on their way out: backend Timings -> router -> final GenerateResponse -> client
SDK, request record and log line, `pdcluster_comm_bytes_total{kind,tier}`, and the `pdcluster generate` summary."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json

import pytest
import router_harness
from router_harness import RunningRouter, wait_until

from orchestrator import cli_client
from orchestrator.backend import FinishEvent, Timings
from orchestrator.client import Client
from orchestrator.fake_backend import FakeBackend
from orchestrator.metrics import ClusterMetrics
from orchestrator.request_log import RequestRecord
from orchestrator.router import build_server

PREFILL = {"tp_allreduce": 4_200, "tp_allgather": 1_024}
DECODE = {"tp_allreduce": 900, "pp_send": 64}


class CommBackend(FakeBackend):
    """The fake backend, whose final event carries per-tier comm bytes."""

    async def generate(self, spec):
        async for event in super().generate(spec):
            if isinstance(event, FinishEvent):
                timings = dataclasses.replace(event.timings, prefill_comm_bytes=PREFILL, decode_comm_bytes=DECODE)
                event = dataclasses.replace(event, timings=timings)
            yield event


@pytest.fixture
def served(monkeypatch):
    records: list[RequestRecord] = []
    metrics = ClusterMetrics()

    def on_done(record: RequestRecord) -> None:
        records.append(record)
        metrics.observe_request(record)

    monkeypatch.setattr(router_harness, "build_server", functools.partial(build_server, on_request_done=on_done))
    with RunningRouter(CommBackend()) as router:
        yield router, records, metrics


def test_timings_validate_comm_bytes():
    assert Timings(prefill_comm_bytes={"tp_allreduce": 3}).prefill_comm_bytes == {"tp_allreduce": 3}
    with pytest.raises(ValueError, match="decode_comm_bytes"):
        Timings(decode_comm_bytes={"pp_send": -1})
    with pytest.raises(ValueError, match="prefill_comm_bytes"):
        Timings(prefill_comm_bytes={"pp_send": 1.5})


def test_final_response_record_metrics_and_summary_carry_the_bytes(served):
    router, records, metrics = served
    with Client(router.address) as client:
        chunks = list(client.generate(prompt="hi there", max_tokens=4))
    final = chunks[-1]
    assert final.timings["prefill_comm_bytes"] == PREFILL
    assert final.timings["decode_comm_bytes"] == DECODE
    assert all(not c.timings for c in chunks[:-1])
    wait_until(lambda: records, what="the request record")
    record = records[0]
    assert (record.prefill_comm_bytes, record.decode_comm_bytes) == (PREFILL, DECODE)
    line = json.loads(record.to_json())
    assert line["prefill_comm_bytes"] == PREFILL and line["decode_comm_bytes"] == DECODE
    text = metrics.exposition().decode()
    assert 'pdcluster_comm_bytes_total{kind="tp_allreduce",tier="prefill"} 4200.0' in text
    assert 'pdcluster_comm_bytes_total{kind="pp_send",tier="decode"} 64.0' in text
    # A second request adds up.
    with Client(router.address) as client:
        list(client.generate(prompt="again", max_tokens=2))
    wait_until(lambda: len(records) == 2, what="the second record")
    assert 'pdcluster_comm_bytes_total{kind="tp_allreduce",tier="decode"} 1800.0' in metrics.exposition().decode()

    parser = argparse.ArgumentParser()
    cli_client.add_generate_args(parser)
    err = io.StringIO()
    assert cli_client.run_generate(parser.parse_args(["hey", "--address", router.address]), out=io.StringIO(),
                                   err=err) == 0
    summary = err.getvalue()
    assert "prefill_comm=tp_allgather:1024B,tp_allreduce:4200B" in summary
    assert "decode_comm=pp_send:64B,tp_allreduce:900B" in summary


def test_summary_leaves_comm_out_on_one_rank_replicas():
    timings = {"ttft_ms": 1.0, "tpot_ms": 1.0, "e2e_ms": 2.0, "kv_bytes": 0, "prefill_comm_bytes": {},
               "decode_comm_bytes": {}}
    assert cli_client._comm_summary(timings) == ""
    assert cli_client._comm_summary({**timings, "kv_bytes": 10}) == " kv=10B"
