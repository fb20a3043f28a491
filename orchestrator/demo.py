"""`pdcluster demo`: the whole request path on the default cluster, shown to a person.

Starts the cluster, sends a few prompts concurrently through the client SDK over real gRPC, prints each streamed
completion and its figures (TTFT, TPOT, KV bytes shipped from prefill to decode, replicas), then shuts down.
"""

from __future__ import annotations

import sys
import threading
import time

from orchestrator.client import Client
from orchestrator.config import ClusterConfig
from orchestrator.serve import RunningCluster

PROMPTS = [
    "The quick brown fox",
    "Disaggregated serving splits prefill and decode because",
    "Once upon a time, in a cluster far away,",
    "KV caches travel from prefill to decode over UCX:",
    "Hello",
    "A very long prompt makes the prefill tier work harder than the decode tier: " * 3,
]


def run_demo(config: ClusterConfig, *, num_requests: int = 4, max_tokens: int = 32, out=sys.stdout) -> int:
    print("pdcluster demo: starting a local cluster (1 prefill replica, 1 decode replica, gRPC router) ...",
          file=out, flush=True)
    started = time.monotonic()
    with RunningCluster(config) as cluster:
        print(f"pdcluster demo: cluster up in {time.monotonic() - started:.1f} s at {cluster.address}", file=out)
        print("pdcluster demo: NOTE the default model has random weights, so the text is gibberish; the point is "
              "the path it takes (router -> prefill -> KV over UCX -> decode -> router). Greedy, ignore_eos, "
              f"{max_tokens} tokens each.\n", file=out, flush=True)
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(num_requests)]
        results: list[dict | None] = [None] * num_requests
        errors: list[str] = []

        def one(index: int) -> None:
            try:
                with Client(cluster.address) as client:
                    text, last = "", None
                    for chunk in client.generate(prompts[index], max_tokens=max_tokens, temperature=0.0,
                                                 ignore_eos=True):
                        text += chunk.text
                        last = chunk
                    results[index] = {"text": text, "last": last}
            except Exception as exc:  # shown, and the demo exits non-zero
                errors.append(f"request {index}: {exc}")

        threads = [threading.Thread(target=one, args=(i,)) for i in range(num_requests)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        header = f"{'#':>2} {'prompt':>6} {'output':>6} {'finish':>7} {'TTFT ms':>8} {'TPOT ms':>8} {'KV bytes':>9}  replicas"
        for index, result in enumerate(results):
            if result is None:
                continue
            print(f"[{index}] {prompts[index][:60]!r} -> {result['text']!r}", file=out)
        print("\n" + header, file=out)
        for index, result in enumerate(results):
            if result is None:
                continue
            last = result["last"]
            t = last.timings
            print(f"{index:>2} {last.usage['prompt_tokens']:>6} {last.usage['completion_tokens']:>6} "
                  f"{last.finish_reason:>7} {t['ttft_ms']:>8.1f} {t['tpot_ms']:>8.1f} {int(t['kv_bytes']):>9}  "
                  f"{last.prefill_replica} -> {last.decode_replica}", file=out)
        status = cluster.status()
        for replica in status["decode"]:
            blocks = replica["kv_blocks"]
            print(f"\n{replica['id']}: KV blocks free {blocks['num_free']}/{blocks['num_total']} after the demo",
                  file=out)
    for error in errors:
        print(f"pdcluster demo: FAILED {error}", file=out)
    print("pdcluster demo: cluster stopped" + ("" if not errors else f"; {len(errors)} request(s) failed"), file=out)
    return 1 if errors else 0
