"""Hostile input at the router: arbitrary request fields (hypothesis), raw garbage and truncated HTTP/2 frames on
the socket. The server never crashes or hangs, always answers a well-formed call with a status, and keeps serving
well-formed requests meanwhile."""

from __future__ import annotations

import socket

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.client import Client
from protos import generation_pb2, generation_pb2_grpc
from router_harness import RunningRouter

ALLOWED_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                 grpc.StatusCode.ALREADY_EXISTS}

int32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
doubles = st.floats(allow_nan=True, allow_infinity=True, width=64)


@st.composite
def requests(draw):
    sampling = generation_pb2.SamplingOptions(
        temperature=draw(doubles), top_k=draw(int32), ignore_eos=draw(st.booleans()),
        stop=draw(st.lists(st.text(max_size=8), max_size=3)),
        stop_token_ids=draw(st.lists(int32, max_size=3)))
    if draw(st.booleans()):
        sampling.max_tokens = draw(int32)
    if draw(st.booleans()):
        sampling.top_p = draw(doubles)
    if draw(st.booleans()):
        sampling.seed = draw(int64)
    return generation_pb2.GenerateRequest(
        request_id=draw(st.text(max_size=140)), prompt=draw(st.text(max_size=40)),
        token_ids=draw(st.lists(int32, max_size=12)), sampling=sampling if draw(st.booleans()) else None)


@pytest.fixture(scope="module")
def router():
    with RunningRouter(max_inflight=64) as running:
        yield running


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=requests())
def test_any_request_gets_a_status(router, request):
    with grpc.insecure_channel(router.address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        try:
            for _ in stub.Generate(request, timeout=10):
                pass
            code = grpc.StatusCode.OK
        except grpc.RpcError as error:
            code = error.code()
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                assert error.details(), "an INVALID_ARGUMENT must say which field"
    assert code in ALLOWED_CODES, code


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
GARBAGE = [
    b"",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x00" * 64,
    bytes(range(256)) * 4,
    PREFACE,
    PREFACE + b"\x00\x00\x12\x04\x00\x00\x00\x00",  # a SETTINGS frame header whose payload never comes
    PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" + b"\x00\x40\x00\x01\x04\x00\x00\x00\x01\x82",  # truncated HEADERS
    PREFACE + b"\xff\xff\xff\x00\x00\x00\x00\x00\x01" + b"x" * 100,  # DATA on an unopened stream, oversized length
]


@pytest.mark.parametrize("payload", GARBAGE, ids=range(len(GARBAGE)))
def test_raw_bytes_do_not_break_the_server(router, payload):
    with socket.create_connection(("127.0.0.1", router.port), timeout=5) as sock:
        sock.sendall(payload)
        sock.settimeout(2)
        try:
            sock.recv(4096)  # whatever it answers (GOAWAY, nothing), it must not take the server down
        except (socket.timeout, ConnectionResetError):
            pass
    with Client(router.address, timeout=10) as client:  # still serving well-formed requests
        assert sum(len(c.token_ids) for c in client.generate("ok", max_tokens=3, ignore_eos=True)) == 3


def test_many_half_open_connections_do_not_block_others(router):
    sockets = []
    try:
        for _ in range(50):
            sock = socket.create_connection(("127.0.0.1", router.port), timeout=5)
            sock.sendall(PREFACE[:10])  # stalls mid-preface
            sockets.append(sock)
        with Client(router.address, timeout=10) as client:
            assert client.status()["model"]
    finally:
        for sock in sockets:
            sock.close()
