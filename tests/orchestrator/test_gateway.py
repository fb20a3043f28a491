"""The OpenAI-compatible gateway over a router on the fake backend, with the `openai` package as the client."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import openai
import pytest
from router_harness import RunningRouter, wait_until

from orchestrator.client import Client
from orchestrator.fake_backend import FakeBackend
from orchestrator.gateway import OpenAIGateway
from orchestrator.gateway_chat import ChatFormatter

MODEL = "fake-model"


class GatewayOverRouter:
    """A fake-backend router and a gateway in front of it, both on the router's background loop."""

    def __init__(self, backend: FakeBackend | None = None, *, gateway_options=None, **router_options) -> None:
        self.router = RunningRouter(backend, **router_options)
        self.gateway = OpenAIGateway(self.router.address, port=0, **(gateway_options or {}))
        try:
            self.port = self.router.call(self.gateway.start())
        except BaseException:
            self.router.close()
            raise
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.base_url + "/v1", api_key="unused", max_retries=0, timeout=20)

    def close(self) -> None:
        try:
            self.router.call(self.gateway.stop())
        finally:
            self.router.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@pytest.fixture(scope="module")
def served():
    with GatewayOverRouter() as running:
        yield running


def _grpc_text(router: RunningRouter, prompt=None, **options) -> str:
    with Client(router.address, timeout=10) as client:
        return client.generate_text(prompt, **options)


def _post(base_url: str, path: str, body, headers=None) -> tuple[int, dict, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(base_url + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_completion_equals_the_grpc_path(served):
    result = served.client.completions.create(model=MODEL, prompt="hello ", max_tokens=9, temperature=0)
    assert result.choices[0].text == _grpc_text(served.router, "hello ", max_tokens=9) == "hello hel"
    assert result.choices[0].finish_reason == "length" and result.object == "text_completion"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (6, 9, 15)
    assert result.id.startswith("cmpl-") and result.model == MODEL


def test_streamed_completion_and_token_id_prompt(served):
    chunks = list(served.client.completions.create(model=MODEL, prompt=[72, 105], max_tokens=5, temperature=0,
                                                   stream=True))
    assert "".join(c.choices[0].text for c in chunks) == _grpc_text(served.router, token_ids=[72, 105], max_tokens=5)
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_streamed_chat_equals_the_grpc_path_of_the_rendered_prompt(served):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    stream = served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                   stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    prompt = "System: Be brief.\nUser: Hi\nAssistant:"  # the documented format of models without a template
    assert ChatFormatter().render(messages) == prompt
    assert text == _grpc_text(served.router, prompt, max_tokens=12)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == len(prompt.encode())


def test_chat_non_streamed(served):
    result = served.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "ab"}]}], max_tokens=4,
        temperature=0)
    assert result.object == "chat.completion" and result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == _grpc_text(served.router, "User: ab\nAssistant:", max_tokens=4)


def test_openai_parameters_reach_the_router(served):
    backend = served.router.backend
    served.client.completions.create(model=MODEL, prompt="xyz", max_tokens=3, temperature=0.5, top_p=0.75, seed=7,
                                     stop=["q"], extra_body={"top_k": 5, "ignore_eos": True},
                                     extra_headers={"X-Request-Id": "gw-params-1"})
    spec = next(s for s in backend.specs if s.request_id == "gw-params-1")
    params = spec.params
    assert (params.max_tokens, params.temperature, params.top_p, params.seed, params.top_k, params.ignore_eos) == \
        (3, 0.5, 0.75, 7, 5, True)
    assert spec.stop == ("q",)


def test_stop_string_ends_with_stop(served):
    result = served.client.completions.create(model=MODEL, prompt="abcabc", max_tokens=10, temperature=0, stop="c")
    assert result.choices[0].text == "ab" and result.choices[0].finish_reason == "stop"


def test_models_lists_the_served_model(served):
    models = served.client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_n_above_one_is_a_400_naming_n(served):
    with pytest.raises(openai.BadRequestError) as error:
        served.client.completions.create(model=MODEL, prompt="x", max_tokens=2, n=2)
    assert error.value.status_code == 400
    assert error.value.body["param"] == "n" and error.value.body["type"] == "invalid_request_error"
    assert "n=1" in error.value.body["message"]


def test_router_validation_error_is_a_400_with_its_message(served):
    with pytest.raises(openai.BadRequestError) as error:
        served.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], top_p=2.0)
    assert "top_p" in error.value.body["message"]
    assert set(error.value.body) == {"message", "type", "param", "code"}


def test_unknown_model_is_a_404(served):
    with pytest.raises(openai.NotFoundError) as error:
        served.client.completions.create(model="gpt-unknown", prompt="x", max_tokens=1)
    assert error.value.body["code"] == "model_not_found"


def test_malformed_bodies_and_paths_get_openai_error_bodies(served):
    status, _, body = _post(served.base_url, "/v1/completions", b"{not json")
    assert status == 400 and "not valid JSON" in json.loads(body)["error"]["message"]
    status, _, body = _post(served.base_url, "/v1/completions", {"model": MODEL, "prompt": ["a", "b"]})
    assert status == 400 and json.loads(body)["error"]["param"] == "prompt"
    status, _, body = _post(served.base_url, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "bot"}]})
    assert status == 400 and json.loads(body)["error"]["param"] == "messages[0].role"
    status, _, body = _post(served.base_url, "/v1/completions", {"prompt": "x", "logprobs": 3})
    assert status == 400 and json.loads(body)["error"]["param"] == "logprobs"
    status, _, body = _post(served.base_url, "/v1/nothing", {})
    assert status == 404 and "error" in json.loads(body)


def test_sse_wire_format_and_request_id_header(served):
    status, headers, body = _post(served.base_url, "/v1/completions",
                                  {"prompt": "ok", "max_tokens": 2, "temperature": 0, "stream": True},
                                  headers={"X-Request-Id": "gw-sse-1"})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert headers["X-Request-Id"] == "gw-sse-1"
    events = [line[len("data: "):] for line in body.decode().split("\n\n") if line]
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    assert {p["id"] for p in payloads} == {"cmpl-gw-sse-1"}
    assert "".join(p["choices"][0]["text"] for p in payloads) == "ok"


def test_capacity_is_a_429_and_a_dead_replica_a_503():
    with GatewayOverRouter(FakeBackend(token_delay_s=0.05), max_inflight=1) as running:
        slow = threading.Thread(target=lambda: _grpc_text(running.router, "slow", max_tokens=16))
        slow.start()
        try:
            wait_until(lambda: running.router.backend.num_open_requests == 1, what="the slow request in flight")
            with pytest.raises(openai.RateLimitError) as error:
                running.client.completions.create(model=MODEL, prompt="x", max_tokens=1)
            assert error.value.status_code == 429 and "capacity" in error.value.body["message"]
        finally:
            slow.join(10)
    with GatewayOverRouter(FakeBackend(fail_after_tokens=0)) as running:
        with pytest.raises(openai.InternalServerError) as error:
            running.client.completions.create(model=MODEL, prompt="x", max_tokens=3)
        assert error.value.status_code == 503 and error.value.body["code"] == "service_unavailable"


def test_failure_mid_stream_is_a_last_error_event():
    with GatewayOverRouter(FakeBackend(fail_after_tokens=2)) as running:
        status, _, body = _post(running.base_url, "/v1/completions",
                                {"prompt": "abcdef", "max_tokens": 5, "temperature": 0, "stream": True})
    events = [line[len("data: "):] for line in body.decode().split("\n\n") if line]
    assert status == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "service_unavailable"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-2]) == "ab"


def test_client_hanging_up_cancels_the_request_downstream():
    backend = FakeBackend(token_delay_s=0.05)
    with GatewayOverRouter(backend) as running:
        stream = running.client.completions.create(model=MODEL, prompt="abc", max_tokens=200, temperature=0,
                                                   stream=True, extra_headers={"X-Request-Id": "gw-hangup"})
        next(iter(stream))
        stream.close()
        wait_until(lambda: "gw-hangup" in backend.cancelled_request_ids, what="the backend to see the cancel")
        assert backend.num_open_requests == 0


def test_bearer_token_is_passed_on_to_the_router(monkeypatch):
    import functools

    import router_harness

    from orchestrator.router import build_server
    from orchestrator.security import TokenAuthInterceptor

    token = "client-token-0123456789"
    monkeypatch.setattr(router_harness, "build_server", functools.partial(
        build_server, interceptors=[TokenAuthInterceptor({token: "client"})]))
    # With authentication on, the gateway cannot ask the router's Status for the model: it is told.
    with GatewayOverRouter(gateway_options={"model_name": MODEL, "max_context_len": 256}) as running:
        authorized = openai.OpenAI(base_url=running.base_url + "/v1", api_key=token, max_retries=0, timeout=20)
        assert authorized.completions.create(model=MODEL, prompt="ok", max_tokens=2).choices[0].text == "ok"
        with pytest.raises(openai.AuthenticationError) as error:
            running.client.completions.create(model=MODEL, prompt="ok", max_tokens=2)  # api_key "unused"
        assert error.value.status_code == 401
        assert list(running.gateway._token_clients) == [token]  # the refused token's connection was not kept
