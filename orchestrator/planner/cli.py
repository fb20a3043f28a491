"""`pdcluster plan` and `pdcluster calibrate`.

orchestrator/cli.py wires these in with `add_subcommands(sub)` (or the four functions below one by one):
`add_plan_args(parser)` + `run_plan(args)`, `add_calibrate_args(parser)` + `run_calibrate(args)`; each `add_*`
also sets `func` to its runner. Exit codes: 0 success, 1 no deployment meets the targets (the binding constraint
is printed), 2 a bad flag, file or model.

  pdcluster plan --preset llama-3-8b --gpu H200 --rate 20 --input-len 512-4096 --output-len 256 \\
      --ttft-ms 500 --tpot-ms 30 [--write cluster.yaml]
  pdcluster calibrate [--output hardware.json]      then: pdcluster plan --hardware hardware.json ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PLAN_HELP = "choose each tier's mesh and replica count for a model, GPUs and latency targets"
CALIBRATE_HELP = "measure this machine's matmul, memory and link ceilings for `pdcluster plan --hardware`"
DEFAULT_HARDWARE_FILE = "pdcluster-hardware.json"
EXIT_INFEASIBLE = 1
EXIT_USAGE = 2


def add_subcommands(sub) -> None:
    """Adds `plan` and `calibrate` to the `pdcluster` subparsers."""
    add_plan_args(sub.add_parser("plan", help=PLAN_HELP, description=PLAN_HELP))
    add_calibrate_args(sub.add_parser("calibrate", help=CALIBRATE_HELP, description=CALIBRATE_HELP))


def _offer_arg(text: str) -> tuple[str, int | None]:
    name, _, count = text.partition(":")
    if not name:
        raise argparse.ArgumentTypeError(f"expected NAME or NAME:COUNT, got {text!r}")
    if not count:
        return name, None
    try:
        value = int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"COUNT in {text!r} must be an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"COUNT in {text!r} must be >= 1")
    return name, value


def add_plan_args(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="Hugging Face model directory (or its config.json)")
    source.add_argument("--preset", help="a named shape: gpt3-175b or a mesh preset (llama-3-8b, tiny-llama, ...)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32", "fp8"], default=None,
                        help="weight and KV dtype (default: the config's torch_dtype, else bfloat16)")
    parser.add_argument("--gpu", action="append", type=_offer_arg, default=[], metavar="NAME[:COUNT]",
                        help="a built-in GPU type the cluster offers, with how many (repeatable; default H200). "
                             "Built-in: H200 (measured), H100-SXM, A100-80GB, L40S (datasheet-derived)")
    parser.add_argument("--hardware", action="append", type=_offer_arg, default=[], metavar="FILE[:COUNT]",
                        help="a `pdcluster calibrate` file describing a GPU type (repeatable)")
    parser.add_argument("--traffic", help="YAML/JSON file with rate, input_len, output_len, ttft_ms, tpot_ms, "
                                          "quantile (flags below override it)")
    parser.add_argument("--rate", type=float, help="arrival rate, requests/s (default 1)")
    parser.add_argument("--input-len", help="prompt tokens: 1024, 512-2048 or 256:0.7,4096:0.3 (default 1024)")
    parser.add_argument("--output-len", help="generated tokens, same forms (default 256)")
    parser.add_argument("--ttft-ms", type=float, help="time-to-first-token target (required unless --traffic)")
    parser.add_argument("--tpot-ms", type=float, help="time-per-output-token target (required unless --traffic)")
    parser.add_argument("--quantile", type=float, help="latency is checked at this length quantile (default 0.9)")
    parser.add_argument("--max-gpus-per-replica", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=1024, help="decode sequences per replica at most")
    parser.add_argument("--kv-link-gbps", type=float, help="prefill -> decode KV link, GB/s (default: the GPU's "
                                                           "same-node figure, or its inter-node one across types)")
    parser.add_argument("--step-overhead-ms", type=float, default=0.0,
                        help="framework time per forward pass to add (default 0)")
    parser.add_argument("--no-layerwise", action="store_true", help="KV shipped after the prefill, not per layer")
    parser.add_argument("--top", type=int, default=5, help="candidates shown per tier (default 5)")
    parser.add_argument("--write", metavar="FILE", help="write the chosen tiers into this cluster.yaml")
    parser.set_defaults(func=run_plan)


def _traffic(args):
    import yaml

    from orchestrator.planner.traffic import TRAFFIC_KEYS, Traffic

    raw: dict = {"rate": 1.0, "input_len": "1024", "output_len": "256"}
    if args.traffic:
        try:
            loaded = yaml.safe_load(Path(args.traffic).read_text())
        except FileNotFoundError:
            raise ValueError(f"--traffic: {args.traffic} does not exist") from None
        except yaml.YAMLError as error:
            raise ValueError(f"--traffic: {args.traffic} is not valid YAML/JSON: {error}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"--traffic: {args.traffic} must hold a mapping")
        unknown = sorted(set(loaded) - set(TRAFFIC_KEYS))
        if unknown:
            raise ValueError(f"--traffic: {args.traffic}: unknown keys {unknown}; allowed: {list(TRAFFIC_KEYS)}")
        raw.update(loaded)
    for flag, key in (("rate", "rate"), ("input_len", "input_len"), ("output_len", "output_len"),
                      ("ttft_ms", "ttft_ms"), ("tpot_ms", "tpot_ms"), ("quantile", "quantile")):
        if getattr(args, flag) is not None:
            raw[key] = getattr(args, flag)
    for key, flag in (("ttft_ms", "--ttft-ms"), ("tpot_ms", "--tpot-ms")):
        if key not in raw:
            raise ValueError(f"{flag}: the latency target is required (or give it in --traffic FILE)")
    return Traffic.from_mapping(raw, where=args.traffic or "traffic")


def _model(args):
    from orchestrator.planner.model_shape import DTYPE_BYTES, ModelShape

    dtype_bytes = DTYPE_BYTES[args.dtype] if args.dtype else None
    if args.model:
        return ModelShape.from_dir(args.model, dtype_bytes=dtype_bytes)
    return ModelShape.from_preset(args.preset, dtype_bytes=dtype_bytes or 2)


def _offers(args):
    from orchestrator.planner.hardware import builtin_gpu, load_hardware
    from orchestrator.planner.search import GpuOffer

    offers = [GpuOffer(spec=builtin_gpu(name), count=count) for name, count in args.gpu]
    offers += [GpuOffer(spec=load_hardware(path), count=count) for path, count in args.hardware]
    if not offers:
        offers = [GpuOffer(spec=builtin_gpu("H200"))]
    names = [offer.spec.name for offer in offers]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ValueError(f"--gpu/--hardware: GPU type {', '.join(duplicated)} given twice; give each type once")
    return offers


def run_plan(args: argparse.Namespace, *, out=None, err=None) -> int:
    """Prints the candidates and the chosen plan; with --write, updates the cluster.yaml."""
    from mesh.config import ModelConfigError

    from orchestrator.config import ConfigError
    from orchestrator.planner.hardware import HardwareError
    from orchestrator.planner.report import format_plan
    from orchestrator.planner.search import PlanInfeasible, SearchOptions, plan
    from orchestrator.planner.write_config import write_plan

    out = out or sys.stdout
    err = err or sys.stderr
    try:
        model = _model(args)
        traffic = _traffic(args)
        offers = _offers(args)
        options = SearchOptions(
            max_gpus_per_replica=args.max_gpus_per_replica, max_batch_size=args.max_batch_size,
            kv_link_bytes_per_s=None if args.kv_link_gbps is None else args.kv_link_gbps * 1e9,
            step_overhead_s=args.step_overhead_ms / 1e3, is_layerwise=not args.no_layerwise)
    except (ValueError, ModelConfigError, HardwareError) as error:
        print(f"pdcluster plan: {error}", file=err)
        return EXIT_USAGE
    try:
        result = plan(model, traffic, offers, options)
    except PlanInfeasible as error:
        print(f"pdcluster plan: no deployment meets the targets ({error.constraint}): {error}", file=err)
        return EXIT_INFEASIBLE
    print(format_plan(result, top=args.top), file=out)
    if args.write:
        try:
            notes = write_plan(result, args.write, model_dir=args.model, dtype=args.dtype)
        except ConfigError as error:
            print(f"pdcluster plan: --write {args.write}: {error}", file=err)
            return EXIT_USAGE
        print(f"wrote the prefill and decode tiers to {args.write}", file=out)
        for note in notes:
            print(f"note: {note}", file=err)
    return 0


def add_calibrate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", "-o", default=DEFAULT_HARDWARE_FILE,
                        help=f"where to write the figures (default {DEFAULT_HARDWARE_FILE})")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--name", help="the GPU type's name in plans (default: the device's name)")
    parser.add_argument("--world-size", type=int, default=None,
                        help="processes for the collective measurements (default: every GPU; 1 on CPU = skip)")
    parser.add_argument("--quick", action="store_true", help="small sizes: seconds, rougher figures")
    parser.set_defaults(func=run_calibrate)


def run_calibrate(args: argparse.Namespace, *, out=None, err=None) -> int:
    from orchestrator.planner.calibrate import calibrate
    from orchestrator.planner.hardware import save_hardware

    out = out or sys.stdout
    err = err or sys.stderr
    try:
        spec = calibrate(device=args.device, name=args.name, world_size=args.world_size, is_quick=args.quick,
                         log=lambda line: print(f"  {line}", file=out, flush=True))
    except ValueError as error:
        print(f"pdcluster calibrate: {error}", file=err)
        return EXIT_USAGE
    save_hardware(spec, args.output)
    print(f"wrote {args.output} ({spec.name}); use it with `pdcluster plan --hardware {args.output}`", file=out)
    return 0
