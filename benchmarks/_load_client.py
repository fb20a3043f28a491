"""The load generator of benchmarks/load.py: many concurrent Generate streams through the asyncio client SDK.

Who calls it: benchmarks/load.py submits these functions to a separate process, so that the clients' own work
does not share the router's interpreter (the router runs in the benchmark's main process, like `pdcluster serve`):
what is measured as router time is then the router's, not the load generator's. Imports only the client SDK
(grpcio + protobuf), never torch or Ray. Each function returns plain dicts (picklable).
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass

import grpc

from orchestrator.client import AsyncClient, PdclusterError


@dataclass(frozen=True, kw_only=True)
class StreamSpec:
    """What every stream of a phase asks for."""

    prompt_template: str  # formatted with i= the stream's index
    max_tokens: int
    ignore_eos: bool = True  # random weights: without it, an early eos would make the work per stream uneven

    def prompt(self, index: int) -> str:
        return self.prompt_template.format(i=index)


async def _one_stream(client: AsyncClient, spec: StreamSpec, index: int) -> dict:
    """One request to its end. Returns {"code", "message", "num_chunks", "completion_tokens", "finish_reason",
    "timings" (the router's final-message figures, ms), "client_e2e_ms", "client_ttft_ms"}."""
    started = time.perf_counter()
    first_at = None
    num_chunks = 0
    last = None
    try:
        async for chunk in client.generate(spec.prompt(index), max_tokens=spec.max_tokens, temperature=0.0,
                                           ignore_eos=spec.ignore_eos):
            num_chunks += 1
            if first_at is None and chunk.token_ids:
                first_at = time.perf_counter()
            last = chunk
        code, message = "OK", ""
    except PdclusterError as error:
        code, message = error.code.name, error.message
    except grpc.RpcError as error:  # the SDK wraps these; kept so a stray one is counted, not raised
        code, message = error.code().name, str(error.details())
    ended = time.perf_counter()
    result = {"index": index, "code": code, "message": message, "num_chunks": num_chunks,
              "client_e2e_ms": (ended - started) * 1e3,
              "client_ttft_ms": (first_at - started) * 1e3 if first_at is not None else None,
              "finish_reason": None, "completion_tokens": 0, "prompt_tokens": 0, "timings": None}
    if code == "OK":
        if last is None or not last.is_last:
            result["code"] = "NO_FINAL_MESSAGE"  # the stream ended without its final message: a failure too
        else:
            result.update(finish_reason=last.finish_reason, completion_tokens=last.usage.completion_tokens,
                          prompt_tokens=last.usage.prompt_tokens, timings=dict(last.timings))
    return result


async def _report_progress(phase: str, results: list, total: int | None, every_s: float,
                           started: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        done = len(results)
        failed = sum(1 for r in results if r["code"] != "OK")
        of_total = f"/{total}" if total is not None else ""
        print(f"[{phase} {time.monotonic() - started:7.1f} s] {done}{of_total} streams done, {failed} failed",
              file=sys.stderr, flush=True)


def run_streams(address: str, spec: StreamSpec, num_streams: int, *, timeout_s: float | None,
                progress_every_s: float = 5.0, phase: str = "streams") -> dict:
    """Open `num_streams` streams at once (one channel, like one busy application) and wait for all of them.
    Returns {"wall_s", "results": [per-stream dicts in index order]}."""
    async def main() -> dict:
        results: list[dict] = []
        started = time.monotonic()
        client = AsyncClient(address, timeout=timeout_s)
        reporter = asyncio.create_task(_report_progress(phase, results, num_streams, progress_every_s, started))

        async def tracked(index: int) -> dict:
            result = await _one_stream(client, spec, index)
            results.append(result)
            return result

        try:
            ordered = await asyncio.gather(*(tracked(i) for i in range(num_streams)))
        finally:
            reporter.cancel()
            await client.close()
        return {"wall_s": time.monotonic() - started, "results": list(ordered)}

    return asyncio.run(main())


def run_closed_loop(address: str, spec: StreamSpec, *, concurrency: int, duration_s: float | None = None,
                    num_requests: int | None = None, timeout_s: float | None, progress_every_s: float = 15.0,
                    phase: str = "soak") -> dict:
    """`concurrency` workers, each sending its next request as soon as the previous one ended, until `duration_s`
    has passed or `num_requests` were sent (requests in flight at the end are finished, not cut). Returns
    {"wall_s", "results": [per-request dicts in completion order]}."""
    if duration_s is None and num_requests is None:
        raise ValueError("run_closed_loop needs duration_s or num_requests")

    async def main() -> dict:
        results: list[dict] = []
        started = time.monotonic()
        end = started + duration_s if duration_s is not None else float("inf")
        client = AsyncClient(address, timeout=timeout_s)
        reporter = asyncio.create_task(_report_progress(phase, results, num_requests, progress_every_s, started))
        next_index = 0

        async def worker() -> None:
            nonlocal next_index
            while time.monotonic() < end and (num_requests is None or next_index < num_requests):
                index, next_index = next_index, next_index + 1
                results.append(await _one_stream(client, spec, index))

        try:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        finally:
            reporter.cancel()
            await client.close()
        return {"wall_s": time.monotonic() - started, "results": results}

    return asyncio.run(main())
