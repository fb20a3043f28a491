"""Communication accounting (mesh/comm.py): the bytes a real Gloo world counts while it runs CausalLM forwards equal,
exactly, the closed-form volumes of orchestrator/planner/volumes.py, for TP, PP and CP meshes and several
(L, h, t, p, Sp, Sd); plus the ledger's own rules and the per-group implementation hook, in one process.

The world runs in a fresh launcher process that forks its ranks (as tests/mesh/test_mesh_parallel_vs_hf.py does):
each scenario runs under a ledger on every rank, the ranks sum their ledgers (outside the ledger) and rank 0 writes
the replica's figures; the test compares them with the closed forms computed here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mesh import comm
from mesh.kv_cache import allocate_kv_cache
from mesh.model import AttentionBatch, CausalLM
from mesh.parallel import MeshShape, ParallelDims
from mesh.presets import make_model
from mesh.round_robin_kv import RoundRobinKVStore
from orchestrator.planner.model_shape import ModelShape
from orchestrator.planner.volumes import COMM_KINDS, request_volumes, step_volumes

BLOCK_SIZE = 4
MODELS = {  # name -> make_model overrides: two (L, h) pairs
    "L4h64": {},
    "L3h32": {"num_hidden_layers": 3, "hidden_size": 32, "intermediate_size": 64},
}
# (name, model, mesh degrees, what): "request" = prefill Sp then Sd - 1 decode steps on the same mesh (paged cache);
# "step" = one prefill step of several sequences (cp: ring attention); "store" = two CP turns through the store.
SCENARIOS = {
    2: [("tp2-request-7-4", "L4h64", {"tp": 2}, {"kind": "request", "prompt": 7, "output": 4}),
        ("tp2-request-3-6", "L3h32", {"tp": 2}, {"kind": "request", "prompt": 3, "output": 6}),
        ("pp2-request-9-3", "L3h32", {"pp": 2}, {"kind": "request", "prompt": 9, "output": 3}),
        ("pp2-request-4-2", "L4h64", {"pp": 2}, {"kind": "request", "prompt": 4, "output": 2}),
        ("tp2-batch", "L4h64", {"tp": 2}, {"kind": "step", "query_lens": [7, 5, 1], "cp_mode": "pass-kv"}),
        ("cp2-pass-kv", "L4h64", {"cp": 2}, {"kind": "step", "query_lens": [7, 5], "cp_mode": "pass-kv"}),
        ("cp2-pass-q", "L3h32", {"cp": 2}, {"kind": "step", "query_lens": [9, 4, 1], "cp_mode": "pass-q"}),
        ("cp2-store", "L4h64", {"cp": 2}, {"kind": "store", "turns": [6, 5], "cp_modes": ["pass-kv", "pass-q"]}),
        ("cp2-shares-kv", "L3h32", {"cp": 2}, {"kind": "shares", "turns": [[5, 8, 2], [3, 6, 7]],
                                               "cp_mode": "pass-kv"}),
        ("tp2-shares", "L4h64", {"tp": 2}, {"kind": "shares", "turns": [[4, 9], [2, 5]], "cp_mode": "pass-kv"})],
    4: [("tp2pp2-request-6-3", "L4h64", {"tp": 2, "pp": 2}, {"kind": "request", "prompt": 6, "output": 3}),
        ("tp4-request-5-2", "L3h32", {"tp": 4}, {"kind": "request", "prompt": 5, "output": 2}),
        ("cp2tp2-pass-kv", "L4h64", {"cp": 2, "tp": 2}, {"kind": "step", "query_lens": [9, 3],
                                                         "cp_mode": "pass-kv"}),
        ("cp2tp2-store", "L3h32", {"cp": 2, "tp": 2}, {"kind": "store", "turns": [5, 7],
                                                       "cp_modes": ["pass-q", "pass-kv"]}),
        ("cp2tp2-shares-q", "L4h64", {"cp": 2, "tp": 2}, {"kind": "shares", "turns": [[7, 3], [6, 9]],
                                                          "cp_mode": "pass-q"})],
}


# --- in one process: the ledger and the hook ------------------------------------------------------------------------

def test_kinds_are_the_planners():
    assert comm.COMM_KINDS == COMM_KINDS


def test_ledger_scopes_nest_and_count_nothing_outside(monkeypatch):
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, group=None: None)
    buffer = torch.zeros(3, 5, dtype=torch.bfloat16)  # 30 bytes
    comm.all_reduce(buffer, group=object(), kind="tp_allreduce")  # no ledger: nothing to count into
    with comm.ledger_scope() as outer:
        comm.all_reduce(buffer, group=object(), kind="tp_allreduce")
        with comm.ledger_scope() as inner:
            comm.all_reduce(buffer, group=object(), kind="cp_row_gather")
        comm.all_reduce(buffer, group=object(), kind="tp_allreduce")
    assert outer.nonzero() == {"tp_allreduce": 60}
    assert inner.nonzero() == {"cp_row_gather": 30} and inner.total == 30
    assert comm.active_ledger() is None


def test_unknown_kind_is_named():
    with pytest.raises(ValueError, match="'tp_all_reduce'"):
        comm.CommLedger().add("tp_all_reduce", 4)


def test_registered_group_impl_replaces_torch_and_is_still_counted(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.distributed called for a group with a registered implementation")

    monkeypatch.setattr(dist, "all_reduce", forbidden)
    monkeypatch.setattr(dist, "all_to_all_single", forbidden)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    group, calls = object(), []
    comm.register_group_impl(group, all_reduce=lambda t: (calls.append("ar"), t.mul_(2)),
                             all_to_all_single=lambda out, inp, out_splits, in_splits: (calls.append(in_splits),
                                                                                         out.copy_(inp)))
    try:
        x = torch.ones(4)
        with comm.ledger_scope() as ledger:
            comm.all_reduce(x, group=group, kind="tp_allreduce")
            out = torch.empty(3, 2)
            work = comm.all_to_all_single(out, torch.ones(3, 2), [1, 2], [2, 1], group=group, kind="ep_all_to_all",
                                          async_op=True)
        assert torch.equal(x, torch.full((4,), 2.0)) and work is None and torch.equal(out, torch.ones(3, 2))
        assert calls == ["ar", [2, 1]]
        # Rank 1 keeps its own split (1 row of 8 bytes); the 2 rows for rank 0 leave.
        assert ledger.nonzero() == {"tp_allreduce": 16, "ep_all_to_all": 16}
    finally:
        assert comm.unregister_group_impl(group)
    assert not comm.unregister_group_impl(group)
    with pytest.raises(ValueError, match="process group"):
        comm.register_group_impl(None, all_reduce=lambda t: None)
    with pytest.raises(TypeError, match="all_reduce"):
        comm.register_group_impl(group, all_reduce=3)


def test_broadcast_is_counted_on_its_source_only(monkeypatch):
    monkeypatch.setattr(dist, "broadcast", lambda tensor, group=None, group_src=None: None)
    for rank, expected in ((0, {}), (1, {"pp_send": 16})):
        monkeypatch.setattr(dist, "get_rank", lambda group=None, rank=rank: rank)
        with comm.ledger_scope() as ledger:
            comm.broadcast(torch.zeros(4), group=object(), group_src=1, kind="pp_send")
        assert ledger.nonzero() == expected


def test_attribution_is_exact_and_sums_to_the_ledger():
    step = {"tp_allreduce": 9 * 100, "tp_allgather": 3 * 64, "cp_ring": 7 * 11, "pp_send": 0}
    shares = comm.attribute(step, rows=[5, 3, 1], kv_rows=[4, 4, 3])
    assert shares == [{"tp_allreduce": 500, "tp_allgather": 64, "cp_ring": 28},
                      {"tp_allreduce": 300, "tp_allgather": 64, "cp_ring": 28},
                      {"tp_allreduce": 100, "tp_allgather": 64, "cp_ring": 21}]
    uneven = comm.split_exact(10, [1, 1, 1])
    assert sorted(uneven) == [3, 3, 4] and sum(uneven) == 10
    assert comm.split_exact(5, [0, 0]) in ([3, 2], [2, 3])
    assert comm.add_into({"pp_send": 1}, {"pp_send": 2, "cp_ring": 3}) == {"pp_send": 3, "cp_ring": 3}
    with pytest.raises(ValueError, match="kv_rows"):
        comm.attribute(step, rows=[1, 2], kv_rows=[1])


def test_request_tally_splits_steps_by_rows_and_stays_bounded():
    tally = comm.RequestTally(max_requests=2)
    step = comm.CommLedger()
    step.add("tp_allreduce", 300)
    step.add("tp_allgather", 40)
    tally.add_step(("a", "b"), (1, 1), step)  # a decode step: even split
    tally.add_step(("a", "c"), (1, 2), step)  # with a prompt chunk of 2 rows for c
    tally.add_step(("a",), (1,), comm.CommLedger())  # a one-rank step moves nothing but still counts
    assert tally.num_steps == 3
    assert tally.take("a") == {"tp_allreduce": 250, "tp_allgather": 40}
    assert tally.take("c") == {"tp_allreduce": 200, "tp_allgather": 20}
    assert tally.take("a") == {} and tally.take("b") == {}  # b was dropped (oldest beyond 2), a already taken
    with pytest.raises(ValueError, match="max_requests"):
        comm.RequestTally(max_requests=0)


# --- a real Gloo world ----------------------------------------------------------------------------------------------

def _counted(run) -> dict[str, int]:
    """Runs `run()` under a ledger on this rank; returns the replica's sum (a collective, outside the ledger)."""
    with comm.ledger_scope() as ledger:
        run()
    counts = torch.tensor([ledger.bytes_by_kind[kind] for kind in COMM_KINDS], dtype=torch.int64)
    dist.all_reduce(counts)
    return {kind: int(n) for kind, n in zip(COMM_KINDS, counts.tolist()) if n}


def _request(model: CausalLM, prompt: int, output: int) -> dict[str, dict[str, int]]:
    ids = torch.arange(1, prompt + 1) % model.config.vocab_size
    num_blocks = -(-(prompt + output) // BLOCK_SIZE)
    cache = allocate_kv_cache(model, num_blocks=num_blocks, block_size=BLOCK_SIZE)
    table = [list(range(num_blocks))]
    batch = AttentionBatch(query_lens=[prompt], context_lens=[0], block_tables=table,
                           logits_indices=torch.tensor([prompt - 1]))
    prefill = _counted(lambda: model(ids, torch.arange(prompt), batch, cache))
    decode: dict[str, int] = {}
    for step in range(output - 1):
        position = prompt + step
        batch = AttentionBatch(query_lens=[1], context_lens=[position], block_tables=table,
                               logits_indices=torch.tensor([0]))
        comm.add_into(decode, _counted(lambda: model(torch.tensor([7]), torch.tensor([position]), batch, cache)))
    return {"prefill": prefill, "decode": decode}


def _packed(query_lens: list[int], context_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.cat([torch.arange(n) + 3 * i for i, n in enumerate(query_lens)])
    positions = torch.cat([torch.arange(c, c + n) for n, c in zip(query_lens, context_lens)])
    return ids, positions


def _step(model: CausalLM, query_lens: list[int], cp_mode: str) -> dict[str, int]:
    ids, positions = _packed(query_lens, [0] * len(query_lens))
    batch = AttentionBatch(query_lens=query_lens, context_lens=[0] * len(query_lens), block_tables=None,
                           logits_indices=AttentionBatch.last_token_indices(query_lens, "cpu"))
    return _counted(lambda: model(ids, positions, batch, cp_mode=cp_mode))


def _store_turns(model: CausalLM, turns: list[int], cp_modes: list[str]) -> list[dict[str, int]]:
    store = RoundRobinKVStore.for_model(model)
    counted, context = [], 0
    for length, mode in zip(turns, cp_modes):
        ids, positions = _packed([length], [context])
        batch = AttentionBatch(query_lens=[length], context_lens=[context], block_tables=None,
                               logits_indices=torch.tensor([length - 1]), seq_keys=["s"])
        counted.append(_counted(lambda: model(ids, positions, batch, cp_mode=mode, cp_store=store)))
        context += length
    return counted


def _store_shares(model: CausalLM, turns: list[list[int]], cp_mode: str) -> list[list[dict[str, int]]]:
    """Two batched turns through the store; per turn, each sequence's share of the step (comm.attribute_step on
    every rank, summed over the ranks)."""
    store = RoundRobinKVStore.for_model(model)
    dims = model.dims
    contexts = [0] * len(turns[0])
    per_turn = []
    for query_lens in turns:
        ids, positions = _packed(query_lens, contexts)
        batch = AttentionBatch(query_lens=query_lens, context_lens=contexts, block_tables=None,
                               logits_indices=AttentionBatch.last_token_indices(query_lens, "cpu"),
                               seq_keys=list(range(len(query_lens))))
        with comm.ledger_scope() as ledger:
            model(ids, positions, batch, cp_mode=cp_mode, cp_store=store)
        shares = comm.attribute_step(ledger.nonzero(), query_lens=query_lens, context_lens=contexts,
                                     cp_size=dims.cp_size, cp_rank=dims.cp_rank, is_sharded=True)
        counts = torch.tensor([[share.get(kind, 0) for kind in COMM_KINDS] for share in shares], dtype=torch.int64)
        dist.all_reduce(counts)
        per_turn.append([{kind: int(n) for kind, n in zip(COMM_KINDS, row) if n} for row in counts.tolist()])
        contexts = [c + n for c, n in zip(contexts, query_lens)]
    return per_turn


def _worker(rank: int, port: int, world_size: int, model_dirs: dict, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=180))
    try:
        results = {}
        for name, model_name, degrees, what in SCENARIOS[world_size]:
            model = CausalLM.load(model_dirs[model_name], ParallelDims(MeshShape(**degrees), rank))
            with torch.inference_mode():
                if what["kind"] == "request":
                    results[name] = _request(model, what["prompt"], what["output"])
                elif what["kind"] == "step":
                    results[name] = _step(model, what["query_lens"], what["cp_mode"])
                elif what["kind"] == "shares":
                    results[name] = _store_shares(model, what["turns"], what["cp_mode"])
                else:
                    results[name] = _store_turns(model, what["turns"], what["cp_modes"])
        if rank == 0:
            (Path(out_dir) / "counted.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_world(world_size: int, model_dirs: dict, out_dir: str) -> None:
    torch.set_num_threads(1)
    mp.start_processes(_worker, args=(_free_port(), world_size, model_dirs, out_dir), nprocs=world_size, join=True,
                       start_method="fork")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return {name: str(make_model(tmp_path_factory.mktemp(name), "tiny-llama", seed=7, overrides=overrides))
            for name, overrides in MODELS.items()}


def _nonzero(volumes) -> dict[str, int]:
    as_ints = {kind: int(v) for kind, v in volumes.as_dict().items() if v}
    assert all(v == int(v) for v in volumes.as_dict().values()), volumes  # closed forms are whole bytes here
    return as_ints


@pytest.mark.slow
@pytest.mark.parametrize("world_size", sorted(SCENARIOS))
def test_counted_bytes_equal_the_closed_forms(world_size, model_dirs, tmp_path):
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    arguments = json.dumps({"world_size": world_size, "model_dirs": model_dirs, "out_dir": str(tmp_path)})
    launched = subprocess.run([sys.executable, __file__, arguments], env=env, capture_output=True, text=True,
                              timeout=400)
    assert launched.returncode == 0, f"world {world_size} failed:\n{launched.stderr[-6000:]}"
    counted = json.loads((tmp_path / "counted.json").read_text())
    for name, model_name, degrees, what in SCENARIOS[world_size]:
        shape = ModelShape.from_dir(model_dirs[model_name], dtype_bytes=4)
        mesh = MeshShape(**degrees)
        if what["kind"] == "request":
            expected = request_volumes(shape, mesh, mesh, prompt_len=what["prompt"], output_len=what["output"])
            assert counted[name] == {phase: _nonzero(v) for phase, v in expected.items()}, name
        elif what["kind"] == "step":
            expected = step_volumes(shape, mesh, query_lens=what["query_lens"], cp_mode=what["cp_mode"])
            assert counted[name] == _nonzero(expected), name
        elif what["kind"] == "shares":  # each sequence's share equals its own closed form, as if stepped alone
            contexts = [0] * len(what["turns"][0])
            for turn, query_lens in enumerate(what["turns"]):
                for seq, (length, context) in enumerate(zip(query_lens, contexts)):
                    expected = step_volumes(shape, mesh, query_lens=[length], context_lens=[context],
                                            cp_mode=what["cp_mode"], has_cp_store=True)
                    assert counted[name][turn][seq] == _nonzero(expected), f"{name} turn {turn} sequence {seq}"
                contexts = [c + n for c, n in zip(contexts, query_lens)]
        else:
            context = 0
            for turn, (length, mode) in enumerate(zip(what["turns"], what["cp_modes"])):
                expected = step_volumes(shape, mesh, query_lens=[length], context_lens=[context], cp_mode=mode,
                                        has_cp_store=True)
                assert counted[name][turn] == _nonzero(expected), f"{name} turn {turn}"
                context += length
        assert counted[name], f"{name}: nothing was counted"


if __name__ == "__main__":
    _launch_world(**json.loads(sys.argv[1]))
