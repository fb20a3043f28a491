"""`pdcluster generate` and `pdcluster status`: the client side of the CLI.

orchestrator/cli.py wires these in: `add_generate_args(parser)` + `run_generate(args)`, `add_status_args(parser)`
+ `run_status(args)`. Only the client SDK is imported, so these commands start fast and need no torch or ray.
Exit codes: 0 success, 1 the call failed (the gRPC code and message are printed to stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from orchestrator.client import DEFAULT_ADDRESS, Client, PdclusterError


def token_ids_arg(text: str) -> list[int]:
    try:
        token_ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,3, got {text!r}") from None
    if not token_ids:
        raise argparse.ArgumentTypeError("expected at least one token id, like 1,2,3")
    return token_ids


def _add_connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=DEFAULT_ADDRESS, help=f"router HOST:PORT (default {DEFAULT_ADDRESS})")
    parser.add_argument("--timeout", type=float, default=None, help="seconds for the whole call (default: none)")


def add_generate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", help="prompt text (or use --token-ids)")
    parser.add_argument("--token-ids", type=token_ids_arg, help='an already tokenized prompt, e.g. "1,2,3"')
    _add_connection_args(parser)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off (default)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--stop-token-ids", type=token_ids_arg, default=None, help='e.g. "2,7"')
    parser.add_argument("--ignore-eos", action="store_true")


def run_generate(args: argparse.Namespace, *, out=None, err=None) -> int:
    """Streams the text to stdout as it arrives; one summary line to stderr."""
    out = out or sys.stdout
    err = err or sys.stderr
    if (args.prompt is None) == (args.token_ids is None):
        print("pdcluster generate: give exactly one of PROMPT and --token-ids", file=err)
        return 2
    last = None
    try:
        with Client(args.address, timeout=args.timeout) as client:
            for chunk in client.generate(
                args.prompt,
                token_ids=args.token_ids,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                seed=args.seed,
                stop=args.stop,
                stop_token_ids=args.stop_token_ids,
                ignore_eos=args.ignore_eos,
            ):
                out.write(chunk.text)
                out.flush()
                last = chunk
    except PdclusterError as error:
        print(f"\npdcluster generate: {error.code_name}: {error.message}", file=err)
        return 1
    out.write("\n")
    out.flush()
    print(_summary(last), file=err)
    return 0


def _summary(chunk) -> str:
    if chunk is None or chunk.finish_reason is None:
        return "finish=? (the stream ended without a final message)"
    timings = chunk.timings
    return (
        f"finish={chunk.finish_reason} prompt_tokens={chunk.usage.prompt_tokens} "
        f"completion_tokens={chunk.usage.completion_tokens} ttft={timings['ttft_ms']:.1f}ms "
        f"tpot={timings['tpot_ms']:.1f}ms e2e={timings['e2e_ms']:.1f}ms "
        f"replicas={chunk.prefill_replica or '-'}->{chunk.decode_replica or '-'}"
    ) + _comm_summary(timings)


def _comm_summary(timings: dict) -> str:
    """ kv=<bytes> and each tier's collective bytes by kind, when the request moved any (multi-rank replicas)."""
    parts = [f" kv={timings['kv_bytes']}B"] if timings.get("kv_bytes") else []
    for tier in ("prefill", "decode"):
        by_kind = timings.get(f"{tier}_comm_bytes") or {}
        if by_kind:
            parts.append(f" {tier}_comm=" + ",".join(f"{kind}:{n}B" for kind, n in sorted(by_kind.items())))
    return "".join(parts)


def add_status_args(parser: argparse.ArgumentParser) -> None:
    _add_connection_args(parser)
    parser.add_argument("--json", action="store_true", help="print the status as JSON")


def run_status(args: argparse.Namespace, *, out=None, err=None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        with Client(args.address, timeout=args.timeout) as client:
            status = client.status()
    except PdclusterError as error:
        print(f"pdcluster status: {error.code_name}: {error.message}", file=err)
        return 1
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True), file=out)
    else:
        print(format_status_table(status), file=out)
    return 0


def format_status_table(status: dict) -> str:
    lines = [
        f"model {status['model']}  context {status['max_context_len']} tokens  router in flight {status['num_inflight']}",
        "",
    ]
    header = ("tier", "replica", "state", "node", "accel", "mesh tp/cp/pp/ep", "queued", "running", "KV free/total")
    rows = [header]
    for tier in ("prefill", "decode"):
        for replica in status[tier]:
            mesh = replica["mesh"]
            rows.append((
                tier,
                replica["id"],
                replica["state"],
                replica["node"] or "-",  # "-" keeps the columns aligned when a replica has not reported yet
                replica["accelerator"] or "-",
                f"{mesh['tp']}/{mesh['cp']}/{mesh['pp']}/{mesh['ep']}",
                str(replica["load"]["num_queued"]),
                str(replica["load"]["num_running"]),
                f"{replica['kv_blocks']['num_free']}/{replica['kv_blocks']['num_total']}",
            ))
    if len(rows) == 1:
        return "\n".join(lines + ["no replicas"])
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines + _autoscale_lines(status.get("autoscale", [])))


def _autoscale_lines(decisions: list[dict]) -> list[str]:
    """Each autoscaled tier's latest decision, then the recent changes with their time (UTC)."""
    if not decisions:
        return []
    lines = ["", "autoscale"]
    for d in decisions:
        when = "now   " if d["is_latest"] else time.strftime("%H:%M:%S", time.gmtime(d["at"]))
        capacity = f"{d['capacity_rps']:.2f}" if d["capacity_rps"] else "?"
        lines.append(f"  {when} {d['tier']:<7} {d['action']:<4} {d['from_replicas']} -> {d['to_replicas']}  "
                     f"demand {d['demand_rps']:.2f} req/s, capacity {capacity} req/s per replica: {d['reason']}")
    return lines
