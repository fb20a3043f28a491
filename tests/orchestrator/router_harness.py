"""A router over the fake backend, served from a background event loop, for client and router tests.

The test thread stays free to use the blocking Client; `RunningRouter.call` runs a coroutine on the router's loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

from mesh.tokenizer import ByteTokenizer
from orchestrator.fake_backend import DEFAULT_MODEL_INFO, FakeBackend
from orchestrator.router import build_server


def byte_tokenizer() -> ByteTokenizer:
    return ByteTokenizer(eos_token_ids=DEFAULT_MODEL_INFO.eos_token_ids)


class RunningRouter:
    def __init__(self, backend: FakeBackend | None = None, *, port: int = 0, max_inflight: int = 8,
                 max_message_bytes: int = 64 * 1024, max_prompt_tokens: int | None = None,
                 **server_options) -> None:
        self.backend = backend or FakeBackend()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-router", daemon=True)
        self._thread.start()
        self.server = build_server(self.backend, byte_tokenizer(), host="127.0.0.1", port=port,
                                   max_inflight=max_inflight, max_message_bytes=max_message_bytes,
                                   max_prompt_tokens=max_prompt_tokens, **server_options)
        try:
            self.port = self.call(self.server.start())
        except BaseException:
            self._stop_loop()
            raise
        self.address = f"127.0.0.1:{self.port}"

    def call(self, coro, timeout_s: float = 10.0):
        return self.submit(coro).result(timeout_s)

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def close(self) -> None:
        try:
            self.call(self.server.stop(0))
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> RunningRouter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def wait_until(predicate, timeout_s: float = 5.0, what: str = "condition") -> None:
    """Polls predicate (cheap, thread-safe reads only) until true; fails the test after timeout_s."""
    end = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.01)
