"""Tensor parallelism over a real gloo process group (2 CPU processes) gives the one-rank model's numbers: the
layers' explicit groups, shard loading and collectives are exercised end to end, KV heads split (llama, qwen2)
or replicated (mistral: 1 KV head on 2 ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mesh.kv_cache import allocate_kv_cache
from mesh.model import AttentionBatch, CausalLM
from mesh.parallel import MeshShape, ParallelDims
from mesh.presets import make_model

TP_SIZE = 2
PRESETS = ("tiny-llama", "tiny-qwen2", "tiny-mistral")
BLOCK_SIZE = 4
TABLES = [[3, 8, 1, 6, 10], [0, 9, 4, 2, 7]]


def _scenario(model: CausalLM) -> dict:
    """A packed prefill without cache, then a paged prefill and five batched greedy decode steps."""
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (n,), generator=generator) for n in (7, 4)]
    lens = [len(p) for p in prompts]
    ids, positions = torch.cat(prompts), torch.cat([torch.arange(n) for n in lens])
    plain = model(ids, positions, AttentionBatch(lens, [0, 0], None, torch.arange(sum(lens))))
    cache = allocate_kv_cache(model, 11, BLOCK_SIZE)
    logits = model(ids, positions, AttentionBatch(lens, [0, 0], TABLES, AttentionBatch.last_token_indices(lens)),
                   cache)
    tokens, context = [logits.argmax(-1)], list(lens)
    for _ in range(5):
        logits = model(tokens[-1], torch.tensor(context), AttentionBatch([1, 1], context, TABLES, torch.arange(2)),
                       cache)
        tokens.append(logits.argmax(-1))
        context = [c + 1 for c in context]
    return {"plain": plain, "last_logits": logits, "tokens": torch.stack(tokens), "cache": cache}


def _worker(rank: int, init_file: str, model_dirs: dict[str, str], out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=TP_SIZE)
    try:
        dims = ParallelDims(MeshShape(tp=TP_SIZE), rank)
        assert dims.tp_group is not None and dims.tp_rank == rank and dims.cp_group is None
        for name, path in model_dirs.items():
            torch.save(_scenario(CausalLM.load(path, dims)), Path(out_dir) / f"{name}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_tensor_parallel_matches_single_rank(tmp_path):
    model_dirs = {name: str(make_model(tmp_path / name, name, seed=9)) for name in PRESETS}
    # A fresh launcher process imports torch once and forks the ranks (no rank pays the import; no thread of the
    # test process is forked).
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    arguments = json.dumps([str(tmp_path / "rendezvous"), model_dirs, str(tmp_path)])
    launched = subprocess.run([sys.executable, __file__, arguments], env=env, capture_output=True, text=True,
                              timeout=300)
    assert launched.returncode == 0, launched.stderr[-6000:]
    for name, path in model_dirs.items():
        single_model = CausalLM.load(path)
        single = _scenario(single_model)
        kv_heads = single_model.config.num_kv_heads
        for rank in range(TP_SIZE):
            sharded = torch.load(Path(tmp_path) / f"{name}-rank{rank}.pt")
            for key in ("plain", "last_logits"):
                error = (sharded[key] - single[key]).abs().max() / single[key].abs().max()
                assert error < 1e-5, (name, rank, key)
            assert torch.equal(sharded["tokens"], single["tokens"]), name
            # Each rank caches its own KV heads: a split when tp <= kv heads, the shared head when replicated.
            heads_local = max(1, kv_heads // TP_SIZE)
            first_head = (rank * min(TP_SIZE, kv_heads) // TP_SIZE) * heads_local
            for layer, layer_cache in enumerate(sharded["cache"]):
                expected = single["cache"][layer][:, :, :, first_head:first_head + heads_local]
                torch.testing.assert_close(layer_cache, expected, rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
    torch.set_num_threads(1)
    mp.start_processes(_worker, args=tuple(json.loads(sys.argv[1])), nprocs=TP_SIZE, join=True, start_method="fork")
