"""KV transfer between a prefill GPU and a decode GPU: throughput (ucx vs nccl) and time to first token.

    python benchmarks/kv_transfer.py                    # two GPUs: prefill on cuda:0, decode on cuda:1
    python benchmarks/kv_transfer.py --dry-run          # CPU, tiny shapes: checks the whole script in seconds

Two processes, one GPU each (benchmarks/_kv_transfer_sides.py), as a prefill and a decode replica would be.

1. Throughput: a Llama-3-8B-shaped KV cache (32 layers, 8 KV heads, head_dim 128, bf16, block size 16) of 8K and
   32K tokens moved from GPU 0 into the decode side's paged cache on GPU 1, every layer queued at once, through
   the transport interface (KVClient.send into KVReceiver reservations), for a contiguous block table (one
   message per layer) and a fragmented one (every block its own chunk). Time: first send -> the receiver has
   every layer (`wait_complete`). Compared with the GPU0 -> GPU1 copy ceiling, measured here by one process
   (DESIGN.md: 394 GB/s on 2 x H200), last. Every configuration's last run is checked block by block (checksums).
2. TTFT: a Llama-3-8B-shaped model (random bf16 weights drawn on the GPU) prefills a 2K / 8K / 32K prompt on
   GPU 0. Colocated: into GPU 0's own paged cache, then sample. Disaggregated: each layer's K/V is pushed from the
   layer hook to GPU 1 while the next layers compute; TTFT = until the first token is sampled AND every layer has
   landed on GPU 1. The landed cache must equal the colocated cache bit for bit (checksums).

Prints the tables and writes JSON (`--out`, default out/benchmarks/kv_transfer.json). Exits non-zero if a
correctness check fails; goals missed are reported, not failed.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from benchmarks._kv_transfer_sides import run_side  # noqa: E402
from benchmarks._report import command_line, machine_info, print_table, write_json  # noqa: E402

COPY_CEILING_DESIGN_GBPS = 394.0  # GPU0 -> GPU1 on the 2 x H200 machine (DESIGN.md)
THROUGHPUT_GOAL = 0.85  # of the copy ceiling
TTFT_GOAL = 0.05  # disaggregated TTFT within 5% of colocated at 8K


class Side:
    """A benchmark process, called like a remote object."""

    def __init__(self, role: str, device: str):
        context = multiprocessing.get_context("spawn")
        self._connection, child_end = context.Pipe()
        self.process = context.Process(target=run_side, args=(child_end, role, device), name=f"kv-{role}",
                                       daemon=True)
        self.process.start()
        child_end.close()
        self.role = role

    def call(self, method: str, timeout_s: float = 300.0, **kwargs):
        self._connection.send((method, kwargs))
        if not self._connection.poll(timeout_s):
            raise TimeoutError(f"{self.role} side: {method} did not answer within {timeout_s}s")
        status, value = self._connection.recv()
        if status != "ok":
            raise RuntimeError(f"{self.role} side: {method} failed: {value}")
        return value

    def start_call(self, method: str, **kwargs) -> None:
        self._connection.send((method, kwargs))

    def finish_call(self, timeout_s: float = 300.0):
        if not self._connection.poll(timeout_s):
            raise TimeoutError(f"{self.role} side did not answer within {timeout_s}s")
        status, value = self._connection.recv()
        if status != "ok":
            raise RuntimeError(f"{self.role} side failed: {value}")
        return value

    def stop(self) -> None:
        try:
            if self.process.is_alive():
                self.call("stop", timeout_s=60)
        except Exception as error:
            print(f"{self.role} side did not stop cleanly: {error}", file=sys.stderr)
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()


def block_table(kind: str, num_blocks: int, pool_size: int, seed: int) -> list[int]:
    """contiguous: blocks 0..n-1 (one run); fragmented: n blocks drawn at random from the pool (runs of ~1)."""
    if kind == "contiguous":
        return list(range(num_blocks))
    pool = list(range(pool_size))
    random.Random(seed).shuffle(pool)
    return pool[:num_blocks]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def measure_throughput(decode: Side, prefill: Side, args, shape: dict) -> list[dict]:
    block_size = shape["block_size"]
    rows = []
    rates: dict[tuple[str, str], float] = {}  # (transport, table) -> GB/s at the previous size
    for num_tokens in args.throughput_tokens:
        num_blocks = -(-num_tokens // block_size)
        for table_kind in ("contiguous", "fragmented"):
            table = block_table(table_kind, num_blocks, args.pool_blocks, seed=num_tokens)
            num_bytes = num_blocks * 2 * block_size * shape["num_kv_heads"] * shape["head_dim"] * 2 * shape["num_layers"]
            for transport in args.transports:
                row = {"transport": transport, "table": table_kind, "num_tokens": num_tokens,
                       "num_chunks_per_layer": _num_runs(table), "num_bytes": num_bytes}
                previous = rates.get((transport, table_kind))
                if time.monotonic() > args.deadline:
                    row["skipped"] = "out of time (--time-limit-s)"
                    rows.append(row)
                    continue
                if previous and num_bytes / (previous * 1e9) > args.max_transfer_s:
                    row["skipped"] = (f"at {previous:.2f} GB/s one transfer would take "
                                      f"{num_bytes / (previous * 1e9):.0f} s (> --max-transfer-s)")
                    rows.append(row)
                    print(f"skip {transport} {table_kind} {num_tokens}: {row['skipped']}", file=sys.stderr)
                    continue
                try:
                    row.update(_throughput_runs(decode, prefill, args, transport, table, num_tokens, shape))
                except Exception as error:
                    row["error"] = str(error)[:2000]
                    print(f"{transport} {table_kind} {num_tokens}: {row['error']}", file=sys.stderr)
                if "gbps" in row:
                    rates[(transport, table_kind)] = row["gbps"]
                rows.append(row)
                print(f"{transport:5s} {table_kind:10s} {num_tokens:6d} tokens: {row.get('gbps', float('nan')):8.2f} GB/s "
                      f"{'' if row.get('is_exact', True) else 'MISMATCH'}", file=sys.stderr, flush=True)
    return rows


def _num_runs(table: list[int]) -> int:
    return 1 + sum(1 for a, b in zip(table, table[1:]) if b != a + 1)


def _throughput_runs(decode: Side, prefill: Side, args, transport: str, table: list[int], num_tokens: int,
                     shape: dict) -> dict:
    address = decode.call("serve", transport=transport)
    prefill.call("connect", transport=transport, address=address)
    seconds, landed_bytes = [], 0
    num_blocks = -(-num_tokens // shape["block_size"])
    budget_end = time.monotonic() + args.budget_s
    expected = None
    for rep in range(args.reps + 1):  # rep 0 warms up (registrations, communicators, allocator)
        is_last = rep == args.reps or (rep > 0 and time.monotonic() > budget_end)
        if is_last:  # the checked run must write every block itself
            decode.call("poison", block_ids=table[:num_blocks])
        request_id = f"tp-{transport}-{num_tokens}-{len(table)}-{rep}"
        info = decode.call("reserve", transport=transport, request_id=request_id, block_ids=table,
                           num_tokens=num_tokens, lease_s=args.lease_s)
        if expected is None:
            expected = prefill.call("prepare_chunks", info=info, seed=num_tokens)
        decode.start_call("wait", transport=transport, request_id=request_id)
        sent = prefill.call("send_all", transport=transport, info=info, timeout_s=args.lease_s + 30)
        landed = decode.finish_call(timeout_s=args.lease_s + 30)
        if "error" in landed:
            raise RuntimeError(f"transfer failed: {landed['error']}")
        landed_bytes = landed["num_bytes"]
        if rep > 0:
            seconds.append(landed["landed_at"] - sent["started_at"])
        if is_last:
            is_exact = decode.call("checksums", block_ids=table[:num_blocks]) == expected
            break
    best = median(seconds)
    return {"seconds": seconds, "median_s": best, "gbps": landed_bytes / best / 1e9, "landed_bytes": landed_bytes,
            "is_exact": is_exact}


def measure_ttft(decode: Side, prefill: Side, args, model_info: dict) -> list[dict]:
    rows = []
    for num_tokens in args.ttft_tokens:
        if time.monotonic() > args.deadline:
            rows.append({"num_tokens": num_tokens, "skipped": "out of time (--time-limit-s)"})
            continue
        num_blocks = -(-num_tokens // args.block_size)
        table = list(range(num_blocks))
        colocated = [prefill.call("prefill_colocated", num_tokens=num_tokens, seed=num_tokens)
                     for _ in range(args.reps + 1)][1:]
        reference = colocated[-1]
        row = {"num_tokens": num_tokens, "colocated_ttft_s": median([r["ttft_s"] for r in colocated]),
               "colocated_runs_s": [r["ttft_s"] for r in colocated]}
        for transport in args.transports:
            try:
                row.update(_ttft_runs(decode, prefill, args, transport, table, num_tokens, reference))
            except Exception as error:
                row[f"{transport}_error"] = str(error)[:2000]
                print(f"TTFT {transport} {num_tokens}: {row[f'{transport}_error']}", file=sys.stderr)
            if f"{transport}_ttft_s" in row:
                row[f"{transport}_overhead"] = row[f"{transport}_ttft_s"] / row["colocated_ttft_s"] - 1
        rows.append(row)
        print(f"TTFT {num_tokens} tokens: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()
                                                        if k.endswith("ttft_s")), file=sys.stderr, flush=True)
    return rows


def _ttft_runs(decode: Side, prefill: Side, args, transport: str, table: list[int], num_tokens: int,
               reference: dict) -> dict:
    address = decode.call("serve", transport=transport)
    prefill.call("connect", transport=transport, address=address)
    ttfts, tails, same_token = [], [], True
    for rep in range(args.reps + 1):
        request_id = f"ttft-{transport}-{num_tokens}-{rep}"
        info = decode.call("reserve", transport=transport, request_id=request_id, block_ids=table,
                           num_tokens=num_tokens, lease_s=args.lease_s)
        decode.start_call("wait", transport=transport, request_id=request_id)
        pushed = prefill.call("prefill_disaggregated", transport=transport, info=info, seed=num_tokens,
                              timeout_s=args.lease_s + 60)
        landed = decode.finish_call(timeout_s=args.lease_s + 30)
        if "error" in landed:
            raise RuntimeError(f"transfer failed: {landed['error']}")
        same_token &= pushed["token"] == reference["token"]
        if rep > 0:
            ttfts.append(max(pushed["sampled_at"], landed["landed_at"]) - pushed["started_at"])
            tails.append(landed["landed_at"] - pushed["sampled_at"])
    is_exact = decode.call("checksums", block_ids=table) == reference["checksums"]
    return {f"{transport}_ttft_s": median(ttfts), f"{transport}_runs_s": ttfts,
            f"{transport}_landed_after_token_s": median(tails), f"{transport}_is_exact": is_exact,
            f"{transport}_same_token": same_token}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes (checks the script, no figures)")
    parser.add_argument("--transports", nargs="+", default=["ucx", "nccl"])
    parser.add_argument("--throughput-tokens", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--ttft-tokens", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3, help="timed runs per configuration (after one warm-up)")
    parser.add_argument("--budget-s", type=float, default=20.0, help="stop repeating a configuration after this")
    parser.add_argument("--max-transfer-s", type=float, default=15.0,
                        help="skip a size whose transfer would take longer, judged from the smaller size's rate")
    parser.add_argument("--lease-s", type=float, default=60.0)
    parser.add_argument("--skip-ttft", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--time-limit-s", type=float, default=float("inf"),
                        help="start no new configuration after this many seconds (the tables keep what ran)")
    parser.add_argument("--out", default="out/benchmarks/kv_transfer.json")
    args = parser.parse_args(argv)
    args.deadline = time.monotonic() + args.time_limit_s
    if args.dry_run:
        args.throughput_tokens = [t // 64 for t in args.throughput_tokens]
        args.ttft_tokens = [t // 64 for t in args.ttft_tokens]
        args.budget_s = min(args.budget_s, 5.0)
    args.pool_blocks = 2 * -(-max(args.throughput_tokens + args.ttft_tokens) // args.block_size)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        devices, preset, shape_name = ("cpu", "cpu"), "tiny-llama", "tiny-llama"
    else:
        devices, preset, shape_name = ("cuda:0", "cuda:1"), "llama-3-8b", "llama-3-8b"
    from mesh.presets import PRESETS

    config = PRESETS[preset]
    shape = {"num_layers": config["num_hidden_layers"], "num_kv_heads": config["num_key_value_heads"],
             "head_dim": config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
             "block_size": args.block_size, "dtype": "float32" if args.dry_run else "bfloat16"}
    document = {"benchmark": "kv_transfer", "command": command_line(), "machine": machine_info(),
                "devices": {"prefill": devices[0], "decode": devices[1]}, "kv_shape": {"preset": shape_name, **shape},
                "dry_run": args.dry_run}
    prefill, decode = Side("prefill", devices[0]), Side("decode", devices[1])
    failures: list[str] = []
    errors: dict[str, str] = {}  # a phase that broke: recorded, and the other phases still run
    document["errors"] = errors
    try:
        decode.call("allocate_cache", num_layers=shape["num_layers"], num_blocks=args.pool_blocks,
                    num_kv_heads=shape["num_kv_heads"], head_dim=shape["head_dim"], block_size=args.block_size,
                    dtype=shape["dtype"])
        if not args.skip_throughput:
            with _phase("throughput", errors):
                rows = measure_throughput(decode, prefill, args, shape)
                document["throughput"] = rows
                failures += [f"{r['transport']} {r['table']} {r['num_tokens']}: blocks differ" for r in rows
                             if r.get("is_exact") is False]
            write_json(args.out, document)
        if not args.skip_ttft:
            with _phase("ttft", errors):
                model_info = prefill.call("build_model", preset=preset, seed=0, max_tokens=max(args.ttft_tokens),
                                          block_size=args.block_size, timeout_s=600)
                document["model"] = {"preset": preset, **model_info}
                rows = measure_ttft(decode, prefill, args, model_info)
                document["ttft"] = rows
                failures += [f"TTFT {t} {r['num_tokens']}: landed KV differs from colocated" for r in rows
                             for t in args.transports if r.get(f"{t}_is_exact") is False]
            write_json(args.out, document)
        # Last: the decode process then holds a context on the prefill GPU too, which the transfers never had.
        with _phase("copy_ceiling", errors):
            ceiling = decode.call("copy_ceiling", num_bytes=(1 << 30) if not args.dry_run else (64 << 20),
                                  source_device=devices[0])
            document["copy_ceiling_gbps"] = {"measured": ceiling, "design_md": COPY_CEILING_DESIGN_GBPS}
            for row in document.get("throughput", []):
                if "gbps" in row:
                    row["fraction_of_ceiling"] = row["gbps"] / ceiling
            print(f"copy ceiling {devices[0]} -> {devices[1]}: {ceiling:.1f} GB/s", file=sys.stderr, flush=True)
    finally:
        prefill.stop()
        decode.stop()
    document["failures"] = failures
    report(document, args)
    path = write_json(args.out, document)
    print(f"\nwrote {path}")
    for failure in failures:
        print(f"CHECK FAILED: {failure}")
    for phase, error in errors.items():
        print(f"PHASE FAILED: {phase}: {error.splitlines()[0]}")
    return 1 if failures or errors else 0


@contextlib.contextmanager
def _phase(name: str, errors: dict[str, str]):
    try:
        yield
    except Exception as error:
        errors[name] = f"{type(error).__name__}: {error}"[:4000]
        print(f"phase {name} failed: {errors[name]}", file=sys.stderr, flush=True)


def report(document: dict, args) -> None:
    ceiling = document.get("copy_ceiling_gbps", {}).get("measured", float("nan"))
    if "model" in document:
        print(f"\nmodel: {document['model']}")
    if "throughput" in document:
        rows = []
        for r in document["throughput"]:
            status = r.get("skipped") or r.get("error", "").splitlines()[0:1] or ("ok" if r.get("is_exact") else "MISMATCH")
            rows.append([r["transport"], r["table"], r["num_tokens"], r["num_chunks_per_layer"],
                         r["num_bytes"] / 2**30, r.get("median_s", float("nan")) * 1e3, r.get("gbps", float("nan")),
                         100 * r.get("fraction_of_ceiling", float("nan")),
                         status if isinstance(status, str) else " ".join(status)[:60]])
        print_table(f"KV transfer throughput {document['devices']['prefill']} -> {document['devices']['decode']} "
                    f"(copy ceiling measured {ceiling:.1f} GB/s; goal >= {THROUGHPUT_GOAL:.0%})",
                    ["transport", "table", "tokens", "chunks/layer", "GiB", "ms", "GB/s", "% ceiling", "check"],
                    rows, left_columns=(0, 1, 8))
    if "ttft" in document:
        header = ["tokens", "colocated ms"]
        for t in args.transports:
            header += [f"{t} ms", f"{t} +%", f"{t} tail ms"]
        rows = []
        for r in document["ttft"]:
            row = [r["num_tokens"], r.get("colocated_ttft_s", float("nan")) * 1e3]
            for t in args.transports:
                row += [r.get(f"{t}_ttft_s", float("nan")) * 1e3, 100 * r.get(f"{t}_overhead", float("nan")),
                        r.get(f"{t}_landed_after_token_s", float("nan")) * 1e3]
            rows.append(row)
        print_table(f"Time to first token, {document.get('model', {}).get('preset', '?')} shape: prefill on "
                    f"{document['devices']['prefill']}, KV to {document['devices']['decode']} vs colocated "
                    f"(goal: within {TTFT_GOAL:.0%} at 8K; tail = last layer landed after the token was sampled)",
                    header, rows, left_columns=())


if __name__ == "__main__":
    sys.exit(main())
