"""Checks one GenerateRequest against the served model, before anything is queued.

Called by the router in two steps: `parse_request` on the raw message (cheap, before admission and
tokenization), then `check_prompt` and `sampling_params` once the prompt is tokens. Every failure raises
`RequestValidationError` whose message starts with the offending field's name, as the client sent it
(`prompt`, `token_ids`, `sampling.top_p`, `sampling.stop[1]`, ...); the router returns it as INVALID_ARGUMENT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mesh.sampling import SamplingParams
from orchestrator.backend import ModelInfo
from protos import generation_pb2

DEFAULT_MAX_TOKENS = 64  # when the client leaves max_tokens unset (clamped to the room left in the context)
MAX_REQUEST_ID_CHARS = 128


class RequestValidationError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True, kw_only=True)
class ParsedRequest:
    """The request's fields, checked on their own; exactly one of prompt and token_ids is set."""

    request_id: str  # "" when the client chose none
    prompt: str | None
    token_ids: list[int] | None
    max_tokens: int | None  # None: unset, take the default
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    ignore_eos: bool

    @property
    def prompt_field(self) -> str:
        return "prompt" if self.prompt is not None else "token_ids"


def parse_request(request: generation_pb2.GenerateRequest, model_info: ModelInfo) -> ParsedRequest:
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise RequestValidationError("request_id", f"is {len(request.request_id)} characters; at most {MAX_REQUEST_ID_CHARS}")
    has_prompt = bool(request.prompt)
    has_token_ids = len(request.token_ids) > 0
    if has_prompt and has_token_ids:
        raise RequestValidationError("prompt", "prompt and token_ids are both set; set exactly one of them")
    if not has_prompt and not has_token_ids:
        raise RequestValidationError("prompt", "empty: set prompt (text) or token_ids")
    token_ids = list(request.token_ids) if has_token_ids else None
    if token_ids is not None:
        _check_token_range("token_ids", token_ids, model_info.vocab_size)

    sampling = request.sampling
    max_tokens = sampling.max_tokens if sampling.HasField("max_tokens") else None
    if max_tokens is not None and max_tokens <= 0:
        raise RequestValidationError("sampling.max_tokens", f"must be > 0, got {max_tokens}")
    temperature = sampling.temperature
    if math.isnan(temperature) or temperature < 0 or math.isinf(temperature):
        raise RequestValidationError("sampling.temperature", f"must be a finite number >= 0 (0 = greedy), got {temperature}")
    top_p = sampling.top_p if sampling.HasField("top_p") else 1.0
    if not 0.0 < top_p <= 1.0:  # also rejects NaN
        raise RequestValidationError("sampling.top_p", f"must be in (0, 1], got {top_p}")
    if sampling.top_k < 0:
        raise RequestValidationError("sampling.top_k", f"must be >= 0 (0 = off), got {sampling.top_k}")
    seed = sampling.seed if sampling.HasField("seed") else None
    if seed is not None and seed < 0:
        raise RequestValidationError("sampling.seed", f"must be >= 0, got {seed}")
    for index, stop in enumerate(sampling.stop):
        if not stop:
            raise RequestValidationError(f"sampling.stop[{index}]", "is empty; stop strings must have at least one character")
    stop_token_ids = tuple(sampling.stop_token_ids)
    _check_token_range("sampling.stop_token_ids", stop_token_ids, model_info.vocab_size)

    return ParsedRequest(
        request_id=request.request_id,
        prompt=request.prompt if has_prompt else None,
        token_ids=token_ids,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=sampling.top_k,
        seed=seed,
        stop=tuple(sampling.stop),
        stop_token_ids=stop_token_ids,
        ignore_eos=sampling.ignore_eos,
    )


def check_prompt(parsed: ParsedRequest, prompt_token_ids: list[int], model_info: ModelInfo,
                 max_prompt_tokens: int | None) -> None:
    """The tokenized prompt must be non-empty, in the vocabulary and leave room for one output token."""
    field = parsed.prompt_field
    num_tokens = len(prompt_token_ids)
    if num_tokens == 0:
        raise RequestValidationError(field, "tokenizes to no tokens")
    if parsed.prompt is not None:  # the tokenizer's ids: checked in case the tokenizer and model disagree
        _check_token_range(field, prompt_token_ids, model_info.vocab_size)
    if num_tokens + 1 > model_info.max_context_len:
        raise RequestValidationError(
            field,
            f"{num_tokens} tokens do not fit the model context of {model_info.max_context_len} tokens "
            f"(at most {model_info.max_context_len - 1} prompt tokens, leaving room for one output token)",
        )
    if max_prompt_tokens is not None and num_tokens > max_prompt_tokens:
        raise RequestValidationError(field, f"{num_tokens} tokens exceed the router's limit of {max_prompt_tokens} prompt tokens")


def sampling_params(parsed: ParsedRequest, num_prompt_tokens: int, model_info: ModelInfo) -> SamplingParams:
    room = model_info.max_context_len - num_prompt_tokens
    if parsed.max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, room)
    elif parsed.max_tokens > room:
        raise RequestValidationError(
            "sampling.max_tokens",
            f"prompt ({num_prompt_tokens} tokens) + max_tokens ({parsed.max_tokens}) exceeds the model context "
            f"of {model_info.max_context_len} tokens; at most {room} new tokens fit",
        )
    else:
        max_tokens = parsed.max_tokens
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=parsed.temperature,
        top_p=parsed.top_p,
        top_k=parsed.top_k,
        seed=parsed.seed,
        stop_token_ids=parsed.stop_token_ids,
        ignore_eos=parsed.ignore_eos,
    )


def _check_token_range(field: str, token_ids, vocab_size: int) -> None:
    if not token_ids or (min(token_ids) >= 0 and max(token_ids) < vocab_size):  # the common case, fast
        return
    for index, token in enumerate(token_ids):
        if not 0 <= token < vocab_size:
            raise RequestValidationError(f"{field}[{index}]", f"token id {token} is outside the vocabulary [0, {vocab_size})")
