"""The standard health service and the Status call."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from router_harness import RunningRouter, wait_until

from orchestrator.backend import BackendError
from orchestrator.client import Client, PdclusterError, build_request
from orchestrator.fake_backend import DECODE_REPLICA, PREFILL_REPLICA, FakeBackend
from orchestrator.router import SERVICE_NAME
from protos import generation_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_health_is_serving_for_the_server_and_the_generation_service():
    with RunningRouter() as router, grpc.insecure_channel(router.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            assert stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == SERVING
        with Client(router.address) as client:
            assert client.health() and client.health(SERVICE_NAME)
            assert not client.health("no.such.Service")  # NOT_FOUND from the health service
            router.call(router.server.set_serving(False))
            assert not client.health()
            assert stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5).status == NOT_SERVING
            router.call(router.server.set_serving(True))
            assert client.health()


def test_health_turns_not_serving_when_the_router_stops():
    router = RunningRouter()
    try:
        with grpc.insecure_channel(router.address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert next(watch).status == SERVING
            stopping = router.submit(router.server.stop(grace_s=5))
            assert next(watch).status == NOT_SERVING  # watchers hear it before the server goes away
            watch.cancel()  # the last call in flight: the stop need not wait out its grace period
            stopping.result(10)
    finally:
        router.close()
    with Client(router.address, timeout=1) as client:
        assert not client.health()  # nobody listens any more


def test_status_reports_replicas_and_in_flight_requests():
    with RunningRouter(FakeBackend(token_delay_s=30)) as router, Client(router.address) as client:
        with grpc.insecure_channel(router.address) as channel:
            call = generation_pb2_grpc.GenerationStub(channel).Generate(build_request("abc"))
            wait_until(lambda: router.backend.num_open_requests == 1, what="a request in the backend")
            status = client.status()
            call.cancel()
    assert status["model"] == "fake-model"
    assert status["max_context_len"] == 256
    assert status["num_inflight"] == 1
    assert [replica["id"] for replica in status["prefill"]] == [PREFILL_REPLICA]
    decode = status["decode"][0]
    assert decode["id"] == DECODE_REPLICA and decode["state"] == "ready"
    assert decode["mesh"] == {"tp": 1, "cp": 1, "pp": 1, "ep": 1}
    assert decode["load"] == {"num_queued": 0, "num_running": 1}
    assert decode["kv_blocks"] == {"num_free": 63, "num_total": 64}


class _BrokenStatusBackend(FakeBackend):
    def __init__(self, status: dict | Exception) -> None:
        super().__init__()
        self._status = status

    async def status(self) -> dict:
        if isinstance(self._status, Exception):
            raise self._status
        return self._status


@pytest.mark.parametrize(
    "status, code, words",
    [
        ({"model": "m", "decode": []}, grpc.StatusCode.INTERNAL, "status: missing key 'prefill'"),
        ({"model": "m", "prefill": [{"id": "p0", "state": "asleep"}], "decode": []}, grpc.StatusCode.INTERNAL,
         "status.prefill[0].state: unknown replica state 'asleep'"),
        (BackendError(grpc.StatusCode.UNAVAILABLE, "deployment is restarting"), grpc.StatusCode.UNAVAILABLE,
         "deployment is restarting"),
        (KeyError("replica-7"), grpc.StatusCode.INTERNAL, "backend status failed: KeyError"),
    ],
)
def test_status_failures_have_clear_codes(status, code, words):
    with RunningRouter(_BrokenStatusBackend(status)) as router, Client(router.address) as client:
        with pytest.raises(PdclusterError) as caught:
            client.status()
    assert caught.value.code == code
    assert words in caught.value.message
