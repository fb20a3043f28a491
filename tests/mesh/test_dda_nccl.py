"""Direct-access collectives on two GPUs against NCCL: random inputs of many sizes (4 KiB .. 64 MiB, odd element
counts too) and dtypes, outside and inside CUDA graphs, and thousands of back-to-back calls with different data each
(a missing barrier reads the previous call's data: a race shows as a wrong or moving result)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.mesh.test_cp_ring_attention import _free_port

NUM_GPUS = 2
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# bytes at bf16; odd element counts check the masked tails and uneven two-shot slices
SIZES = (4 << 10, (4 << 10) + 6, 16 << 10, 64 << 10, (200 << 10) + 30, 1 << 20, 16 << 20, 64 << 20)
BUFFER_BYTES = 256 << 20  # two halves of 128 MiB: the largest size in float32


def _random(num_elements: int, dtype: torch.dtype, seed: int, device: str) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(num_elements, generator=generator, device=device).to(dtype)


def _check_all_reduce_sizes(dda, rank: int, device: str, report: dict,
                            algorithms=("one-shot", "one-shot-barrier", "two-shot"), dtypes=DTYPES) -> None:
    for dtype in dtypes:
        for size in SIZES:
            num_elements = size // 2
            for algorithm in algorithms:
                data = _random(num_elements, dtype, seed=1000 * rank + size % 997, device=device)
                expected = data.clone()
                dist.all_reduce(expected)
                dda.all_reduce(data, algorithm)
                max_error = (data.float() - expected.float()).abs().max().item()
                report[f"all_reduce {algorithm} {dtype} {num_elements}"] = max_error
                # two ranks: one float32 add, rounded once, is what NCCL computes too
                assert torch.equal(data, expected), (algorithm, dtype, num_elements, max_error)


def _check_repeated_in_graph(dda, rank: int, device: str, report: dict,
                             cases=(("one-shot", 8192), ("one-shot", 131072), ("one-shot-barrier", 131072),
                                    ("two-shot", 131072 + 6), ("two-shot", 1 << 20))) -> None:
    """100 calls per graph on different data each, 20 replays with fresh data: 2000 calls checked one by one."""
    num_calls, num_replays = 100, 20
    for algorithm, num_elements in cases:
        sources = torch.empty(num_calls, num_elements, device=device)
        buffers = torch.empty(num_calls, num_elements, dtype=torch.bfloat16, device=device)
        for i in range(2):  # warm-up outside the capture
            buffers[i].copy_(sources[i])
            dda.all_reduce(buffers[i], algorithm)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(num_calls):
                buffers[i].copy_(sources[i])
                dda.all_reduce(buffers[i], algorithm)
        worst = 0.0
        for replay in range(num_replays):
            sources.copy_(torch.randn(num_calls, num_elements, device=device,
                                      generator=torch.Generator(device=device).manual_seed(rank * 7919 + replay)))
            expected = sources.to(torch.bfloat16)
            dist.all_reduce(expected)
            graph.replay()
            torch.cuda.synchronize()
            worst = max(worst, (buffers.float() - expected.float()).abs().max().item())
            assert torch.equal(buffers, expected), (algorithm, num_elements, replay, worst)
        report[f"graph x{num_calls * num_replays} {algorithm} {num_elements}"] = worst
        del graph


def _check_repeated_eager(dda, rank: int, device: str, report: dict) -> None:
    """2000 eager calls cycling through the low-latency one-shot, the barrier one-shot, two-shot and the all-to-all
    (they share the buffer halves and the epochs): each result checked."""
    worst = 0.0
    algorithms = ("one-shot", "two-shot", "one-shot-barrier")
    for i in range(2000):
        data = _random(4096 + (i % 7) * 8, torch.float16, seed=rank * 100_003 + i, device=device)
        if i % 4 == 3:
            expected = torch.empty_like(data)
            dist.all_to_all_single(expected, data)
            out = torch.full_like(data, 3)
            dda.all_to_all_single(out, data)
            assert torch.equal(out, expected), i
            continue
        expected = data.clone()
        dist.all_reduce(expected)
        dda.all_reduce(data, algorithms[i % 4])
        worst = max(worst, (data.float() - expected.float()).abs().max().item())
        assert torch.equal(data, expected), (i, worst)
    report["eager x2000 cycling"] = worst


def _check_all_to_all(dda, rank: int, device: str, report: dict,
                      dtypes=(torch.bfloat16, torch.float32, torch.int64)) -> None:
    for dtype in dtypes:
        for rows, hidden in ((8, 4096), (64, 4096), (256, 4096), (3, 7)):
            for uneven in (False, True):
                if uneven:  # rank s sends rank d  rows + 2 s + d  rows
                    send_splits = [rows + 2 * rank + peer for peer in range(NUM_GPUS)]
                    recv_splits = [rows + 2 * peer + rank for peer in range(NUM_GPUS)]
                else:
                    send_splits = recv_splits = None
                num_send = sum(send_splits) if uneven else rows * NUM_GPUS
                num_recv = sum(recv_splits) if uneven else rows * NUM_GPUS
                if dtype == torch.int64:
                    data = torch.randint(-2**40, 2**40, (num_send, hidden), device=device)
                else:
                    data = _random(num_send * hidden, dtype, seed=rank * 31 + rows, device=device).view(num_send,
                                                                                                         hidden)
                expected = torch.empty(num_recv, hidden, dtype=dtype, device=device)
                dist.all_to_all_single(expected, data, recv_splits, send_splits)
                out = torch.full_like(expected, 7)
                dda.all_to_all_single(out, data, recv_splits, send_splits)
                assert torch.equal(out, expected), (dtype, rows, hidden, uneven)
                report[f"all_to_all {dtype} {rows}x{hidden} uneven={uneven}"] = 0.0


def _check_install_and_comm(rank: int, device: str, report: dict) -> None:
    """The start-up sweep, then mesh.comm routes through the table; results still equal NCCL's."""
    from mesh import comm
    from mesh.collectives import install
    from mesh.collectives_config import CollectivesConfig

    group = dist.new_group(list(range(NUM_GPUS)), backend="nccl")
    collectives = install(group, CollectivesConfig())
    report["startup table"] = collectives.table.as_dict()
    assert collectives.dda is not None, collectives.fallback_reason
    for num_bytes in (8 << 10, 64 << 10, 512 << 10, 2 << 20, 16 << 20):
        data = _random(num_bytes // 2, torch.bfloat16, seed=rank + num_bytes, device=device)
        expected = data.clone()
        dist.all_reduce(expected, group=group)
        comm.all_reduce(data, group=group, kind="tp_allreduce")
        assert torch.equal(data, expected), num_bytes
    send = torch.randn(6, 512, device=device).to(torch.bfloat16)
    splits_in = [2 + rank, 4 - rank]  # rank 0 sends 2/4, rank 1 sends 3/3
    splits_out = [2, 3] if rank == 0 else [4, 3]
    expected = torch.empty(sum(splits_out), 512, dtype=torch.bfloat16, device=device)
    dist.all_to_all_single(expected, send, splits_out, splits_in, group=group)
    out = torch.empty_like(expected)
    comm.all_to_all_single(out, send, splits_out, splits_in, group=group, kind="ep_all_to_all")
    assert torch.equal(out, expected)
    report["calls by algorithm"] = collectives.calls_by_algorithm
    comm.unregister_group_impl(group)


def _worker(rank: int, port: int, out_dir: str) -> None:
    from mesh.dda import DirectAccessGroup

    torch.cuda.set_device(rank)
    device = f"cuda:{rank}"
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=NUM_GPUS,
                            device_id=torch.device("cuda", rank))
    report: dict = {}
    try:
        dda = DirectAccessGroup.create(dist.group.WORLD, buffer_bytes=BUFFER_BYTES)
        for check in (_check_all_reduce_sizes, _check_all_to_all, _check_repeated_eager, _check_repeated_in_graph):
            started = time.perf_counter()
            check(dda, rank, device, report)
            if rank == 0:  # progress, so a slow or stuck check shows which one it is
                print(f"{check.__name__}: passed in {time.perf_counter() - started:.1f} s", flush=True)
        _check_install_and_comm(rank, device, report)
        dist.barrier()
    finally:
        (Path(out_dir) / f"report{rank}.json").write_text(json.dumps(report, indent=1, default=str))
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < NUM_GPUS, reason=f"needs {NUM_GPUS} CUDA GPUs")
def test_direct_access_collectives_equal_nccl(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=NUM_GPUS, join=True)
    report = json.loads((tmp_path / "report0.json").read_text())
    assert report["startup table"]["one_shot_max_bytes"] >= 0
    print(json.dumps(report, indent=1))
