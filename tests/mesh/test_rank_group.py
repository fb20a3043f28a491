"""The replica's rank group over real processes: rank 0 opens the rendezvous on an OS-chosen port, the others join
through it; the control channel broadcasts rank 0's step objects and gathers every rank's results; the mesh's own
groups (ParallelDims) are built on top and work."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mesh.parallel import MeshShape
from mesh.rank_group import Rendezvous, join_mesh, open_rendezvous

WORLD = 3


def _rank_main(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    shared = Path(out_dir) / "rendezvous.json"
    shape = MeshShape(tp=WORLD)
    store = None
    if rank == 0:
        rendezvous, store = open_rendezvous("127.0.0.1", WORLD, timeout_s=60)
        shared.write_text(json.dumps({"host": rendezvous.host, "port": rendezvous.port}))
    else:
        deadline = time.monotonic() + 60
        while not shared.exists() or not shared.read_text():
            assert time.monotonic() < deadline, "rank 0 never published the rendezvous"
            time.sleep(0.05)
        where = json.loads(shared.read_text())
        rendezvous = Rendezvous(host=where["host"], port=where["port"], world_size=WORLD, timeout_s=60)
    group, dims = join_mesh(rendezvous, rank, shape, store=store)
    results = {}
    # Rank 0 drives: two steps, then a result from rank 2 broadcast to everyone, then a stop.
    for step in ({"step": 1, "ids": [4, 5]}, {"step": 2, "ids": []}):
        got = group.broadcast(step if rank == 0 else None)
        results[f"step{got['step']}"] = got
        gathered = group.gather({"rank": rank, "n": len(got["ids"])})
        if rank == 0:
            results[f"gathered{got['step']}"] = gathered
        else:
            assert gathered is None
    results["from2"] = group.broadcast([rank * 10] if rank == 2 else None, src=2)
    # The mesh's tensor-parallel group works next to the control channel.
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value, group=dims.tp_group)
    results["tp_sum"] = float(value)
    results["tp_rank"] = dims.tp_rank
    assert group.broadcast(None) is None  # the stop
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
    group.close()


@pytest.mark.slow
def test_rank_group_broadcasts_gathers_and_carries_the_mesh(tmp_path):
    mp.spawn(_rank_main, args=(str(tmp_path),), nprocs=WORLD, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for rank, result in enumerate(results):
        assert result["step1"] == {"step": 1, "ids": [4, 5]} and result["step2"] == {"step": 2, "ids": []}
        assert result["from2"] == [20]
        assert result["tp_sum"] == 6.0 and result["tp_rank"] == rank
    assert results[0]["gathered1"] == [{"rank": r, "n": 2} for r in range(WORLD)]
    assert results[0]["gathered2"] == [{"rank": r, "n": 0} for r in range(WORLD)]


def test_single_rank_mesh_needs_no_rendezvous():
    group, dims = join_mesh(None, 0, MeshShape())
    assert group is None and dims.world_size == 1 and dims.tp_group is None
    assert not dist.is_initialized()


def test_rendezvous_is_validated():
    with pytest.raises(ValueError, match="port"):
        Rendezvous(host="127.0.0.1", port=0, world_size=2)
    with pytest.raises(ValueError, match="backend"):
        Rendezvous(host="127.0.0.1", port=1234, world_size=2, backend="mpi")
    with pytest.raises(ValueError, match="needs a rendezvous"):
        join_mesh(None, 0, MeshShape(tp=2))
