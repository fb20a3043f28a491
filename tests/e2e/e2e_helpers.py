"""Helpers for end-to-end tests (cluster configs, model directories, the transformers oracle)."""

from __future__ import annotations

import dataclasses
import threading

from orchestrator.client import Client
from orchestrator.config import load_config


def cluster_config(model_dir, **tier_overrides):
    """The embedded default cluster, pointed at `model_dir`, router on a free port, small KV pool."""
    config = load_config()  # the embedded default: what `pdcluster serve` runs
    decode = dataclasses.replace(config.decode, num_kv_blocks=tier_overrides.pop("num_kv_blocks", 64),
                                 block_size=tier_overrides.pop("block_size", 8))
    return dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, path=str(model_dir), preset=None, name=model_dir.name),
        router=dataclasses.replace(config.router, port=0, **tier_overrides.pop("router", {})),
        decode=decode,
        kv_transfer=dataclasses.replace(config.kv_transfer, **tier_overrides.pop("kv_transfer", {})),
    )


def make_model_dir(tmp_path_factory, preset: str):
    from mesh.presets import make_model

    path = tmp_path_factory.mktemp(preset) / preset
    make_model(path, preset=preset, seed=0)
    return path


def hf_greedy(model_dir, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Hugging Face transformers' own generate on the same weights (float32, CPU): the correctness oracle.
    Returns the new tokens of each prompt, cut before the first end-of-sequence token (which pdcluster does not
    stream)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=0)
        new = out[0, len(prompt):].tolist()
        cut = next((i for i, t in enumerate(new) if t in eos), len(new))
        outputs.append(new[:cut])
    return outputs


def _without_nulls(value):
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value


def config_yaml(config) -> str:
    """A validated ClusterConfig back as cluster.yaml text (what a user would edit and `pdcluster apply`)."""
    import yaml

    raw = _without_nulls(dataclasses.asdict(config))  # null in cluster.yaml means "unset": leave those keys out
    raw.pop("source", None)
    for tier in ("prefill", "decode"):
        raw[tier].pop("name", None)
    for key in ("prefix_cache", "prefix_routing"):  # prefill-only sections
        raw["decode"].pop(key, None)
    for tier in ("prefill", "decode"):  # autoscale targets are written as `<metric>_p<N>_ms: limit` keys
        autoscale = raw[tier].get("autoscale")
        if autoscale:
            for target in getattr(config, tier).autoscale.targets:
                autoscale[target.key] = target.limit_ms
            del autoscale["targets"]
    if config.is_colocated:  # no prefill tier, and the router prefills nothing elsewhere
        raw.pop("prefill")
        raw["router"].pop("disaggregation", None)
    router = raw["router"]
    auth = {"tokens_file": router.pop("tokens_file", None)}
    tls = {k: router.pop(f"tls_{k}", None) for k in ("cert", "key", "client_ca")}
    if auth["tokens_file"]:
        router["auth"] = auth
    if tls["cert"]:
        router["tls"] = {k: v for k, v in tls.items() if v}
    return yaml.safe_dump(raw, sort_keys=False)


def generate_concurrently(address: str, prompts: list[list[int]], **options) -> list[tuple[list[int], object]]:
    """Send every prompt at once (so prefill batches and decode steps are shared); (tokens, last chunk) each."""
    results: list = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    errors: list = []

    def run(i: int) -> None:
        try:
            with Client(address) as client:
                barrier.wait()  # all requests in flight together, so prefill batches and decode steps are shared
                tokens, last = [], None
                for chunk in client.generate(token_ids=prompts[i], **options):
                    tokens.extend(chunk.token_ids)
                    last = chunk
                results[i] = (tokens, last)
        except Exception as exc:  # reported by the assertion below
            errors.append(f"request {i}: {exc!r}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r is not None for r in results), f"a request did not complete: {errors}"
    return results
