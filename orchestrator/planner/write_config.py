"""`pdcluster plan --write FILE`: put the chosen tiers into a cluster.yaml.

Who calls it: `orchestrator.planner.cli.run_plan`. Promise: an existing FILE is first validated with
`orchestrator.config.load_config` (a problem outside the keys the plan replaces is raised as that `ConfigError`);
then only `prefill` / `decode` `replicas`, `mesh` and `resources` change (`min_replicas` / `max_replicas` widen
if the planned count falls outside them; custom resources are kept) and every other key keeps its value and its
place. A missing FILE starts from the embedded default cluster.yaml. Comments are not preserved (PyYAML cannot
round-trip them); a header line says the file was written by the planner. The written file is loaded back with
`load_config`, and any problem is returned as a warning, not hidden.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from orchestrator.config import ConfigError, default_config_path, load_config
from orchestrator.planner.search import Plan, TierPlan

# Keys the plan sets: a problem in one of these in the existing file does not matter, the plan replaces them.
_REPLACED_KEYS = ("replicas", "min_replicas", "max_replicas", "mesh", "resources")
_CONFIG_DTYPES = ("float32", "bfloat16", "float16")
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class _Inline(dict):
    """A mapping written on one line ({tp: 2, cp: 1, ...}), as the embedded cluster.yaml writes meshes."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Inline, lambda dumper, data: dumper.represent_mapping(
    "tag:yaml.org,2002:map", data.items(), flow_style=True))


def _tier_resources(tier: TierPlan, existing: dict | None) -> dict:
    gpu = tier.candidate.gpu
    kept = {key: value for key, value in (existing or {}).items()
            if key not in ("num_cpus", "num_gpus", "accelerator_type")}
    resources: dict = {"num_cpus": 1.0}
    if gpu.is_gpu:
        resources["num_gpus"] = 1.0
        if gpu.accelerator_type:
            resources["accelerator_type"] = gpu.accelerator_type
    resources.update(kept)
    return resources


def _update_tier(raw_tier: dict, tier: TierPlan, notes: list[str], name: str) -> dict:
    mesh = tier.candidate.mesh
    updated = dict(raw_tier)
    updated["replicas"] = tier.replicas
    if isinstance(updated.get("max_replicas"), int) and updated["max_replicas"] < tier.replicas:
        notes.append(f"{name}.max_replicas raised from {updated['max_replicas']} to {tier.replicas}")
        updated["max_replicas"] = tier.replicas
    if isinstance(updated.get("min_replicas"), int) and updated["min_replicas"] > tier.replicas:
        notes.append(f"{name}.min_replicas lowered from {updated['min_replicas']} to {tier.replicas}")
        updated["min_replicas"] = tier.replicas
    updated["mesh"] = _Inline(tp=mesh.tp, cp=mesh.cp, pp=mesh.pp, ep=mesh.ep)
    existing = raw_tier.get("resources") if isinstance(raw_tier.get("resources"), dict) else None
    updated["resources"] = _Inline(_tier_resources(tier, existing))
    return updated


def _validate_existing(path: Path) -> None:
    try:
        load_config(path)
    except ConfigError as error:
        tier, _, key = error.key.partition(".")
        if tier in ("prefill", "decode") and key.split(".")[0] in _REPLACED_KEYS:
            return  # the plan overwrites that key
        raise


def write_plan(plan: Plan, path: str | os.PathLike, *, model_dir: str | None = None,
               dtype: str | None = None) -> list[str]:
    """Writes the plan's tiers into `path`; returns notes (bounds widened, load problems of the result). For a new
    file, `model_dir` and `dtype` (the planned model) fill the model section."""
    file = Path(path)
    notes: list[str] = []
    if file.exists():
        _validate_existing(file)
        raw = yaml.safe_load(file.read_text()) or {}
        written_dtype = (raw.get("model") or {}).get("dtype", "float32")
        if _DTYPE_BYTES.get(written_dtype) not in (None, plan.model.dtype_bytes):
            notes.append(f"model.dtype in {file.name} is {written_dtype}, but the plan assumed "
                         f"{plan.model.dtype_bytes}-byte weights; plan again with --dtype {written_dtype} "
                         "or change model.dtype")
    else:
        raw = yaml.safe_load(default_config_path().read_text())
        model = dict(raw.get("model") or {})
        if model_dir is not None:
            model["path"] = model_dir
            model.pop("preset", None)
        if dtype in _CONFIG_DTYPES:
            model["dtype"] = dtype
        raw["model"] = model
    for name, tier in (("prefill", plan.prefill), ("decode", plan.decode)):
        current = raw.get(name) if isinstance(raw.get(name), dict) else {}
        raw[name] = _update_tier(current, tier, notes, name)
    header = (f"# Tiers written by `pdcluster plan` for {plan.model.name}: {plan.traffic.describe()}; "
              f"{plan.total_gpus} GPUs.\n")
    # SafeDumper with one extra representer (inline meshes): plain data only, key order kept.
    file.write_text(header + yaml.dump(raw, Dumper=_Dumper, sort_keys=False, default_flow_style=False))
    try:
        load_config(file)
    except ConfigError as error:
        notes.append(f"the written file does not load in this release: {error}")
    return notes
