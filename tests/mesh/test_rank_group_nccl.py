"""The replica's rank group on two GPUs: NCCL for the model's collectives, the Gloo control channel beside it (the
same code path as on CPU). Rank 0 broadcasts each step, both ranks run a tensor-parallel forward on their shard,
rank 0 gathers the results: equal to the one-GPU model's greedy tokens."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from mesh.model import AttentionBatch, CausalLM
from mesh.parallel import MeshShape
from mesh.presets import make_model
from mesh.rank_group import Rendezvous, join_mesh, open_rendezvous

NUM_GPUS = 2
PROMPTS = ([5, 9, 200, 31, 7], [100, 3, 18, 64, 64, 2, 9])


def _greedy_steps(model: CausalLM, device: str, step) -> list[int]:
    ids = torch.tensor([t for p in step for t in p], device=device)
    lens = [len(p) for p in step]
    positions = torch.cat([torch.arange(n) for n in lens]).to(device)
    batch = AttentionBatch(lens, [0] * len(lens), None, AttentionBatch.last_token_indices(lens, device))
    return model(ids, positions, batch).argmax(-1).tolist()


def _rank_main(rank: int, model_dir: str, out_dir: str) -> None:
    torch.cuda.set_device(rank)
    device = f"cuda:{rank}"
    shared = Path(out_dir) / "rendezvous.json"
    store = None
    if rank == 0:
        rendezvous, store = open_rendezvous("127.0.0.1", NUM_GPUS, backend="nccl", timeout_s=120)
        shared.write_text(json.dumps({"port": rendezvous.port}))
    else:
        while not shared.exists() or not shared.read_text():
            time.sleep(0.05)
        rendezvous = Rendezvous(host="127.0.0.1", port=json.loads(shared.read_text())["port"],
                                world_size=NUM_GPUS, backend="nccl", timeout_s=120)
    group, dims = join_mesh(rendezvous, rank, MeshShape(tp=NUM_GPUS), store=store, device=device)
    model = CausalLM.load(model_dir, dims, device=device)
    tokens = []
    for step in ([list(PROMPTS[0])], [list(p) for p in PROMPTS], None):
        step = group.broadcast(step if rank == 0 else None)
        if step is None:
            break
        gathered = group.gather(_greedy_steps(model, device, step))
        if rank == 0:
            assert gathered[0] == gathered[1], gathered  # TP all-gathers the vocabulary: same logits everywhere
            tokens.append(gathered[0])
    if rank == 0:
        (Path(out_dir) / "tokens.json").write_text(json.dumps(tokens))
    group.close()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < NUM_GPUS, reason=f"needs {NUM_GPUS} CUDA GPUs")
def test_rank_group_drives_a_tensor_parallel_model_over_nccl(tmp_path):
    model_dir = str(make_model(tmp_path / "tiny-llama", "tiny-llama", seed=4))
    mp.spawn(_rank_main, args=(model_dir, str(tmp_path)), nprocs=NUM_GPUS, join=True)
    single = CausalLM.load(model_dir, device="cuda:0")
    expected = [_greedy_steps(single, "cuda:0", [list(PROMPTS[0])]),
                _greedy_steps(single, "cuda:0", [list(p) for p in PROMPTS])]
    assert json.loads((tmp_path / "tokens.json").read_text()) == expected
