"""Ring attention over NCCL on two GPUs: the same code path and the same random cases as the Gloo test."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.mesh.test_cp_ring_attention import _free_port, check_case

NUM_GPUS = 2
NUM_CASES = 40


def _worker(rank: int, port: int) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=NUM_GPUS,
                            device_id=torch.device("cuda", rank))
    try:
        for case in range(NUM_CASES):
            check_case(70_000 + case, NUM_GPUS, dist.group.WORLD, rank, device=f"cuda:{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < NUM_GPUS, reason=f"needs {NUM_GPUS} CUDA GPUs")
def test_ring_attention_matches_full_attention_on_nccl():
    mp.spawn(_worker, args=(_free_port(),), nprocs=NUM_GPUS, join=True)
