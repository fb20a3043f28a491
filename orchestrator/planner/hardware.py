"""What one accelerator (and its links) can do: the ceilings the cost model divides by.

Who calls it: `orchestrator.planner.cli` resolves `--gpu NAME` against `BUILTIN_GPUS` and `--hardware FILE` with
`load_hardware`; `pdcluster calibrate` writes such a file with `save_hardware`. The cost model only reads a
`GpuSpec`. Promise: every figure is an achievable rate (what a program measured, or a datasheet peak scaled by the
efficiency the project measured on its own H200), never a raw datasheet peak, and `source` says which.

Units are SI throughout: bytes, bytes per second, FLOP per second, seconds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

FILE_FORMAT = "pdcluster-hardware/1"

# Figures of one link or unit, all of which the cost model needs (order = file order).
RATE_FIELDS = ("matmul_flops", "attention_flops", "hbm_bytes_per_s", "p2p_bytes_per_s",
               "allreduce_bus_bytes_per_s", "kv_link_bytes_per_s", "host_link_bytes_per_s",
               "internode_bytes_per_s")


class HardwareError(ValueError):
    """A hardware file or GPU name the planner cannot use; the message names the field or the known names."""


@dataclass(frozen=True, kw_only=True)
class GpuSpec:
    name: str
    memory_bytes: int  # device memory as the driver reports it
    matmul_flops: float  # dense bf16/fp16 matrix products, achievable
    attention_flops: float  # fused (flash) causal attention, achievable
    hbm_bytes_per_s: float  # device memory copy, bytes read + written per second (what decode streams)
    p2p_bytes_per_s: float  # one GPU to a neighbour in the same node (NCCL send/recv)
    allreduce_bus_bytes_per_s: float  # NCCL all-reduce bus bandwidth (nccl-tests' busbw) inside a node
    collective_latency_s: float  # fixed cost of one small collective or send (launch + synchronisation)
    kv_link_bytes_per_s: float  # prefill GPU -> decode GPU over the KV transport (UCX)
    host_link_bytes_per_s: float  # pinned host <-> device
    internode_bytes_per_s: float  # per GPU to another node (pipeline hand-offs that leave the node)
    gpus_per_node: int = 8  # size of the NVLink (or PCIe) domain: tensor parallelism stays inside it
    # Fixed time of one GPU kernel run back to back with others (launch, ramp-up, tail), added to its data time;
    # an engine step runs many small kernels, so at small batches this is a visible share of the step.
    kernel_latency_s: float = 0.0
    accelerator_type: str | None = None  # Ray's accelerator_type resource name (None: do not constrain placement)
    is_gpu: bool = True
    source: str = ""  # where the figures come from: "measured ..." or "datasheet ... x efficiency"
    measured: tuple[str, ...] = ()  # the fields a program measured; the others are derived or assumed

    def __post_init__(self) -> None:
        if not self.name:
            raise HardwareError("name: must not be empty")
        if not isinstance(self.memory_bytes, int) or isinstance(self.memory_bytes, bool) or self.memory_bytes <= 0:
            raise HardwareError(f"{self.name}: memory_bytes must be a positive integer, got {self.memory_bytes!r}")
        for field in RATE_FIELDS + ("collective_latency_s", "kernel_latency_s"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise HardwareError(f"{self.name}: {field} must be a finite number, got {value!r}")
            if value <= 0 and field not in ("collective_latency_s", "kernel_latency_s"):
                raise HardwareError(f"{self.name}: {field} must be > 0 (a measured rate), got {value!r}")
            if value < 0:
                raise HardwareError(f"{self.name}: {field} must be >= 0, got {value!r}")
        if not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 1:
            raise HardwareError(f"{self.name}: gpus_per_node must be an integer >= 1, got {self.gpus_per_node!r}")
        unknown = set(self.measured) - set(RATE_FIELDS) - {"collective_latency_s", "kernel_latency_s", "memory_bytes"}
        if unknown:
            raise HardwareError(f"{self.name}: measured names unknown fields {sorted(unknown)}")

    @property
    def is_measured(self) -> bool:
        return bool(self.measured)


# --- The built-in table -------------------------------------------------------------------------------------------
# H200: measured on the project's 2 x H200 machine (DESIGN.md "Ceilings", 2026-11-21).
_H200_DATASHEET = {"bf16_flops": 989.5e12, "hbm_bytes_per_s": 4.8e12, "nvlink_bytes_per_s": 450e9}
H200 = GpuSpec(
    name="H200",
    memory_bytes=143771 * 2**20,  # nvidia-smi on the project's H200s
    matmul_flops=790e12,
    attention_flops=600e12,
    hbm_bytes_per_s=4.22e12,
    p2p_bytes_per_s=341e9,
    allreduce_bus_bytes_per_s=303e9,
    collective_latency_s=100e-6,
    kv_link_bytes_per_s=350e9,  # ucxx over cuda_ipc, GPU0 -> GPU1, two processes
    host_link_bytes_per_s=55e9,
    internode_bytes_per_s=40e9,  # assumed: one 400 Gb/s NIC per GPU at 80%; not measured here
    gpus_per_node=8,
    # benchmarks/results/engine_speed_notes.md: an empty kernel in a CUDA graph 1.7 us, the small fused kernels of
    # a decode layer (add + RMSNorm, rotary + cache write, SiLU * up) 1.9-2.3 us with almost no data.
    kernel_latency_s=2e-6,
    accelerator_type="H200",
    source="measured on the project's 2 x H200 machine (2026-11-21); internode link assumed",
    measured=("memory_bytes", "matmul_flops", "attention_flops", "hbm_bytes_per_s", "p2p_bytes_per_s",
              "allreduce_bus_bytes_per_s", "collective_latency_s", "kv_link_bytes_per_s", "host_link_bytes_per_s",
              "kernel_latency_s"),
)

# Measured / datasheet on the same H200: applied to the other GPUs' datasheet peaks.
EFFICIENCY = {
    "matmul": H200.matmul_flops / _H200_DATASHEET["bf16_flops"],  # 0.80
    "attention": H200.attention_flops / _H200_DATASHEET["bf16_flops"],  # 0.61
    "hbm": H200.hbm_bytes_per_s / _H200_DATASHEET["hbm_bytes_per_s"],  # 0.88
    "p2p": H200.p2p_bytes_per_s / _H200_DATASHEET["nvlink_bytes_per_s"],  # 0.76
    "allreduce": H200.allreduce_bus_bytes_per_s / _H200_DATASHEET["nvlink_bytes_per_s"],  # 0.67
    "kv_link": H200.kv_link_bytes_per_s / _H200_DATASHEET["nvlink_bytes_per_s"],  # 0.78
}


def datasheet_gpu(*, name: str, memory_bytes: int, bf16_flops: float, hbm_bytes_per_s: float,
                  link_bytes_per_s: float, host_link_bytes_per_s: float, accelerator_type: str,
                  link_name: str) -> GpuSpec:
    """A GPU from its datasheet peaks (`link_bytes_per_s`: one direction of the intra-node link) scaled by the
    efficiencies measured on the project's H200."""
    e = EFFICIENCY
    return GpuSpec(
        name=name,
        memory_bytes=memory_bytes,
        matmul_flops=bf16_flops * e["matmul"],
        attention_flops=bf16_flops * e["attention"],
        hbm_bytes_per_s=hbm_bytes_per_s * e["hbm"],
        p2p_bytes_per_s=link_bytes_per_s * e["p2p"],
        allreduce_bus_bytes_per_s=link_bytes_per_s * e["allreduce"],
        collective_latency_s=H200.collective_latency_s,
        kernel_latency_s=H200.kernel_latency_s,
        kv_link_bytes_per_s=link_bytes_per_s * e["kv_link"],
        host_link_bytes_per_s=host_link_bytes_per_s * 0.8,
        internode_bytes_per_s=H200.internode_bytes_per_s,
        gpus_per_node=8,
        accelerator_type=accelerator_type,
        source=(f"datasheet-derived, not measured: bf16 {bf16_flops / 1e12:.0f} TFLOP/s, memory "
                f"{hbm_bytes_per_s / 1e12:.2f} TB/s, {link_name} {link_bytes_per_s / 1e9:.0f} GB/s per direction, "
                "scaled by the efficiencies measured on the project's H200"),
        measured=(),
    )


H100_SXM = datasheet_gpu(name="H100-SXM", memory_bytes=81559 * 2**20, bf16_flops=989.5e12, hbm_bytes_per_s=3.35e12,
                         link_bytes_per_s=450e9, host_link_bytes_per_s=64e9, accelerator_type="H100",
                         link_name="NVLink 4")
A100_80GB = datasheet_gpu(name="A100-80GB", memory_bytes=81920 * 2**20, bf16_flops=312e12,
                          hbm_bytes_per_s=2.039e12, link_bytes_per_s=300e9, host_link_bytes_per_s=32e9,
                          accelerator_type="A100-80G", link_name="NVLink 3")
# No NVLink: GPU to GPU goes over PCIe Gen4 x16 (32 GB/s per direction).
L40S = datasheet_gpu(name="L40S", memory_bytes=46068 * 2**20, bf16_flops=362e12, hbm_bytes_per_s=0.864e12,
                     link_bytes_per_s=32e9, host_link_bytes_per_s=32e9, accelerator_type="L40S",
                     link_name="PCIe Gen4 x16")

BUILTIN_GPUS: dict[str, GpuSpec] = {spec.name: spec for spec in (H200, H100_SXM, A100_80GB, L40S)}
_ALIASES = {"h100": "H100-SXM", "h100-80gb": "H100-SXM", "a100": "A100-80GB", "a100-80g": "A100-80GB",
            "h200-141gb": "H200"}


def builtin_gpu(name: str) -> GpuSpec:
    """The built-in entry for `name` (case-insensitive; H100 means H100-SXM, A100 means A100-80GB)."""
    by_lower = {key.lower(): key for key in BUILTIN_GPUS}
    key = by_lower.get(name.lower()) or _ALIASES.get(name.lower())
    if key is None:
        raise HardwareError(f"unknown GPU {name!r}; built-in: {', '.join(BUILTIN_GPUS)} "
                            "(or measure yours with `pdcluster calibrate` and pass --hardware FILE)")
    return BUILTIN_GPUS[key]


# --- The calibration file -----------------------------------------------------------------------------------------

def spec_to_dict(spec: GpuSpec) -> dict:
    raw = {"format": FILE_FORMAT}
    raw.update(dataclasses.asdict(spec))
    raw["measured"] = list(spec.measured)
    return raw


def spec_from_dict(raw: dict, *, where: str = "hardware file") -> GpuSpec:
    if not isinstance(raw, dict):
        raise HardwareError(f"{where}: expected a JSON object")
    if raw.get("format") != FILE_FORMAT:
        raise HardwareError(f"{where}: format: expected {FILE_FORMAT!r}, got {raw.get('format')!r} "
                            "(write the file with `pdcluster calibrate`)")
    fields = {f.name for f in dataclasses.fields(GpuSpec)}
    unknown = sorted(set(raw) - fields - {"format"})
    if unknown:
        raise HardwareError(f"{where}: unknown keys {unknown}; known: {sorted(fields)}")
    required = {f.name for f in dataclasses.fields(GpuSpec)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - set(raw))
    if missing:
        raise HardwareError(f"{where}: missing keys {missing}")
    values = {key: value for key, value in raw.items() if key != "format"}
    values["measured"] = tuple(values.get("measured", ()))
    try:
        return GpuSpec(**values)
    except HardwareError as error:
        raise HardwareError(f"{where}: {error}") from None
    except TypeError as error:
        raise HardwareError(f"{where}: {error}") from None


def save_hardware(spec: GpuSpec, path: str | os.PathLike) -> Path:
    """Writes `spec` as JSON (what `pdcluster calibrate` produces and `--hardware` reads)."""
    file = Path(path)
    file.write_text(json.dumps(spec_to_dict(spec), indent=2) + "\n")
    return file


def load_hardware(path: str | os.PathLike) -> GpuSpec:
    """Reads a file written by `save_hardware`; HardwareError names the file and the bad key."""
    file = Path(path)
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError:
        raise HardwareError(f"hardware file {str(file)!r} does not exist") from None
    except json.JSONDecodeError as error:
        raise HardwareError(f"hardware file {str(file)!r} is not valid JSON: {error}") from None
    return spec_from_dict(raw, where=f"hardware file {str(file)!r}")
