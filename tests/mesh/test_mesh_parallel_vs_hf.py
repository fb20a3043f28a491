"""Every parallel dimension of CausalLM against transformers, float32 on CPU over Gloo: tp, cp, pp, ep and mixes,
for a Llama and a Mixtral tiny model.

Per layout, on every rank at once (one spawned world per world size runs many layouts, so process start-up is
paid once per world):
1. A packed prefill of three prompts (lengths that do not divide by 2 * cp), logits of every row: relative error
   <= 1e-4 against transformers' full-prompt logits. pp > 1 runs it as two pipelined micro-batches.
2. Greedy generation of NUM_NEW_TOKENS tokens, identical to transformers' greedy continuation:
   - cp == 1: prefill into a paged cache, then batched decode steps (micro-batched when pp > 1);
   - cp > 1 (and one cp == 1 layout through the same store): the prompt prefilled in two turns through a
     RoundRobinKVStore: turn 1 its first half, turn 2 (a partial prefill) only the rest against the stored prefix,
     whose logits must equal the full-prompt ones. The store is then gathered into a paged cache on every rank
     (what the KV transfer does) and decoding continues on the same mesh, each cp rank computing every token
     (the cp-replicated step).
   The layer hook is checked on the way: global layer indices, and on cp-sharded steps the K/V rows it gets are
   exactly the ones that land in the store at the positions its CPHookRows name.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mesh.kv_cache import allocate_kv_cache
from mesh.model import AttentionBatch, CausalLM
from mesh.parallel import MeshShape, ParallelDims
from mesh.pipeline import MicroBatch, broadcast_logits, forward_micro_batched, run_pipeline
from mesh.round_robin_kv import RoundRobinKVStore

NUM_NEW_TOKENS = 6
PROMPT_LENS = (11, 5, 8)
BLOCK_SIZE = 4
MODEL_VARIANTS = {"llama": "tiny-llama", "mixtral": "tiny-mixtral", "qwen2": "tiny-qwen2"}  # qwen2: tied head
MIN_GREEDY_MARGIN = 1e-3  # reference top-1 vs top-2 logit gap: greedy equality must not hinge on rounding


@dataclass(frozen=True)
class Layout:
    model: str  # key of MODEL_VARIANTS
    tp: int = 1
    cp: int = 1
    pp: int = 1
    ep: int = 1
    # cp_mode of the plain prefill, of turn 1 and of turn 2 (the partial prefill).
    cp_modes: tuple[str, str, str] = ("auto", "pass-kv", "pass-q")
    use_store: bool = False  # cp == 1: prefill through a RoundRobinKVStore anyway

    @property
    def shape(self) -> MeshShape:
        return MeshShape(tp=self.tp, cp=self.cp, pp=self.pp, ep=self.ep)

    @property
    def name(self) -> str:
        degrees = "x".join(f"{axis}{getattr(self, axis)}" for axis in ("pp", "cp", "tp", "ep")
                           if getattr(self, axis) > 1) or "single"
        return f"{self.model}-{degrees}{'-store' if self.use_store else ''}"


WORLDS: dict[int, list[Layout]] = {
    2: [Layout("llama", tp=2), Layout("llama", cp=2, cp_modes=("pass-q", "pass-q", "pass-kv")),
        Layout("llama", pp=2), Layout("mixtral", tp=2), Layout("mixtral", tp=2, ep=2),
        Layout("mixtral", cp=2, ep=2), Layout("mixtral", pp=2), Layout("qwen2", pp=2)],
    3: [Layout("llama", cp=3), Layout("mixtral", cp=3, cp_modes=("pass-kv", "pass-q", "auto"))],
    4: [Layout("llama", tp=4), Layout("llama", cp=2, tp=2), Layout("llama", pp=2, tp=2),
        Layout("llama", pp=2, cp=2, cp_modes=("pass-kv", "pass-kv", "pass-q")),
        Layout("mixtral", tp=4, ep=4), Layout("mixtral", cp=2, tp=2, ep=4), Layout("mixtral", pp=2, cp=2, ep=2),
        Layout("mixtral", pp=2, tp=2)],
    8: [Layout("llama", pp=2, cp=2, tp=2), Layout("mixtral", pp=2, cp=2, tp=2, ep=4)],
}
SINGLE_RANK = [Layout("llama"), Layout("mixtral"), Layout("llama", use_store=True),
               Layout("mixtral", use_store=True, cp_modes=("pass-q", "pass-q", "pass-q"))]


# ---- the scenario every rank of a layout runs ----------------------------------------------------------------------

def _relative_error(ours: torch.Tensor, expected: torch.Tensor) -> float:
    return ((ours - expected).abs().max() / expected.abs().max()).item()


def _check_logits(model: CausalLM, logits: torch.Tensor | None, expected: list[torch.Tensor], what: str) -> None:
    """`expected`: per sequence, the reference rows the step's logits (packed in sequence order) must match."""
    if not model.dims.is_last_stage:
        assert logits is None, f"{what}: a stage before the last returned logits"
        return
    assert logits is not None and logits.dtype == torch.float32, what
    start = 0
    for seq, rows in enumerate(expected):
        error = _relative_error(logits[start:start + rows.shape[0]], rows)
        assert error <= 1e-4, f"{what}: sequence {seq} relative error {error:.3g}"
        start += rows.shape[0]
    assert start == logits.shape[0], what


def _block_tables(num_tokens: list[int]) -> tuple[int, list[list[int]]]:
    """Interleaved, non-contiguous block ids per sequence."""
    needed = [-(-n // BLOCK_SIZE) for n in num_tokens]
    num_blocks = sum(needed) + 2
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(3)).tolist()
    tables, start = [], 0
    for n in needed:
        tables.append(order[start:start + n])
        start += n
    return num_blocks, tables


def _forward(model: CausalLM, ids, positions, batch, cache=None, **kwargs):
    """A whole-batch forward, as two pipelined micro-batches when there are stages to keep busy."""
    if model.dims.pp_size > 1 and "layer_hook" not in kwargs:
        return forward_micro_batched(model, ids, positions, batch, cache, num_micro_batches=2, **kwargs)
    return model(ids, positions, batch, cache, **kwargs)


def _prefill_two_turns(model: CausalLM, layout: Layout, prompts: list[torch.Tensor], reference: dict,
                       cache: list[torch.Tensor], tables: list[list[int]]) -> torch.Tensor | None:
    """Turns 1 and 2 through a RoundRobinKVStore; fills the paged cache from it; returns turn 2's last-row logits."""
    dims = model.dims
    store = RoundRobinKVStore.for_model(model)
    keys = [f"request-{i}" for i in range(len(prompts))]
    lens = [len(p) for p in prompts]
    split = [n // 2 for n in lens]
    rest = [n - s for n, s in zip(lens, split)]
    turn1 = AttentionBatch(split, [0] * len(lens), None, AttentionBatch.last_token_indices(split), seq_keys=keys)
    logits = _forward(model, torch.cat([p[:s] for p, s in zip(prompts, split)]),
                      torch.cat([torch.arange(s) for s in split]), turn1, cp_mode=layout.cp_modes[1], cp_store=store)
    _check_logits(model, logits, [rows[s - 1:s] for rows, s in zip(reference["logits"], split)], "turn 1")
    assert [store.num_tokens(k) for k in keys] == split
    hooked = []
    turn2 = AttentionBatch(rest, split, None, torch.arange(sum(rest)), seq_keys=keys)
    logits = model(torch.cat([p[s:] for p, s in zip(prompts, split)]),
                   torch.cat([torch.arange(s, n) for s, n in zip(split, lens)]), turn2,
                   layer_hook=lambda *args: hooked.append(args), cp_mode=layout.cp_modes[2], cp_store=store)
    _check_logits(model, logits, [rows[s:] for rows, s in zip(reference["logits"], split)], "turn 2 (partial)")
    assert [store.num_tokens(k) for k in keys] == lens
    gathered = [store.gather(key, dims.cp_group) for key in keys]  # per sequence, per stage layer: (k, v)
    for seq, (table, per_layer) in enumerate(zip(tables, gathered)):
        blocks = torch.tensor([table[p // BLOCK_SIZE] for p in range(lens[seq])])
        rows = torch.arange(lens[seq]) % BLOCK_SIZE
        for layer_cache, (k, v) in zip(cache, per_layer):
            layer_cache[blocks, 0, rows] = k
            layer_cache[blocks, 1, rows] = v
    assert [args[0] for args in hooked] == list(model.layer_range), "hook: global layer indices of this stage"
    for layer, k, v, rows in hooked:
        assert k.shape == v.shape == (rows.positions.numel(), model.num_kv_heads_local, model.head_dim)
        local = layer - model.layer_range.start
        for i, (seq, position) in enumerate(zip(rows.seq_ids.tolist(), rows.positions.tolist())):
            stored_k, stored_v = gathered[seq][local]
            assert torch.equal(k[i], stored_k[position]) and torch.equal(v[i], stored_v[position]), "hook rows"
    if logits is None:
        return None
    return logits[AttentionBatch.last_token_indices(rest)]


def run_scenario(model: CausalLM, reference: dict, layout: Layout) -> None:
    dims = model.dims
    prompts = [torch.tensor(p) for p in reference["prompts"]]
    lens = [len(p) for p in prompts]
    ids, positions = torch.cat(prompts), torch.cat([torch.arange(n) for n in lens])
    num_seqs = len(prompts)

    # 1. Plain packed prefill, every row's logits.
    hooked = []
    kwargs = {} if dims.pp_size > 1 else {"layer_hook": lambda *args: hooked.append(args)}
    plain = AttentionBatch(lens, [0] * num_seqs, None, torch.arange(sum(lens)))
    logits = _forward(model, ids, positions, plain, cp_mode=layout.cp_modes[0], **kwargs)
    _check_logits(model, logits, reference["logits"], "plain prefill")
    if kwargs:
        assert [args[0] for args in hooked] == list(model.layer_range)
        assert all(len(args) == (4 if dims.cp_size > 1 else 3) for args in hooked), "hook arity"

    # 2. Prefill into a cache, then greedy decode from a paged cache.
    num_blocks, tables = _block_tables([n + NUM_NEW_TOKENS for n in lens])
    cache = allocate_kv_cache(model, num_blocks, BLOCK_SIZE)
    if dims.cp_size > 1 or layout.use_store:
        last = _prefill_two_turns(model, layout, prompts, reference, cache, tables)
    else:
        batch = AttentionBatch(lens, [0] * num_seqs, tables, AttentionBatch.last_token_indices(lens))
        last = _forward(model, ids, positions, batch, cache)
    tokens = broadcast_logits(model, last, num_seqs).argmax(-1)
    outputs = [[int(t)] for t in tokens]
    context = list(lens)
    for _ in range(NUM_NEW_TOKENS - 1):
        batch = AttentionBatch([1] * num_seqs, context, tables, torch.arange(num_seqs))
        logits = _forward(model, tokens, torch.tensor(context), batch, cache)
        tokens = broadcast_logits(model, logits, num_seqs).argmax(-1)
        for out, t in zip(outputs, tokens):
            out.append(int(t))
        context = [c + 1 for c in context]
    assert outputs == reference["greedy"], f"greedy tokens {outputs} != transformers {reference['greedy']}"


def check_pipeline_overlap(model: CausalLM, reference: dict, stage_seconds: float = 0.3) -> None:
    """pp == 2, three micro-batches, each stage slowed to `stage_seconds` per micro-batch (a sleep in its first
    layer's hook). Pipelined, stage 0 starts micro-batch m + 1 while stage 1 still works on m; in lock step it
    would wait for stage 1 to finish m. Timestamps come from CLOCK_MONOTONIC, shared by the processes of a host."""
    dims = model.dims
    prompts = [torch.tensor(p) for p in reference["prompts"]]
    starts, ends = {}, {}

    def hook_for(index: int):
        def hook(layer, k, v):
            if layer == model.layer_range.start:
                starts[index] = time.monotonic()
                time.sleep(stage_seconds)
            if layer == model.layer_range.stop - 1:
                ends[index] = time.monotonic()
        return hook

    micro_batches = [MicroBatch(p, torch.arange(len(p)), AttentionBatch([len(p)], [0], None, torch.tensor([0])),
                                hook_for(i)) for i, p in enumerate(prompts)]
    run_pipeline(model, micro_batches)
    timelines = [None] * dims.world_size
    dist.all_gather_object(timelines, (dims.pp_rank, starts, ends))
    first = next(t for t in timelines if t[0] == 0)
    last = next(t for t in timelines if t[0] == 1)
    for m in range(len(prompts) - 1):
        assert first[1][m + 1] < last[2][m], f"stage 0 waited for stage 1 to finish micro-batch {m}: {timelines}"
        assert last[1][m] < first[2][m + 1], f"stage 1 idle while stage 0 ran micro-batch {m + 1}: {timelines}"


# ---- reference and process plumbing --------------------------------------------------------------------------------

def _reference(hf_model, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 512, (n,), generator=generator) for n in PROMPT_LENS]
    logits, greedy, margins = [], [], []
    with torch.no_grad():
        for prompt in prompts:
            logits.append(hf_model(prompt[None]).logits[0].float())
            sequence, out = prompt, []
            for _ in range(NUM_NEW_TOKENS):
                last = hf_model(sequence[None]).logits[0, -1]
                top = last.topk(2).values
                margins.append((top[0] - top[1]).item())
                out.append(int(last.argmax()))
                sequence = torch.cat([sequence, last.argmax()[None]])
            greedy.append(out)
    assert min(margins) > MIN_GREEDY_MARGIN, f"seed {seed}: a greedy step is a near-tie ({min(margins):.2g})"
    return {"prompts": [p.tolist() for p in prompts], "logits": logits, "greedy": greedy}


@pytest.fixture(scope="module")
def references(model_dir, hf_model, tmp_path_factory):
    """(model directories, path of the saved references) shared by every world."""
    dirs = {name: str(model_dir(variant)) for name, variant in MODEL_VARIANTS.items()}
    refs = {name: _reference(hf_model(variant), seed=5) for name, variant in MODEL_VARIANTS.items()}
    path = tmp_path_factory.mktemp("mesh-references") / "references.pt"
    torch.save(refs, path)
    return dirs, refs, path


def _worker(rank: int, port: int, world_size: int, model_dirs: dict, reference_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                           timeout=timedelta(seconds=180))
    try:
        references = torch.load(reference_path)
        done = []
        for layout in WORLDS[world_size]:
            start = time.perf_counter()
            dims = ParallelDims(layout.shape, rank)
            model = CausalLM.load(model_dirs[layout.model], dims)
            try:
                run_scenario(model, references[layout.model], layout)
            except AssertionError as error:
                raise AssertionError(f"layout {layout.name}, rank {rank}: {error}") from None
            done.append([layout.name, round(time.perf_counter() - start, 2)])
        if world_size == 2:
            start = time.perf_counter()
            model = CausalLM.load(model_dirs["llama"], ParallelDims(MeshShape(pp=2), rank))
            check_pipeline_overlap(model, references["llama"])
            done.append(["pipeline-overlap", round(time.perf_counter() - start, 2)])
        dist.barrier()
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(done))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_world(world_size: int, model_dirs: dict, reference_path: str, out_dir: str) -> None:
    """Runs in a fresh launcher process (see the test): it imports torch once and forks the ranks, so no rank pays
    the import, and no thread of the test process (Ray, gRPC) is ever forked."""
    torch.set_num_threads(1)
    mp.start_processes(_worker, args=(_free_port(), world_size, model_dirs, reference_path, out_dir),
                       nprocs=world_size, join=True, start_method="fork")


@pytest.mark.parametrize("layout", SINGLE_RANK, ids=lambda layout: layout.name)
def test_single_rank_scenario_matches_transformers(layout, references):
    dirs, refs, _ = references
    run_scenario(CausalLM.load(dirs[layout.model]), refs[layout.model], layout)


@pytest.mark.slow
@pytest.mark.parametrize("world_size", sorted(WORLDS))
def test_layouts_match_transformers(world_size, references, tmp_path):
    dirs, _, reference_path = references
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    arguments = json.dumps({"world_size": world_size, "model_dirs": dirs, "reference_path": str(reference_path),
                            "out_dir": str(tmp_path)})
    launched = subprocess.run([sys.executable, __file__, arguments], env=env, capture_output=True, text=True,
                              timeout=400)
    assert launched.returncode == 0, f"world {world_size} failed:\n{launched.stderr[-6000:]}"
    expected = [layout.name for layout in WORLDS[world_size]] + (["pipeline-overlap"] if world_size == 2 else [])
    for rank in range(world_size):
        done = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert [name for name, _ in done] == expected, f"rank {rank} checked {done}"
    print(f"world {world_size}: " + ", ".join(f"{name} {seconds}s" for name, seconds in done))


if __name__ == "__main__":
    _launch_world(**json.loads(sys.argv[1]))
