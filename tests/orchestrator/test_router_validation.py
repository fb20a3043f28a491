"""Bad requests are refused with INVALID_ARGUMENT naming the field, before the backend sees them."""

import grpc
import pytest
from router_harness import RunningRouter, wait_until

from orchestrator.client import Client, PdclusterError
from orchestrator.fake_backend import DEFAULT_MODEL_INFO

CONTEXT = DEFAULT_MODEL_INFO.max_context_len  # 256
VOCAB = DEFAULT_MODEL_INFO.vocab_size  # 258


@pytest.fixture(scope="module")
def router():
    with RunningRouter() as running:
        yield running


@pytest.fixture(scope="module")
def client(router):
    with Client(router.address, timeout=10) as client:
        yield client


BAD_REQUESTS = [
    # (what, generate arguments, the field the message must start with)
    ("empty prompt", dict(prompt=""), "prompt"),
    ("no prompt at all", dict(), "prompt"),
    ("prompt and token_ids", dict(prompt="hi", token_ids=[1, 2]), "prompt"),
    ("prompt fills the context", dict(prompt="x" * CONTEXT), "prompt"),
    ("token_ids fill the context", dict(token_ids=[65] * CONTEXT), "token_ids"),
    ("token id past the vocabulary", dict(token_ids=[65, VOCAB]), "token_ids[1]"),
    ("negative token id", dict(token_ids=[-1]), "token_ids[0]"),
    ("max_tokens zero", dict(prompt="hi", max_tokens=0), "sampling.max_tokens"),
    ("max_tokens negative", dict(prompt="hi", max_tokens=-5), "sampling.max_tokens"),
    ("prompt + max_tokens past the context", dict(prompt="x" * 200, max_tokens=100), "sampling.max_tokens"),
    ("negative temperature", dict(prompt="hi", temperature=-0.5), "sampling.temperature"),
    ("NaN temperature", dict(prompt="hi", temperature=float("nan")), "sampling.temperature"),
    ("infinite temperature", dict(prompt="hi", temperature=float("inf")), "sampling.temperature"),
    ("top_p zero", dict(prompt="hi", top_p=0.0), "sampling.top_p"),
    ("top_p above one", dict(prompt="hi", top_p=1.5), "sampling.top_p"),
    ("top_p NaN", dict(prompt="hi", top_p=float("nan")), "sampling.top_p"),
    ("negative top_k", dict(prompt="hi", top_k=-1), "sampling.top_k"),
    ("negative seed", dict(prompt="hi", seed=-1), "sampling.seed"),
    ("empty stop string", dict(prompt="hi", stop=["ok", ""]), "sampling.stop[1]"),
    ("stop token past the vocabulary", dict(prompt="hi", stop_token_ids=[3, 999]), "sampling.stop_token_ids[1]"),
    ("request_id too long", dict(prompt="hi", request_id="r" * 129), "request_id"),
]


@pytest.mark.parametrize("arguments, field", [case[1:] for case in BAD_REQUESTS], ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_is_invalid_argument_naming_the_field(router, client, arguments, field):
    num_specs_before = len(router.backend.specs)
    with pytest.raises(PdclusterError) as caught:
        list(client.generate(**arguments))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.message.startswith(f"{field}: "), caught.value.message
    assert len(router.backend.specs) == num_specs_before, "an invalid request reached the backend"
    wait_until(lambda: router.server.num_inflight == 0, what="the refused call to leave the in-flight set")


def test_the_largest_valid_request_is_accepted(client):
    chunks = list(client.generate(token_ids=[65] * (CONTEXT - 1), max_tokens=1))
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 1


def test_unset_max_tokens_takes_the_room_left_in_the_context(router, client):
    chunks = list(client.generate(token_ids=[65] * (CONTEXT - 3), max_tokens=None, request_id="unset-max"))
    assert chunks[-1].usage.completion_tokens == 3
    assert router.backend.specs[-1].params.max_tokens == 3


def test_sampling_options_reach_the_backend(router, client):
    list(client.generate("hi", max_tokens=2, temperature=0.7, top_p=0.9, top_k=5, seed=11, stop=["zz"],
                         stop_token_ids=[3], ignore_eos=True, request_id="options"))
    spec = router.backend.specs[-1]
    assert spec.request_id == "options"
    assert spec.prompt_token_ids == list(b"hi")
    assert (spec.params.max_tokens, spec.params.top_k, spec.params.seed) == (2, 5, 11)
    assert spec.params.temperature == pytest.approx(0.7) and spec.params.top_p == pytest.approx(0.9)
    assert spec.params.stop_token_ids == (3,) and spec.params.ignore_eos
    assert spec.stop == ("zz",)
    assert spec.deadline is not None  # the client's timeout became the spec's deadline


def test_router_prompt_limit_names_the_prompt():
    with RunningRouter(max_prompt_tokens=4) as router, Client(router.address) as client:
        with pytest.raises(PdclusterError) as caught:
            list(client.generate("hello"))
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.message.startswith("prompt: 5 tokens exceed the router's limit of 4")
        assert client.generate_text("hell", max_tokens=1) == "h"
