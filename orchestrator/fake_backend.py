"""An in-process Backend for router and client tests: no Ray, no model, deterministic tokens.

By default it echoes the prompt: output token i is prompt_token_ids[i % len(prompt)], so a test that sends
"hello " reads back "hello hello hello ...". It honours max_tokens, stop_token_ids, eos (unless ignore_eos)
and the deadline, and keeps a ledger of open, finished and cancelled requests so tests can check that
cancellation reached the backend and freed the request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import grpc

from orchestrator.backend import BackendError, FinishEvent, ModelInfo, RequestSpec, Timings, TokenEvent

DEFAULT_MODEL_INFO = ModelInfo(model_name="fake-model", vocab_size=258, max_context_len=256, eos_token_ids=(257,))
PREFILL_REPLICA = "fake-prefill-0"
DECODE_REPLICA = "fake-decode-0"


def echo_prompt(spec: RequestSpec, index: int) -> int:
    return spec.prompt_token_ids[index % len(spec.prompt_token_ids)]


class FakeBackend:
    """Backend whose token i of a request is `next_token(spec, i)`, one event per token."""

    def __init__(
        self,
        *,
        model_info: ModelInfo = DEFAULT_MODEL_INFO,
        next_token: Callable[[RequestSpec, int], int] = echo_prompt,
        token_delay_s: float = 0.0,
        fail_after_tokens: int | None = None,
        failure: Exception | None = None,
    ) -> None:
        """fail_after_tokens: raise `failure` (default BackendError UNAVAILABLE) after that many tokens."""
        if token_delay_s < 0:
            raise ValueError(f"token_delay_s must be >= 0, got {token_delay_s}")
        self._model_info = model_info
        self._next_token = next_token
        self.token_delay_s = token_delay_s
        self.fail_after_tokens = fail_after_tokens
        self.failure = failure or BackendError(grpc.StatusCode.UNAVAILABLE, "fake replica died")
        self.open_request_ids: set[str] = set()
        self.finished_request_ids: list[str] = []
        self.cancelled_request_ids: list[str] = []  # closed or cancelled before finishing
        self.failed_request_ids: list[str] = []
        self.specs: list[RequestSpec] = []  # every spec received, in order

    @property
    def model_info(self) -> ModelInfo:
        return self._model_info

    @property
    def num_open_requests(self) -> int:
        return len(self.open_request_ids)

    async def generate(self, spec: RequestSpec) -> AsyncIterator[TokenEvent | FinishEvent]:
        self.specs.append(spec)
        self.open_request_ids.add(spec.request_id)
        start_time = time.perf_counter()
        outcome = self.cancelled_request_ids  # unless it finishes or fails below
        try:
            stop_ids = set(spec.params.stop_token_ids)
            if not spec.params.ignore_eos:
                stop_ids.update(self._model_info.eos_token_ids)
            finish_reason = "length"
            for index in range(spec.params.max_tokens):
                if spec.deadline is not None and time.time() > spec.deadline:
                    raise BackendError(grpc.StatusCode.DEADLINE_EXCEEDED, "fake backend: deadline passed")
                if self.fail_after_tokens is not None and index >= self.fail_after_tokens:
                    raise self.failure
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                token = self._next_token(spec, index)
                is_first = index == 0
                yield TokenEvent(
                    [token],
                    prefill_replica=PREFILL_REPLICA if is_first else "",
                    decode_replica=DECODE_REPLICA if is_first else "",
                    timings=Timings(prefill_s=time.perf_counter() - start_time) if is_first else None,
                )
                if token in stop_ids:
                    finish_reason = "stop"
                    break
            # The work is done once the finish event is built, even if the router never pulls past it.
            outcome = self.finished_request_ids
            yield FinishEvent(
                finish_reason=finish_reason,
                timings=Timings(prefill_s=0.001, kv_transfer_s=0.0005, kv_bytes=1024 * len(spec.prompt_token_ids)),
                prefill_replica=PREFILL_REPLICA,
                decode_replica=DECODE_REPLICA,
            )
        except Exception:
            outcome = self.failed_request_ids
            raise
        finally:
            # Reached by completion, failure, aclose() (GeneratorExit) or task cancellation (CancelledError).
            self.open_request_ids.discard(spec.request_id)
            outcome.append(spec.request_id)

    async def status(self) -> dict:
        def replica(replica_id: str, num_running: int, num_free_blocks: int) -> dict:
            return {
                "id": replica_id,
                "state": "ready",
                "node": "127.0.0.1",
                "accelerator": "cpu",
                "mesh": {"tp": 1, "cp": 1, "pp": 1, "ep": 1},
                "load": {"num_queued": 0, "num_running": num_running},
                "kv_blocks": {"num_free": num_free_blocks, "num_total": 64},
            }

        num_open = self.num_open_requests
        return {
            "model": self._model_info.model_name,
            "prefill": [replica(PREFILL_REPLICA, 0, 64)],
            "decode": [replica(DECODE_REPLICA, num_open, max(0, 64 - num_open))],
        }
