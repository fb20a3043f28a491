"""The client SDK: its import footprint, AsyncClient, retries and error mapping."""

import asyncio
import contextlib
import socket
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from router_harness import RunningRouter, wait_until

import orchestrator
from orchestrator.backend import BackendError
from orchestrator.client import AsyncClient, Client, PdclusterError, Usage, build_request
from orchestrator.fake_backend import FakeBackend

REPO_ROOT = Path(orchestrator.__file__).resolve().parent.parent


def test_client_imports_with_only_grpc_and_protobuf():
    # A None entry in sys.modules makes any import of that name fail, so a stray dependency shows up here.
    code = """
import sys
BLOCKED = ["torch", "ray", "yaml", "mesh", "numpy", "grpc_health", "tokenizers", "safetensors"]
for name in BLOCKED:
    sys.modules[name] = None
import orchestrator.client, orchestrator.cli_client
from orchestrator.client import AsyncClient, Client, PdclusterError
Client("127.0.0.1:1").close()
loaded = [name for name in BLOCKED if sys.modules.get(name) is not None]
assert not loaded, loaded
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                            env={"PYTHONPATH": str(REPO_ROOT), "PATH": ""})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_build_request_sets_presence_fields_only_when_given():
    request = build_request("hi", max_tokens=None, stop="END")
    assert not request.sampling.HasField("max_tokens") and not request.sampling.HasField("seed")
    assert list(request.sampling.stop) == ["END"]  # a lone string is one stop string, not one per character
    assert request.sampling.HasField("top_p") and request.sampling.top_p == 1.0
    seeded = build_request(token_ids=[1, 2], seed=0)
    assert seeded.sampling.HasField("seed") and seeded.sampling.seed == 0 and seeded.prompt == ""


def test_usage_reads_as_attributes_and_keys():
    usage = Usage(prompt_tokens=3, completion_tokens=4)
    assert usage["prompt_tokens"] == usage.prompt_tokens == 3
    with pytest.raises(KeyError):
        usage["tokens"]


def test_final_chunk_carries_the_cached_prompt_tokens():
    from orchestrator.client import chunk_from_response
    from protos import generation_pb2

    response = generation_pb2.GenerateResponse(
        request_id="r", finish_reason=generation_pb2.FINISH_REASON_LENGTH,
        usage=generation_pb2.Usage(prompt_tokens=40, completion_tokens=2, cached_prompt_tokens=32))
    usage = chunk_from_response(response).usage
    assert (usage.prompt_tokens, usage.cached_prompt_tokens, usage["cached_prompt_tokens"]) == (40, 32, 32)


def test_client_arguments_are_checked():
    with pytest.raises(ValueError, match="retries"):
        Client("127.0.0.1:1", retries=-1)
    with pytest.raises(ValueError, match="timeout"):
        AsyncClient("127.0.0.1:1", timeout=0)


def test_async_client_streams_and_reports():
    async def scenario(address):
        async with AsyncClient(address, timeout=10) as client:
            chunks = [chunk async for chunk in client.generate("hey ", max_tokens=6, request_id="async-1")]
            text = await client.generate_text(token_ids=[120, 121], max_tokens=3)
            status = await client.status()
            is_healthy = await client.health()
            with pytest.raises(PdclusterError) as caught:
                await client.generate_text("hi", top_k=-2)
            return chunks, text, status, is_healthy, caught.value

    with RunningRouter() as router:
        chunks, text, status, is_healthy, error = asyncio.run(scenario(router.address))
    assert "".join(chunk.text for chunk in chunks) == "hey he"
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 6
    assert {chunk.request_id for chunk in chunks} == {"async-1"}
    assert text == "xyx"
    assert status["model"] == "fake-model" and status["num_inflight"] == 0
    assert is_healthy
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.message.startswith("sampling.top_k: ")


def test_async_client_closing_the_stream_cancels_the_request():
    async def scenario(address):
        async with AsyncClient(address) as client:
            async with contextlib.aclosing(client.generate("abc", max_tokens=200, request_id="async-cancel")) as stream:
                async for chunk in stream:
                    break
            return chunk

    with RunningRouter(FakeBackend(token_delay_s=0.02)) as router:
        first = asyncio.run(scenario(router.address))
        assert first.text == "a"
        wait_until(lambda: "async-cancel" in router.backend.cancelled_request_ids, what="the backend to see the cancel")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_retries_reconnect_until_the_router_is_up():
    port = _free_port()
    routers = []
    starter = threading.Timer(0.25, lambda: routers.append(RunningRouter(port=port)))
    starter.start()
    try:
        with Client(f"127.0.0.1:{port}", retries=6, timeout=20) as client:
            assert client.generate_text("abc", max_tokens=4) == "abca"
            assert client.status()["model"] == "fake-model"
    finally:
        starter.join()
        for router in routers:
            router.close()


def test_without_retries_unavailable_is_raised_at_once():
    with Client(f"127.0.0.1:{_free_port()}", timeout=5) as client:
        with pytest.raises(PdclusterError) as caught:
            list(client.generate("abc"))
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE and caught.value.code_name == "UNAVAILABLE"
        with pytest.raises(PdclusterError) as caught:
            client.status()
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("client_kind", ["sync", "async"])
def test_no_retry_once_tokens_were_received(client_kind):
    backend = FakeBackend(fail_after_tokens=2, failure=BackendError(grpc.StatusCode.UNAVAILABLE, "replica gone"))
    with RunningRouter(backend) as router:
        if client_kind == "sync":
            with Client(router.address, retries=3) as client, pytest.raises(PdclusterError) as caught:
                list(client.generate("abc", max_tokens=10))
        else:
            async def scenario():
                async with AsyncClient(router.address, retries=3) as client:
                    await client.generate_text("abc", max_tokens=10)

            with pytest.raises(PdclusterError) as caught:
                asyncio.run(scenario())
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert len(backend.specs) == 1, "the request was retried after tokens had reached the client"


class _FlakyBackend(FakeBackend):
    """Refuses its first num_failures requests with UNAVAILABLE before any token, then behaves."""

    def __init__(self, num_failures: int) -> None:
        super().__init__()
        self.num_failures_left = num_failures

    async def generate(self, spec):
        if self.num_failures_left > 0:
            self.num_failures_left -= 1
            self.specs.append(spec)
            raise BackendError(grpc.StatusCode.UNAVAILABLE, "no replica ready")
        async for event in super().generate(spec):
            yield event


@pytest.mark.parametrize("client_kind", ["sync", "async"])
def test_retry_before_any_token_reaches_a_recovered_backend(client_kind):
    backend = _FlakyBackend(num_failures=2)
    with RunningRouter(backend) as router:
        if client_kind == "sync":
            with Client(router.address, retries=2) as client:
                text = client.generate_text("abc", max_tokens=3)
        else:
            async def scenario():
                async with AsyncClient(router.address, retries=2) as client:
                    return await client.generate_text("abc", max_tokens=3)

            text = asyncio.run(scenario())
    assert text == "abc"
    assert len(backend.specs) == 3  # two refusals, then the attempt that streamed


def test_retries_run_out():
    with RunningRouter(_FlakyBackend(num_failures=5)) as router, Client(router.address, retries=1) as client:
        with pytest.raises(PdclusterError) as caught:
            client.generate_text("abc")
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE and caught.value.message == "no replica ready"
    assert len(router.backend.specs) == 2
