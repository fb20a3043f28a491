"""The open-loop client of benchmarks/goodput.py: each request is sent at its planned arrival time, whatever the
state of the earlier ones (Poisson arrivals do not wait for the server), and timed on the client.

Who calls it: goodput.py, in a separate process (so the clients do not share the router's interpreter). Imports
only the client SDK (grpcio + protobuf). Returns plain dicts (picklable).

Per request: TTFT = first token received - planned arrival (time spent late in this client counts against the
server only when the server made it late, so the send lag is reported apart); TPOT = (last token - first token) /
(tokens - 1).
"""

from __future__ import annotations

import asyncio
import time

from orchestrator.client import AsyncClient, PdclusterError


async def _one(client: AsyncClient, plan, started: float) -> dict:
    index, arrival_s, token_ids, max_tokens = plan
    await asyncio.sleep(max(0.0, started + arrival_s - time.perf_counter()))
    sent = time.perf_counter()
    first = last = None
    num_tokens = 0
    timings = {}
    code, message = "OK", ""
    try:
        async for chunk in client.generate(token_ids=list(token_ids), max_tokens=max_tokens, temperature=0.0,
                                           ignore_eos=True):
            if chunk.is_last:
                timings = dict(chunk.timings or {})  # the router's own figures: queue, prefill, KV transfer (ms)
            if chunk.token_ids:
                now = time.perf_counter()
                first = now if first is None else first
                last = now
                num_tokens += len(chunk.token_ids)
    except PdclusterError as error:
        code, message = error.code.name, error.message
    except Exception as error:  # counted as a failed request, never raised out of the run
        code, message = type(error).__name__, str(error)
    planned = started + arrival_s
    return {
        "index": index, "code": code, "message": message[:200], "input_tokens": len(token_ids),
        "output_tokens": num_tokens, "max_tokens": max_tokens,
        "send_lag_ms": (sent - planned) * 1e3,
        "ttft_ms": (first - planned) * 1e3 if first is not None else None,
        "tpot_ms": (last - first) * 1e3 / (num_tokens - 1) if num_tokens > 1 else None,
        "e2e_ms": ((last or time.perf_counter()) - planned) * 1e3,
        "router": {k: timings[k] for k in ("queue_ms", "prefill_ms", "kv_transfer_ms") if k in timings},
    }


def run_open_loop(address: str, plans: list[tuple], *, timeout_s: float) -> dict:
    """plans: (index, arrival_s, token_ids, max_tokens) tuples. Returns {"wall_s", "results": [per request]}."""
    async def main() -> dict:
        client = AsyncClient(address, timeout=timeout_s, retries=0)
        started = time.perf_counter() + 0.05  # every task is scheduled before the first arrival
        try:
            results = await asyncio.gather(*(_one(client, plan, started) for plan in plans))
        finally:
            await client.close()
        return {"wall_s": time.perf_counter() - started, "results": list(results)}

    return asyncio.run(main())
