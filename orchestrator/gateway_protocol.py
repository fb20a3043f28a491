"""The OpenAI HTTP API's shapes, for the gateway (orchestrator/gateway.py): request bodies -> generate() arguments,
results -> response bodies and stream chunks, errors -> OpenAI's error body and an HTTP status.

Pure functions and plain data (no I/O), unit-tested on their own. The gateway checks shapes and types only; value
ranges (temperature, top_p, max_tokens against the context, ...) are the router's to check, and its
INVALID_ARGUMENT message reaches the caller unchanged in a 400.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import grpc

# gRPC status of the router -> (HTTP status, OpenAI error type, OpenAI error code)
_HTTP_BY_GRPC = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", None),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error", None),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error", "request_id_in_flight"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error", "timeout"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error", None),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", None),
}
# Fields of OpenAI's API that this server cannot honour: a request that sets them to anything but the neutral
# value is refused (400 naming the field) rather than silently answered differently.
_NEUTRAL_VALUES = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
}
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat leaves it to the router


class GatewayError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def from_grpc(cls, code: grpc.StatusCode, message: str) -> "GatewayError":
        status, error_type, error_code = _HTTP_BY_GRPC.get(code, (500, "server_error", None))
        return cls(status, message, type=error_type, code=error_code)


def bad_request(param: str, message: str) -> GatewayError:
    return GatewayError(400, f"{param}: {message}", param=param)


@dataclass(frozen=True, kw_only=True)
class GenerateCall:
    """A parsed OpenAI request: the arguments for AsyncClient.generate and how to answer."""

    prompt: str | None = None
    token_ids: list[int] | None = None
    options: dict = field(default_factory=dict)  # max_tokens, temperature, top_p, top_k, seed, stop, ...
    is_stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with usage and no choices


def parse_common(body: dict, served_model: str, *, default_max_tokens: int | None) -> GenerateCall:
    """The fields /v1/completions and /v1/chat/completions share (no prompt yet)."""
    if not isinstance(body, dict):
        raise GatewayError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != served_model:
        raise GatewayError(404, f"The model '{model}' does not exist; this server serves '{served_model}'",
                           param="model", code="model_not_found")
    for name, neutral in _NEUTRAL_VALUES.items():
        if name in body and body[name] not in neutral:
            raise bad_request(name, "not supported by this server")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise bad_request("response_format", "only {\"type\": \"text\"} is supported")
    n = body.get("n")
    if n is not None and (_not_int(n) or n != 1):
        raise bad_request("n", f"only n=1 is supported, got {n!r}")
    # Chat's newer name wins; None lets the router choose (as many as the context allows).
    max_tokens_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(max_tokens_key)
    options = {
        "max_tokens": default_max_tokens if max_tokens is None else _optional_int(max_tokens_key, max_tokens),
        "temperature": _number(body, "temperature", 1.0),  # OpenAI's default: sampling, not greedy
        "top_p": _number(body, "top_p", 1.0),
        "top_k": _optional_int("top_k", body.get("top_k")) or 0,  # extension (as vLLM names it)
        "seed": _optional_int("seed", body.get("seed")),
        "stop": _stop(body.get("stop")),
        "stop_token_ids": _int_list(body, "stop_token_ids"),  # extension
        "ignore_eos": _flag(body, "ignore_eos"),  # extension
    }
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise bad_request("stream_options", "expected an object")
    return GenerateCall(options=options, is_stream=_flag(body, "stream"),
                        include_usage=bool(stream_options.get("include_usage", False)))


def parse_completion(body: dict, served_model: str) -> GenerateCall:
    call = parse_common(body, served_model, default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return dataclasses.replace(call, prompt=prompt)
    if isinstance(prompt, list) and prompt and all(not _not_int(t) for t in prompt):
        return dataclasses.replace(call, token_ids=list(prompt))
    if isinstance(prompt, list) and len(prompt) > 1:
        raise bad_request("prompt", "batched prompts are not supported; send one prompt per request")
    raise bad_request("prompt", "expected a string or a list of token ids")


def _not_int(value) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


def _optional_int(name: str, value) -> int | None:
    if value is None:
        return None
    if _not_int(value):
        raise bad_request(name, f"expected an integer, got {value!r}")
    return value


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(name, f"expected a number, got {value!r}")
    return float(value)


def _flag(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(name, f"expected true or false, got {value!r}")
    return value


def _int_list(body: dict, name: str) -> list[int]:
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or any(_not_int(v) for v in value):
        raise bad_request(name, "expected a list of integers")
    return value


def _stop(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise bad_request("stop", "expected a string or a list of strings")


# finish_reason: "stop" and "length" as OpenAI's; "cancelled" and "error" have no counterpart and pass through.


def usage_body(usage) -> dict:
    prompt_tokens, completion_tokens = usage.prompt_tokens, usage.completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(response_id: str, model: str, text: str, last) -> dict:
    return {
        "id": response_id, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}],
        "usage": usage_body(last.usage),
    }


def completion_chunk(response_id: str, model: str, created: int, text: str, reason: str | None) -> dict:
    return {"id": response_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}


def chat_body(response_id: str, model: str, text: str, last) -> dict:
    return {
        "id": response_id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": last.finish_reason}],
        "usage": usage_body(last.usage),
    }


def chat_chunk(response_id: str, model: str, created: int, delta: dict, reason: str | None) -> dict:
    return {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}


def usage_chunk(response_id: str, model: str, created: int, object_name: str, usage) -> dict:
    return {"id": response_id, "object": object_name, "created": created, "model": model, "choices": [],
            "usage": usage_body(usage)}


def models_body(model: str, created: int, max_context_len: int | None) -> dict:
    entry = {"id": model, "object": "model", "created": created, "owned_by": "pdcluster"}
    if max_context_len:
        entry["max_model_len"] = max_context_len
    return {"object": "list", "data": [entry]}
