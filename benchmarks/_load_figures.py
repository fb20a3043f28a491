"""The figures of benchmarks/load.py, computed from what the load generator returned; its checks and its tables.

Router overhead. The final message of a stream carries the router's own measurements (ttft_ms, e2e_ms, from the
call's arrival at the router's handler) and the prefill replica's (queue_ms: waiting in its batcher; prefill_ms:
the forward of the batch it ran in; kv_transfer_ms: KV shipping not hidden behind that forward). It carries no time
measured by the decode replica, so the overhead this benchmark can state exactly is the one up to the first token:

    router_overhead_ms = ttft_ms - queue_ms - prefill_ms - kv_transfer_ms

i.e. everything before the first token that the prefill tier did not account for: validation, tokenization,
admission, the decode replica's reserve call (a Ray round trip plus posting the KV receives), the Ray call to the
prefill replica and its reply, and the router's event-loop delays under load. After the first token,
e2e_ms - ttft_ms is decode-tier time and router relay together; it is reported, not split. Time a call waits in
the router process before its handler starts is in neither; "client e2e - router e2e" bounds it (with the network
and the client's own delays).
"""

from __future__ import annotations

import math

from benchmarks._report import print_table, summarize

OVERHEAD_SUBTRACTED = ("queue_ms", "prefill_ms", "kv_transfer_ms")
OVERHEAD_DEFINITION = "ttft_ms - " + " - ".join(OVERHEAD_SUBTRACTED)


def code_counts(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[str(value)] = counts.get(str(value), 0) + 1
    return dict(sorted(counts.items()))


def latency_figures(results: list[dict]) -> dict:
    """Percentile summaries (ms) over the requests that completed."""
    timed = [r for r in results if r["code"] == "OK" and r["timings"]]

    def column(key: str) -> list[float]:
        return [r["timings"][key] for r in timed]

    return {
        "router_overhead_ms": summarize([r["timings"]["ttft_ms"] - sum(r["timings"][k] for k in OVERHEAD_SUBTRACTED)
                                         for r in timed]),
        "ttft_ms": summarize(column("ttft_ms")),
        "queue_ms": summarize(column("queue_ms")),
        "prefill_ms": summarize(column("prefill_ms")),
        "kv_transfer_ms": summarize(column("kv_transfer_ms")),
        "e2e_ms": summarize(column("e2e_ms")),
        "after_first_token_ms": summarize([r["timings"]["e2e_ms"] - r["timings"]["ttft_ms"] for r in timed]),
        "tpot_ms": summarize(column("tpot_ms")),
        "client_minus_router_e2e_ms": summarize([r["client_e2e_ms"] - r["timings"]["e2e_ms"] for r in timed]),
    }


def phase_figures(phase: dict, *, num_expected: int | None = None) -> dict:
    """Completion counts, status codes, throughput and latencies of one phase's requests."""
    results = phase["results"]
    ok = [r for r in results if r["code"] == "OK"]
    num_tokens = sum(r["completion_tokens"] for r in ok)
    wall_s = phase["wall_s"]
    return {
        "num_requests": num_expected if num_expected is not None else len(results),
        "num_completed": len(ok),
        "codes": code_counts(r["code"] for r in results),
        "finish_reasons": code_counts(r["finish_reason"] for r in ok),
        "failures": [{k: r[k] for k in ("index", "code", "message")} for r in results if r["code"] != "OK"][:20],
        "wall_s": wall_s,
        "requests_per_s": len(results) / wall_s if wall_s > 0 else math.nan,
        "completion_tokens": num_tokens,
        "output_tokens_per_s": num_tokens / wall_s if wall_s > 0 else math.nan,
        "router_overhead_definition": OVERHEAD_DEFINITION,
        **latency_figures(results),
    }


def deadline_figures(phase: dict, deadline_s: float, idle_after: dict) -> dict:
    results = phase["results"]
    return {
        "deadline_s": deadline_s,
        "num_requests": len(results),
        "codes": code_counts(r["code"] for r in results),
        "num_with_tokens": sum(1 for r in results if r["num_chunks"] > 0),
        "client_end_ms": summarize([r["client_e2e_ms"] for r in results]),
        "idle_after": idle_after,
    }


def _check(passed: bool, detail: str) -> dict:
    return {"passed": bool(passed), "detail": detail}


def _idle_detail(idle: dict) -> str:
    decode = ", ".join(f"{r['id']} {r['kv_free']}/{r['kv_total']}" for r in idle["replicas"]
                       if r["id"].startswith("decode"))
    return f"idle with full KV pools: {idle['is_idle']} after {idle['seconds']:.1f} s (KV free/total {decode})"


def checks(document: dict, memory_labels: list[str]) -> dict:
    """Pass/fail per requirement, each with the figure behind it. `memory_labels`: the processes the memory
    verdict applies to (the router and the replicas)."""
    streams = document["streams"]
    result = {
        "all_streams_completed": _check(streams["num_completed"] == streams["num_requests"],
                                         f"{streams['num_completed']}/{streams['num_requests']} completed; "
                                         f"codes {streams['codes']}"),
        "idle_after_streams": _check(streams["idle_after"]["is_idle"], _idle_detail(streams["idle_after"])),
    }
    for batch in document["deadlines"]:
        name = f"deadline_{batch['deadline_s']:g}s"
        exceeded = batch["codes"].get("DEADLINE_EXCEEDED", 0)
        result[f"{name}_all_exceeded"] = _check(exceeded == batch["num_requests"],
                                                f"{exceeded}/{batch['num_requests']} DEADLINE_EXCEEDED; "
                                                f"codes {batch['codes']}")
        detail = _idle_detail(batch["idle_after"])
        eventually = batch.get("idle_eventually")
        if not batch["idle_after"]["is_idle"] and eventually is not None:
            detail += (f"; then {eventually['seconds']:.1f} s more until idle ({eventually['is_idle']}): "
                       "what the cancel did not free, only a lease expiry did")
        result[f"{name}_freed"] = _check(batch["idle_after"]["is_idle"], detail)
    soak = document.get("soak")
    if soak is not None:
        result["soak_no_failures"] = _check(soak["num_completed"] == soak["num_requests"],
                                            f"{soak['num_completed']}/{soak['num_requests']} OK; codes {soak['codes']}")
        verdicts = {label: soak["memory"][label]["verdict"] for label in memory_labels if label in soak["memory"]}
        result["soak_memory_not_growing"] = _check(
            all(v in ("stable", "grew early, then flat") for v in verdicts.values()),
            f"{verdicts} (limit {soak['growth_limit_mib_per_min']} MiB/min)")
        result["idle_after_soak"] = _check(soak["idle_after"]["is_idle"], _idle_detail(soak["idle_after"]))
    replicas = document["final_replicas"]
    troubled = {r["id"]: {"failures": r["failures"], "restarts": r["restarts"]} for r in replicas
                if r["failures"] or r["restarts"] or r["state"] != "ready"}
    result["no_replica_marked_failed"] = _check(
        not troubled, f"replicas with failures/restarts or not ready: {troubled}" if troubled
        else "every replica ready, no failure or restart recorded by the router")
    return result


def _percentile_row(name: str, summary: dict) -> list:
    return [name, summary["n"], summary["p50"], summary["p90"], summary["p99"], summary["max"]]


def _codes(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def print_tables(document: dict) -> None:
    streams = document["streams"]
    print_table(f"Phase 1: {streams['num_requests']} concurrent streams "
                f"(max_tokens {document['args']['max_tokens']}, ignore_eos)", ["figure", "value"], [
        ["completed", f"{streams['num_completed']}/{streams['num_requests']}"],
        ["status codes", _codes(streams["codes"])],
        ["finish reasons", _codes(streams["finish_reasons"])],
        ["wall time (s)", streams["wall_s"]],
        ["output tokens/s", streams["output_tokens_per_s"]],
        ["idle, KV pool full after (s)", f"{streams['idle_after']['is_idle']} ({streams['idle_after']['seconds']:.1f})"],
    ])
    print_table(f"Phase 1 per-request times (ms); router overhead = {OVERHEAD_DEFINITION}",
                ["ms", "n", "p50", "p90", "p99", "max"], [
        _percentile_row("router overhead", streams["router_overhead_ms"]),
        _percentile_row("ttft (router)", streams["ttft_ms"]),
        _percentile_row("  prefill queue", streams["queue_ms"]),
        _percentile_row("  prefill forward", streams["prefill_ms"]),
        _percentile_row("  kv transfer", streams["kv_transfer_ms"]),
        _percentile_row("e2e (router)", streams["e2e_ms"]),
        _percentile_row("  after 1st token", streams["after_first_token_ms"]),
        _percentile_row("tpot (router)", streams["tpot_ms"]),
        _percentile_row("client e2e - router e2e", streams["client_minus_router_e2e_ms"]),
    ])
    overhead_rows = []
    for key, name in (("baseline", "one at a time"), ("soak", "soak"), ("streams", "all streams at once")):
        phase = document.get(key)
        if phase is not None:
            concurrency = {"baseline": 1, "soak": document["args"]["soak_concurrency"],
                           "streams": document["args"]["streams"]}[key]
            summary = phase["router_overhead_ms"]
            overhead_rows.append([f"{name} ({concurrency} in flight)", summary["n"], summary["p50"], summary["p90"],
                                  summary["p99"], summary["max"], phase["ttft_ms"]["p50"]])
    print_table("Router overhead by load (ms)", ["phase", "n", "p50", "p90", "p99", "max", "ttft p50"],
                overhead_rows)
    cpu = document.get("cpu", {})
    if cpu:
        labels = list(next(iter(cpu.values()))["cores"])
        print_table("CPU used per phase (average cores busy; the machine has "
                    f"{next(iter(cpu.values()))['num_cores']})", ["process", *cpu],
                    [[label, *[cpu[phase]["cores"].get(label, math.nan) for phase in cpu]] for label in labels]
                    + [["machine, all processes", *[cpu[p].get("machine_busy_cores", math.nan) for p in cpu]],
                       ["machine, not listed above", *[cpu[p].get("others_cores", math.nan) for p in cpu]]])
    answers = document.get("replica_answer_ms", {})
    print_table("Replica answer time to a get_stats() call from the driver, every 0.5 s (ms; the router's health "
                "check gives up at 2000)", ["phase / replica", "n", "p50", "p90", "p99", "max", "> 2 s"],
                [[f"{phase} / {label}", m["n"], m["p50"], m["p90"], m["p99"], m["max"], m["num_over_2s"]]
                 for phase, per_replica in answers.items() for label, m in per_replica.items()])
    rows = []
    for batch in document["deadlines"]:
        idle = batch["idle_after"]
        pools = ", ".join(f"{r['kv_free']}/{r['kv_total']}" for r in idle["replicas"] if r["id"].startswith("decode"))
        eventually = batch.get("idle_eventually")
        full_after = idle["seconds"] + (eventually["seconds"] if eventually and not idle["is_idle"] else 0.0)
        rows.append([f"{batch['deadline_s']:g}", batch["num_requests"], _codes(batch["codes"]),
                     batch["num_with_tokens"], batch["client_end_ms"]["max"], pools,
                     f"{idle['is_idle']} ({idle['seconds']:.1f} s)", full_after])
    print_table(f"Phase 2: deadlines ({document['args']['deadline_max_tokens']}-token generations); the pool "
                "must be full again within --drain-timeout-s", ["deadline s", "requests", "status codes",
                "got tokens", "max end ms", "decode KV free/total", "idle in time", "full again after s"], rows)
    soak = document.get("soak")
    if soak is not None:
        print_table(f"Phase 3: soak {soak['wall_s']:.0f} s, {soak['num_requests']} requests "
                    f"({soak['requests_per_s']:.1f}/s), codes {soak['codes']}; RSS every "
                    f"{document['args']['sample_s']:g} s",
                    ["process RSS (MiB)", "pid", "start", "end", "max", "slope/min", "2nd-half slope/min", "verdict"],
                    [[label, m.get("pid"), m.get("start_mib"), m.get("end_mib"), m.get("max_mib"),
                      m.get("slope_mib_per_min"), m.get("late_slope_mib_per_min"), m["verdict"]]
                     for label, m in soak["memory"].items()])
    print_table("Checks", ["check", "passed", "detail"],
                [[name, "yes" if c["passed"] else "NO", c["detail"]] for name, c in document["checks"].items()],
                left_columns=(0, 2))
