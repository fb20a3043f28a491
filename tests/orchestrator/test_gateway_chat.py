"""Chat prompt rendering: the model's own template when tokenizer_config.json has one, else the documented format."""

from __future__ import annotations

import json

import pytest

from orchestrator.gateway_chat import ChatFormatter
from orchestrator.gateway_protocol import GatewayError, parse_common, parse_completion

# A trimmed template in the style of Hugging Face chat templates (bos, role markers, generation prompt, a refusal).
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' and loop.first %}{{ raise_exception('first message must not be assistant') }}{% endif %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _model_dir(tmp_path, config: dict):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_template_from_tokenizer_config_is_rendered_without_a_second_bos(tmp_path):
    formatter = ChatFormatter.from_model_dir(_model_dir(tmp_path, {
        "chat_template": TEMPLATE, "bos_token": {"content": "<s>"}, "eos_token": "</s>"}))
    assert formatter.has_template
    text = formatter.render([{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}])
    # The router's tokenizer adds bos itself, so the rendered text must not start with it.
    assert text == "<|system|>\nS</s>\n<|user|>\nHi</s>\n<|assistant|>\n"


def test_named_template_list_uses_default(tmp_path):
    formatter = ChatFormatter.from_model_dir(_model_dir(tmp_path, {
        "chat_template": [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "D{{ messages|length }}"}]}))
    assert formatter.render([{"role": "user", "content": "x"}]) == "D1"


def test_template_refusal_and_errors_are_400s(tmp_path):
    formatter = ChatFormatter.from_model_dir(_model_dir(tmp_path, {"chat_template": TEMPLATE, "bos_token": "<s>"}))
    with pytest.raises(GatewayError) as error:
        formatter.render([{"role": "assistant", "content": "x"}])
    assert error.value.status == 400 and "must not be assistant" in error.value.message
    sandboxed = ChatFormatter("{{ messages.__class__.__mro__ }}")
    with pytest.raises(GatewayError) as error:  # the sandbox refuses attribute tricks
        sandboxed.render([{"role": "user", "content": "x"}])
    assert error.value.status == 400


def test_without_template_the_role_prefixed_format(tmp_path):
    assert not ChatFormatter.from_model_dir(tmp_path).has_template  # no tokenizer_config.json
    assert not ChatFormatter.from_model_dir(_model_dir(tmp_path, {"bos_token": "<s>"})).has_template
    messages = [{"role": "developer", "content": "Rules"}, {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A"}, {"role": "user", "content": None}]
    assert ChatFormatter().render(messages) == "System: Rules\nUser: Q\nAssistant: A\nUser: \nAssistant:"


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ("hi", "messages"),
    ([{"role": "tool", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
])
def test_bad_messages_name_the_field(messages, param):
    with pytest.raises(GatewayError) as error:
        ChatFormatter().render(messages)
    assert error.value.status == 400 and error.value.param == param


def test_request_parsing_maps_openai_fields():
    call = parse_completion({"model": "m", "prompt": ["only one"], "max_tokens": 5, "temperature": 0, "top_p": 0.5,
                             "seed": 3, "stop": "\n", "stream": True, "stream_options": {"include_usage": True},
                             "presence_penalty": 0, "user": "ignored"}, "m")
    assert call.prompt == "only one" and call.token_ids is None and call.is_stream and call.include_usage
    assert call.options == {"max_tokens": 5, "temperature": 0.0, "top_p": 0.5, "top_k": 0, "seed": 3, "stop": ["\n"],
                            "stop_token_ids": [], "ignore_eos": False}
    defaults = parse_completion({"prompt": [[1, 2, 3]]}, "m")
    assert defaults.token_ids == [1, 2, 3] and defaults.options["max_tokens"] == 16
    assert defaults.options["temperature"] == 1.0  # OpenAI's default
    chat = parse_common({"max_completion_tokens": 7, "max_tokens": 99}, "m", default_max_tokens=None)
    assert chat.options["max_tokens"] == 7
    assert parse_common({}, "m", default_max_tokens=None).options["max_tokens"] is None


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "n": 3}, "n"),
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "stop": [1]}, "stop"),
    ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"prompt": 7}, "prompt"),
    ({"prompt": []}, "prompt"),
])
def test_request_parsing_refuses_with_the_field_named(body, param):
    with pytest.raises(GatewayError) as error:
        parse_completion(body, "m")
    assert error.value.status == 400 and error.value.param == param
