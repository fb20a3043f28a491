"""The router's streaming path over a real socket: text, final message, stop strings, cancellation, errors."""

import logging
import time

import grpc
import pytest
from router_harness import RunningRouter, wait_until

from orchestrator.backend import BackendError
from orchestrator.client import Client, PdclusterError, build_request
from orchestrator.fake_backend import DECODE_REPLICA, PREFILL_REPLICA, FakeBackend
from protos import generation_pb2_grpc


@pytest.fixture(scope="module")
def router():
    with RunningRouter() as running:
        yield running


@pytest.fixture(scope="module")
def client(router):
    with Client(router.address, timeout=10) as client:
        yield client


def test_stream_carries_tokens_text_and_a_final_message(client):
    chunks = list(client.generate("hello ", max_tokens=10, request_id="stream-1"))
    *token_chunks, last = chunks
    assert [chunk.token_ids for chunk in token_chunks] == [[token] for token in b"hello hell"]
    assert "".join(chunk.text for chunk in chunks) == "hello hell"
    assert all(chunk.request_id == "stream-1" and chunk.finish_reason is None for chunk in token_chunks)
    assert last.is_last and last.finish_reason == "length" and last.token_ids == []
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (6, 10)
    assert (last.prefill_replica, last.decode_replica) == (PREFILL_REPLICA, DECODE_REPLICA)
    timings = last.timings
    assert set(timings) == {"queue_ms", "prefill_ms", "kv_transfer_ms", "ttft_ms", "tpot_ms", "e2e_ms", "kv_bytes",
                            "prefill_comm_bytes", "decode_comm_bytes"}
    assert 0 < timings["ttft_ms"] <= timings["e2e_ms"]
    assert timings["tpot_ms"] > 0
    # The fake backend's own figures pass through, converted to ms.
    assert timings["prefill_ms"] == pytest.approx(1.0) and timings["kv_transfer_ms"] == pytest.approx(0.5)
    assert timings["kv_bytes"] == 1024 * 6


def test_router_picks_a_request_id_when_the_client_does_not(router, client):
    chunks = list(client.generate(token_ids=[65, 66], max_tokens=4))
    request_ids = {chunk.request_id for chunk in chunks}
    assert len(request_ids) == 1 and request_ids != {""}
    assert "".join(chunk.text for chunk in chunks) == "ABAB"


def test_eos_from_the_backend_ends_with_stop(client):
    # The echo backend replays the prompt, so its second token is the model's eos (257, decoded as nothing).
    chunks = list(client.generate(token_ids=[65, 257], max_tokens=10))
    assert "".join(chunk.text for chunk in chunks) == "A"
    assert chunks[-1].finish_reason == "stop" and chunks[-1].usage.completion_tokens == 2
    ignoring = list(client.generate(token_ids=[65, 257], max_tokens=6, ignore_eos=True))
    assert "".join(chunk.text for chunk in ignoring) == "AAA" and ignoring[-1].finish_reason == "length"


def test_stop_string_truncates_and_cancels_downstream(router, client):
    chunks = list(client.generate("hello world ", max_tokens=100, stop=["wor"], request_id="stop-1"))
    assert "".join(chunk.text for chunk in chunks) == "hello "
    last = chunks[-1]
    assert last.finish_reason == "stop"
    assert last.usage.completion_tokens == len("hello wor")  # every token generated, shown or not
    # The router closed the backend's stream before sending the final message: no polling needed.
    assert "stop-1" in router.backend.cancelled_request_ids
    assert "stop-1" not in router.backend.open_request_ids
    assert (last.prefill_replica, last.decode_replica) == (PREFILL_REPLICA, DECODE_REPLICA)


def test_text_held_for_a_possible_stop_string_is_released_at_the_end(client):
    chunks = list(client.generate("abc", max_tokens=3, stop=["cx"]))
    assert [chunk.text for chunk in chunks] == ["a", "b", "", "c"]
    assert chunks[-1].finish_reason == "length"


def test_client_closing_the_stream_cancels_the_backend_request():
    with RunningRouter(FakeBackend(token_delay_s=0.02)) as router, Client(router.address) as client:
        stream = client.generate("abc", max_tokens=200, request_id="closed-early")
        assert next(stream).text == "a"
        assert next(stream).text == "b"
        stream.close()
        wait_until(lambda: "closed-early" in router.backend.cancelled_request_ids, what="the backend to see the cancel")
        assert router.backend.num_open_requests == 0
        wait_until(lambda: router.server.num_inflight == 0, what="the router to forget the request")


def test_cancel_reaches_a_backend_that_is_waiting_for_its_next_token():
    with RunningRouter(FakeBackend(token_delay_s=30)) as router:
        with grpc.insecure_channel(router.address) as channel:
            call = generation_pb2_grpc.GenerationStub(channel).Generate(build_request("abc", request_id="waiting"))
            wait_until(lambda: router.backend.num_open_requests == 1, what="the request to reach the backend")
            started = time.monotonic()
            call.cancel()
            wait_until(lambda: "waiting" in router.backend.cancelled_request_ids, what="the backend to see the cancel")
            assert time.monotonic() - started < 5
            wait_until(lambda: router.server.num_inflight == 0, what="the router to forget the request")


def test_deadline_reaches_the_spec_and_expiry_cancels():
    with RunningRouter(FakeBackend(token_delay_s=30)) as slow_router, Client(slow_router.address, timeout=0.5) as client:
        before = time.time()
        with pytest.raises(PdclusterError) as caught:
            list(client.generate("abc", request_id="late"))
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        spec = slow_router.backend.specs[-1]
        assert before < spec.deadline < before + 0.6
        wait_until(lambda: "late" in slow_router.backend.cancelled_request_ids, what="the backend to see the cancel")


def test_capacity_refuses_with_resource_exhausted_then_recovers():
    with RunningRouter(FakeBackend(token_delay_s=30), max_inflight=2) as router:
        with grpc.insecure_channel(router.address) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            calls = [stub.Generate(build_request("abc", request_id=f"busy-{index}")) for index in range(2)]
            wait_until(lambda: router.server.num_inflight == 2, what="two requests in flight")
            with Client(router.address) as client:
                with pytest.raises(PdclusterError) as caught:
                    list(client.generate("abc"))
                assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert caught.value.message == "router at capacity: 2 requests in flight"
                for call in calls:
                    call.cancel()
                wait_until(lambda: router.server.num_inflight == 0, what="the cancelled requests to leave")
                router.backend.token_delay_s = 0.0
                assert client.generate_text("abc", max_tokens=2) == "ab"


def test_duplicate_request_id_in_flight_is_refused():
    with RunningRouter(FakeBackend(token_delay_s=30)) as router:
        with grpc.insecure_channel(router.address) as channel:
            call = generation_pb2_grpc.GenerationStub(channel).Generate(build_request("abc", request_id="twin"))
            wait_until(lambda: router.server.num_inflight == 1, what="the first request in flight")
            with Client(router.address) as client, pytest.raises(PdclusterError) as caught:
                list(client.generate("abc", request_id="twin"))
            assert caught.value.code == grpc.StatusCode.ALREADY_EXISTS
            assert caught.value.message.startswith("request_id: ")
            call.cancel()


def test_oversized_message_is_refused_by_grpc(router, client):
    num_specs_before = len(router.backend.specs)
    with pytest.raises(PdclusterError) as caught:
        list(client.generate("x" * (100 * 1024)))  # the harness allows 64 KiB messages
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(router.backend.specs) == num_specs_before


def test_backend_error_keeps_its_code_after_tokens_were_sent():
    backend = FakeBackend(fail_after_tokens=2, failure=BackendError(grpc.StatusCode.UNAVAILABLE, "replica gone"))
    with RunningRouter(backend) as router, Client(router.address) as client:
        received = []
        with pytest.raises(PdclusterError) as caught:
            for chunk in client.generate("abc", max_tokens=10, request_id="dies"):
                received.append(chunk.text)
        assert received == ["a", "b"]
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE and caught.value.message == "replica gone"
        assert backend.failed_request_ids == ["dies"] and backend.num_open_requests == 0


def test_unexpected_exception_is_internal_and_logged_with_traceback(caplog):
    backend = FakeBackend(fail_after_tokens=0, failure=RuntimeError("kaboom"))
    with caplog.at_level(logging.ERROR, logger="orchestrator.router"):
        with RunningRouter(backend) as router, Client(router.address) as client:
            with pytest.raises(PdclusterError) as caught:
                list(client.generate("abc", request_id="boom"))
    assert caught.value.code == grpc.StatusCode.INTERNAL
    assert "RuntimeError: kaboom" in caught.value.message
    records = [record for record in caplog.records if "boom" in record.getMessage()]
    assert records and records[0].exc_info is not None and records[0].exc_info[0] is RuntimeError


def test_text_never_splits_a_character(client):
    # "é" is two bytes (two tokens for the byte tokenizer); the echo stream ends on half of it.
    chunks = list(client.generate("é", max_tokens=3))
    assert [chunk.token_ids for chunk in chunks[:-1]] == [[0xC3], [0xA9], [0xC3]]
    assert [chunk.text for chunk in chunks] == ["", "é", "", "\ufffd"]  # the dangling byte is flushed at the end
