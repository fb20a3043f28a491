"""Helpers for the fault tests (tests/e2e/test_faults*.py): find and SIGKILL rank processes, hold a request's KV
transfer open, wait for the router to bring replicas back, and the stream-end bound every fault must respect."""

from __future__ import annotations

import os
import signal
import threading
import time

import ray

from orchestrator.client import Client


def stream_bound_s(config, margin_s: float = 30.0) -> float:
    """How long a client stream may take when a replica dies under it: each attempt gives up after
    router.replica_timeout_s without progress, there are max_retries + 1 attempts, plus a margin for generating
    the tokens on a loaded 2-core machine. A hang (minutes) exceeds it."""
    return (config.router.max_retries + 1) * config.router.replica_timeout_s + margin_s


def pid_of(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)


def sigkill(actor) -> int:
    pid = pid_of(actor)
    os.kill(pid, signal.SIGKILL)
    return pid


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def replica(cluster, replica_id):
    return next(h for tier in ("prefill", "decode") for h in cluster.deployment.replicas(tier)
                if h.replica_id == replica_id)


def status_of(cluster, replica_id) -> dict:
    status = cluster.status()
    return next(r for tier in ("prefill", "decode") for r in status[tier] if r["id"] == replica_id)


def back_in_rotation(cluster, replica_id, *, min_restarts: int = 1, timeout_s: float = 90):
    def check():
        entry = status_of(cluster, replica_id)
        return entry if entry["state"] == "ready" and entry["restarts"] >= min_restarts else None
    return wait_for(check, timeout_s, f"{replica_id} to be restarted and back in rotation")


def all_blocks_free(cluster, timeout_s: float = 30):
    """Every decode replica's pool full again, and no reservation waiting for KV anywhere."""
    def check():
        decode = cluster.status()["decode"]
        return all(r["state"] == "ready" and r["kv_blocks"]["num_free"] == r["kv_blocks"]["num_total"]
                   and r["load"]["num_queued"] == 0 for r in decode)
    wait_for(check, timeout_s, "every decode replica's KV pool to be full with no reservation left")


def hold_kv_transfers(prefill_actor, delay_s: float) -> None:
    """Test-only: on a one-rank prefill replica, hold every layer's KV push but the first for delay_s (0: undo), so a
    request's transfer stays in flight long enough to kill a rank in the middle of it. Counts the held pushes in
    the replica's `_num_held_pushes` (see num_held_pushes)."""
    def patch(replica):
        import asyncio

        sender = replica._core.sender
        original = sender.__dict__.get("_unheld_push_layer") or sender.push_layer
        sender._unheld_push_layer = original
        replica._num_held_pushes = 0
        if not delay_s:
            sender.push_layer = original
            return

        async def push_layer(info, layer, k, v):
            if layer > 0:  # layer 0 lands; the rest is in flight while the test kills something
                replica._num_held_pushes += 1
                await asyncio.sleep(delay_s)
            await original(info, layer, k, v)

        sender.push_layer = push_layer

    ray.get(prefill_actor.__ray_call__.remote(patch), timeout=30)


def num_held_pushes(prefill_actor) -> int:
    return ray.get(prefill_actor.__ray_call__.remote(lambda r: getattr(r, "_num_held_pushes", 0)), timeout=10)


class BackgroundStream:
    """One Generate call on its own thread: tokens, last chunk, error and how long it took."""

    def __init__(self, address: str, prompt: list[int], max_tokens: int, **client_options):
        self.tokens: list[int] = []
        self.last = None
        self.error: Exception | None = None
        self.elapsed_s: float | None = None
        self.first_chunk = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(address, prompt, max_tokens, client_options),
                                        daemon=True)
        self._thread.start()

    def _run(self, address, prompt, max_tokens, client_options) -> None:
        started = time.monotonic()
        try:
            with Client(address, **client_options) as client:
                for chunk in client.generate(token_ids=prompt, max_tokens=max_tokens, ignore_eos=True):
                    self.tokens.extend(chunk.token_ids)
                    self.last = chunk
                    self.first_chunk.set()
        except Exception as exc:  # reported by the test's assertions
            self.error = exc
        finally:
            self.elapsed_s = time.monotonic() - started
            self.first_chunk.set()

    def join(self, timeout_s: float) -> "BackgroundStream":
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"the stream did not end within {timeout_s:.0f} s"
        return self


def stall_decode_steps(decode_actor, is_stalled: bool) -> None:
    """Test-only: hold (True) or release (False) every engine step of a decode replica, so it stays alive and answers
    its health check but makes no progress on any stream (a hung replica, not a dead one)."""
    def patch(replica):
        import threading

        if is_stalled:
            gate = threading.Event()
            original = replica._engine.step

            def step():
                gate.wait()
                return original()

            replica._stall = (gate, original)
            replica._engine.step = step
        elif getattr(replica, "_stall", None) is not None:
            gate, original = replica._stall
            replica._engine.step = original
            gate.set()
            replica._stall = None

    ray.get(decode_actor.__ray_call__.remote(patch), timeout=30)
