"""Metrics, request log lines and the OpenAI gateway on a real local cluster (one cluster for the module)."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.client import Client, PdclusterError
from orchestrator.config import EndpointSection
from orchestrator.gateway_chat import ChatFormatter
from orchestrator.request_log import REQUEST_LOGGER_NAME
from orchestrator.serve import RunningCluster

from e2e_helpers import cluster_config, make_model_dir

pytestmark = pytest.mark.slow

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def cluster(ray_local, tmp_path_factory):
    model_dir = make_model_dir(tmp_path_factory, "tiny-llama")
    config = dataclasses.replace(cluster_config(model_dir), metrics=EndpointSection(port=0),
                                 gateway=EndpointSection(port=0))
    with RunningCluster(config) as running:
        yield running


def scrape(cluster) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{cluster.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def delta(after: dict, before: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_metrics_and_log_lines_after_a_few_requests(cluster, caplog):
    before = scrape(cluster)
    prompts = [[5, 6, 7], [9] * 20, [11, 12, 13, 14, 15, 16, 17, 18, 19]]
    with caplog.at_level(logging.INFO, logger=REQUEST_LOGGER_NAME), Client(cluster.address, timeout=60) as client:
        for index, prompt in enumerate(prompts):
            client.generate_text(token_ids=prompt, max_tokens=MAX_TOKENS, ignore_eos=True, request_id=f"obs-{index}")
        with pytest.raises(PdclusterError):
            client.generate_text(token_ids=[1], top_p=3.0, request_id="obs-bad")
        # The record is made as the call's task ends, just after the client read the last message.
        deadline = time.monotonic() + 10
        while len([r for r in caplog.records if r.name == REQUEST_LOGGER_NAME]) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
    lines = {json.loads(r.getMessage())["request_id"]: json.loads(r.getMessage())
             for r in caplog.records if r.name == REQUEST_LOGGER_NAME}
    for index, prompt in enumerate(prompts):
        line = lines[f"obs-{index}"]
        assert (line["outcome"], line["code"]) == ("length", "OK")
        assert (line["prompt_tokens"], line["completion_tokens"]) == (len(prompt), MAX_TOKENS)
        assert (line["prefill_replica"], line["decode_replica"]) == ("prefill-0", "decode-0")
        assert line["kv_bytes"] > 0 and 0 < line["ttft_ms"] <= line["e2e_ms"]
    assert lines["obs-bad"]["outcome"] == "invalid" and "top_p" in lines["obs-bad"]["error"]

    # Replica gauges come from the poller (every second): wait until it has seen the decode steps.
    deadline = time.monotonic() + 10
    after = scrape(cluster)
    while delta(after, before, "pdcluster_decode_steps_total", replica="decode-0") <= 0 and time.monotonic() < deadline:
        time.sleep(0.2)
        after = scrape(cluster)
    pair = {"prefill_replica": "prefill-0", "decode_replica": "decode-0"}
    assert delta(after, before, "pdcluster_requests_total", outcome="length") == 3
    assert delta(after, before, "pdcluster_requests_total", outcome="invalid") == 1
    assert delta(after, before, "pdcluster_ttft_seconds_count", **pair) == 3
    assert delta(after, before, "pdcluster_tpot_seconds_count", **pair) == 3
    assert delta(after, before, "pdcluster_e2e_latency_seconds_count", **pair) == 3
    assert delta(after, before, "pdcluster_kv_transfer_bytes_count", **pair) == 3
    assert delta(after, before, "pdcluster_kv_transfer_bytes_sum", **pair) == sum(
        lines[f"obs-{i}"]["kv_bytes"] for i in range(3))
    assert delta(after, before, "pdcluster_generation_tokens_total", replica="decode-0") == 3 * MAX_TOKENS
    assert delta(after, before, "pdcluster_prompt_tokens_total", replica="prefill-0") == sum(map(len, prompts))
    for tier in ("prefill", "decode"):
        assert delta(after, before, "pdcluster_replica_requests_total", tier=tier, replica=f"{tier}-0",
                     outcome="finished") == 3
        assert after[("pdcluster_replica_up", (("replica", f"{tier}-0"), ("tier", tier)))] == 1
        assert ("pdcluster_queue_depth", (("replica", f"{tier}-0"), ("tier", tier))) in after
        assert after[("pdcluster_retries_total", (("tier", tier),))] == 0
    assert delta(after, before, "pdcluster_prefill_batches_total", replica="prefill-0") >= 1
    free = after[("pdcluster_kv_blocks", (("replica", "decode-0"), ("state", "free")))]
    used = after[("pdcluster_kv_blocks", (("replica", "decode-0"), ("state", "used")))]
    assert free + used == cluster.config.decode.num_kv_blocks
    assert after[("pdcluster_requests_in_flight", ())] == 0


def _openai(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{cluster.gateway_port}/v1", api_key="unused", max_retries=0,
                         timeout=60)


def test_gateway_outputs_equal_the_grpc_path(cluster):
    client = _openai(cluster)
    model = cluster.config.model.name
    messages = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name a colour."}]
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    chat_text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    completion = client.completions.create(model=model, prompt="The quick brown fox", max_tokens=8, temperature=0)
    with Client(cluster.address, timeout=60) as grpc_client:
        # The tiny model has no chat template: the gateway used the documented role-prefixed format.
        prompt = ChatFormatter.from_model_dir(cluster.config.model.path).render(messages)
        assert prompt == "System: You are brief.\nUser: Name a colour.\nAssistant:"
        assert chat_text == grpc_client.generate_text(prompt, max_tokens=8, temperature=0.0, ignore_eos=True)
        assert completion.choices[0].text == grpc_client.generate_text("The quick brown fox", max_tokens=8)
    assert chunks[-1].usage.completion_tokens == 8 and chat_text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert completion.usage.completion_tokens >= 1 and completion.usage.prompt_tokens > 0
    assert [m.id for m in client.models.list().data] == [model]


def test_gateway_bad_request_is_a_400_in_openai_shape(cluster):
    client = _openai(cluster)
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=cluster.config.model.name, prompt="x", max_tokens=4, temperature=-1)
    assert error.value.status_code == 400
    assert set(error.value.body) == {"message", "type", "param", "code"}
    assert "temperature" in error.value.body["message"] and error.value.body["type"] == "invalid_request_error"
