"""The GPU run of benchmarks/goodput.py: a Llama-3-8B-shape checkpoint with random bf16 weights, made fast.

    python -m benchmarks._goodput_gpu make-model models/llama-3-8b [--preset llama-3-8b]

`pdcluster make-model` draws every weight on the CPU in float32 (minutes for 8B parameters); here the draws run on
the GPU and only the bf16 bytes travel to the file. Same file layout and the same scales as mesh/presets.py
(linear std 1/sqrt(fan_in), norms near 1, untied embedding std 1), not the same numbers: a throughput benchmark
needs the shape and the scales, not the seed's exact values. Who calls it: the GPU command in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from mesh.checkpoint_writer import write_safetensors_streaming
from mesh.presets import PRESETS, tensor_specs


def make_gpu_model(path: Path, preset: str, *, seed: int = 0, device: str = "cuda") -> Path:
    config = dict(PRESETS[preset], torch_dtype="bfloat16")
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id")}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    specs = tensor_specs(config)
    kinds = {name: kind for name, _, kind in specs}
    generator = torch.Generator(device=device).manual_seed(seed)
    tied = config.get("tie_word_embeddings", False)

    def make_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        kind = kinds[name]
        if kind == "norm":
            noise = 1.0 + 0.05 * noise
        elif kind == "bias":
            noise = 0.1 * noise
        elif kind in ("linear", "lm_head"):
            noise = noise * shape[1] ** -0.5
        elif kind == "embedding" and tied:
            noise = noise * config["hidden_size"] ** -0.5 * 3.0
        return noise.to(torch.bfloat16).cpu()

    write_safetensors_streaming(path / "model.safetensors", [(n, s) for n, s, _ in specs], make_tensor,
                                torch.bfloat16)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-model")
    make.add_argument("dir")
    make.add_argument("--preset", default="llama-3-8b", choices=sorted(PRESETS))
    make.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    path = Path(args.dir)
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        print(f"{path}: already there", flush=True)
        return 0
    started = time.monotonic()
    make_gpu_model(path, args.preset, device=args.device)
    print(f"{path}: {args.preset} written in {time.monotonic() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
