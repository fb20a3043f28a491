"""DecodeEngine on the real tiny model, checked token for token against transformers' greedy generate.

The prompt's prefill is run here through CausalLM.forward with a layer_hook that copies each layer's K/V into the
reserved blocks: exactly what the KV transfer does between the tiers.
"""

import threading

import pytest
import torch

from decode_tier.block_pool import OutOfBlocks
from decode_tier.engine import DecodeEngine, StepOutput
from mesh.model import AttentionBatch, CausalLM
from mesh.presets import make_model
from mesh.sampling import SamplingParams, sample

BLOCK_SIZE = 4
NUM_BLOCKS = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("tiny-llama"), "tiny-llama")


@pytest.fixture(scope="module")
def model(model_dir):
    torch.manual_seed(0)
    return CausalLM.load(model_dir)


@pytest.fixture(scope="module")
def reference(model_dir):
    """(prompt, max_new_tokens) -> transformers' greedy tokens, computed once each."""
    from transformers import LlamaForCausalLM

    hf_model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cache: dict[tuple, list[int]] = {}

    def generate(prompt: list[int], max_new_tokens: int) -> list[int]:
        key = (tuple(prompt), max_new_tokens)
        if key not in cache:
            with torch.no_grad():
                out = hf_model.generate(
                    torch.tensor([prompt]),
                    attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=hf_model.config.eos_token_id,
                )
            cache[key] = out[0, len(prompt):].tolist()
        return cache[key]

    return generate


def make_engine(model, *, max_num_seqs=8, num_blocks=NUM_BLOCKS):
    return DecodeEngine(model, num_blocks=num_blocks, block_size=BLOCK_SIZE, max_num_seqs=max_num_seqs)


def make_prompt(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (length,), generator=generator).tolist()


def prefill_into(model, engine, requests):
    """requests: [(request_id, prompt, params, block_table)]. One batched plain prefill; the layer hook scatters
    each prompt's K/V into its blocks. Returns the first token of each request (sampled at output index 0)."""
    query_lens = [len(prompt) for _, prompt, _, _ in requests]
    input_ids = torch.tensor([t for _, prompt, _, _ in requests for t in prompt])
    positions = torch.cat([torch.arange(n) for n in query_lens])
    batch = AttentionBatch(
        query_lens=query_lens,
        context_lens=[0] * len(requests),
        block_tables=None,
        logits_indices=AttentionBatch.last_token_indices(query_lens),
    )
    slots = []
    for (_, prompt, _, table), n in zip(requests, query_lens):
        token_positions = torch.arange(n)
        slots.append((torch.tensor(table)[token_positions // BLOCK_SIZE], token_positions % BLOCK_SIZE))
    blocks = torch.cat([b for b, _ in slots])
    rows = torch.cat([r for _, r in slots])

    def copy_layer_kv(layer_index, k, v):
        engine.kv_cache[layer_index][blocks, 0, rows] = k
        engine.kv_cache[layer_index][blocks, 1, rows] = v

    logits = model(input_ids, positions, batch, None, layer_hook=copy_layer_kv)
    return sample(logits, [params for _, _, params, _ in requests], [0] * len(requests)).tolist()


def start(model, engine, specs):
    """specs: [(request_id, prompt, params)]: reserve, prefill, admit. Returns {request_id: [first token]} and the
    admit results."""
    requests = [(rid, prompt, params, engine.reserve(rid, len(prompt), params)) for rid, prompt, params in specs]
    first_tokens = prefill_into(model, engine, requests)
    streams, finishes = {}, {}
    for (rid, prompt, _, _), first in zip(requests, first_tokens):
        streams[rid] = [first]
        finishes[rid] = engine.admit(rid, prompt, first)
    return streams, finishes


def collect(streams, finish_reasons, outputs):
    for output in outputs:
        assert output.request_id not in finish_reasons, "a finished request produced another token"
        streams[output.request_id].append(output.token_id)
        if output.finish_reason is not None:
            finish_reasons[output.request_id] = output.finish_reason


@pytest.mark.parametrize("max_num_seqs", [8, 2])
def test_continuous_batching_matches_transformers_greedy(model, reference, max_num_seqs):
    engine = make_engine(model, max_num_seqs=max_num_seqs)
    # Different prompt lengths (spanning 1..4 blocks) and different max_tokens, so sequences leave at
    # different steps; "late" joins after three steps.
    specs = {
        "a": (make_prompt(5, 1), 7),
        "b": (make_prompt(9, 2), 12),
        "c": (make_prompt(3, 3), 4),
        "late": (make_prompt(14, 4), 9),
    }
    greedy = {rid: SamplingParams(max_tokens=max_tokens) for rid, (_, max_tokens) in specs.items()}

    streams, finishes = start(model, engine, [(rid, specs[rid][0], greedy[rid]) for rid in ("a", "b", "c")])
    assert all(result is None for result in finishes.values())
    assert engine.num_running == 3
    finish_reasons: dict[str, str] = {}
    num_steps = 0
    for _ in range(3):
        outputs = engine.step()
        assert len(outputs) == min(max_num_seqs, engine.num_running + sum(o.finish_reason is not None for o in outputs))
        collect(streams, finish_reasons, outputs)
        num_steps += 1
    late_streams, late_finish = start(model, engine, [("late", specs["late"][0], greedy["late"])])
    assert late_finish == {"late": None}
    streams.update(late_streams)
    while engine.has_work():
        outputs = engine.step()
        assert 1 <= len(outputs) <= max_num_seqs
        collect(streams, finish_reasons, outputs)
        num_steps += 1
        assert num_steps < 100

    for rid, (prompt, max_tokens) in specs.items():
        expected = reference(prompt, max_tokens)
        assert streams[rid] == expected, f"request {rid}"
        assert finish_reasons[rid] == ("length" if len(expected) == max_tokens else "stop")
    assert engine.num_free_blocks == NUM_BLOCKS
    assert engine.request_ids() == [] and engine.step() == []


def test_abort_frees_blocks_in_every_state(model):
    engine = make_engine(model)
    params = SamplingParams(max_tokens=10)
    start(model, engine, [("r1", make_prompt(6, 5), params), ("r2", make_prompt(7, 6), params)])
    engine.reserve("waiting", 8, params)
    engine.step()
    assert engine.num_free_blocks < NUM_BLOCKS
    assert (engine.num_running, engine.num_waiting_kv) == (2, 1)
    assert engine.abort("r1") is True
    assert [o.request_id for o in engine.step()] == ["r2"]
    assert engine.abort("waiting") is True and engine.abort("r2") is True
    assert engine.abort("r2") is False and engine.abort("unknown") is False
    assert engine.num_free_blocks == NUM_BLOCKS
    assert not engine.has_work() and engine.step() == []


def test_abort_while_waiting_for_kv(model):
    engine = make_engine(model)
    prompt = make_prompt(5, 7)
    engine.reserve("r", len(prompt), SamplingParams(max_tokens=4))
    assert engine.num_waiting_kv == 1
    assert engine.abort("r") is True
    assert engine.num_free_blocks == NUM_BLOCKS and engine.num_waiting_kv == 0
    with pytest.raises(KeyError, match="no reservation"):
        engine.admit("r", prompt, 1)


def test_stop_token_ends_the_stream(model, reference):
    prompt = make_prompt(6, 8)
    free_run = reference(prompt, 10)
    stop_token = free_run[3]
    expected = free_run[: free_run.index(stop_token) + 1]
    engine = make_engine(model)
    streams, finishes = start(model, engine, [("r", prompt, SamplingParams(max_tokens=10, stop_token_ids=(stop_token,)))])
    finish_reasons: dict[str, str] = {}
    while engine.has_work():
        collect(streams, finish_reasons, engine.step())
    assert streams["r"] == expected
    assert finish_reasons == {"r": "stop"}
    assert engine.num_free_blocks == NUM_BLOCKS


def test_max_tokens_one_finishes_at_admit(model, reference):
    prompt = make_prompt(5, 9)
    engine = make_engine(model)
    streams, finishes = start(model, engine, [("r", prompt, SamplingParams(max_tokens=1))])
    assert finishes["r"] == StepOutput("r", reference(prompt, 1)[0], "length")
    assert streams["r"] == reference(prompt, 1)
    assert engine.num_free_blocks == NUM_BLOCKS and not engine.has_work()
    assert engine.request_ids() == []


def test_out_of_blocks_reserve_is_clear_and_changes_nothing(model):
    engine = make_engine(model, num_blocks=8)
    engine.reserve("a", 10, SamplingParams(max_tokens=10))  # 20 slots -> 5 blocks
    with pytest.raises(OutOfBlocks, match=r"requested 4, free 3 of 8"):
        engine.reserve("b", 12, SamplingParams(max_tokens=4))
    assert engine.num_free_blocks == 3
    assert engine.request_ids() == ["a"]
    engine.reserve("b", 8, SamplingParams(max_tokens=4))  # the failed id can try again once it fits
    assert engine.num_free_blocks == 0


def test_duplicate_reserve_raises(model):
    engine = make_engine(model)
    engine.reserve("a", 4, SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="already has a reservation"):
        engine.reserve("a", 4, SamplingParams(max_tokens=2))


def test_kv_cache_shape_and_buffers(model):
    engine = make_engine(model, num_blocks=5)
    assert len(engine.kv_cache) == model.num_layers
    for layer_cache in engine.kv_cache:
        assert tuple(layer_cache.shape) == (5, 2, BLOCK_SIZE, model.num_kv_heads_local, model.head_dim)
        assert layer_cache.dtype == torch.float32
    assert engine.block_size == BLOCK_SIZE
    assert engine.num_total_blocks == 5


def test_seeded_sampling_does_not_depend_on_batch_neighbours(model):
    prompt = make_prompt(7, 10)
    seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=1234)

    def run(neighbours):
        engine = make_engine(model)
        specs = [("r", prompt, seeded)] + [
            (f"n{i}", make_prompt(4 + i, 20 + i), SamplingParams(max_tokens=3 + i, temperature=1.0))
            for i in range(neighbours)
        ]
        streams, _ = start(model, engine, specs)
        finish_reasons: dict[str, str] = {}
        while engine.has_work():
            collect(streams, finish_reasons, engine.step())
        return streams["r"]

    # Oracle: recompute the whole sequence without a cache each time; token i is drawn at output index i.
    expected = []
    for output_index in range(seeded.max_tokens):
        tokens = prompt + expected
        batch = AttentionBatch(query_lens=[len(tokens)], context_lens=[0], block_tables=None,
                               logits_indices=torch.tensor([len(tokens) - 1]))
        logits = model(torch.tensor(tokens), torch.arange(len(tokens)), batch, None)
        expected.append(int(sample(logits, [seeded], [output_index])[0]))

    alone = run(0)
    assert alone == expected
    assert run(3) == expected


def test_abort_during_running_step_is_deferred_and_output_dropped(model):
    """The event loop thread aborts (and reserves) while the worker thread is inside the forward: neither call
    waits for the forward, the aborted sequence's blocks stay held until the step ends, its output is dropped."""
    engine = make_engine(model)
    in_forward, may_finish = threading.Event(), threading.Event()
    real_run = engine.run

    def gated_run(plan):
        in_forward.set()
        assert may_finish.wait(timeout=30)
        return real_run(plan)

    engine.run = gated_run
    params = SamplingParams(max_tokens=10)
    start(model, engine, [("keep", make_prompt(5, 11), params), ("drop", make_prompt(6, 12), params)])
    num_free_before_step = engine.num_free_blocks
    results = {}
    worker = threading.Thread(target=lambda: results.setdefault("outputs", engine.step()))
    worker.start()
    assert in_forward.wait(timeout=30)
    assert engine.abort("drop") is True  # returns at once: the lock is not held during the forward
    assert engine.request_ids() == ["keep"] and engine.num_running == 1
    assert engine.num_free_blocks == num_free_before_step  # "drop"'s blocks are still being written
    engine.reserve("new", 4, SamplingParams(max_tokens=2))
    may_finish.set()
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert [o.request_id for o in results["outputs"]] == ["keep"]
    assert engine.num_free_blocks == num_free_before_step + 4 - 2  # "drop" freed (4 blocks), "new" took 2
    engine.abort("keep")
    engine.abort("new")
    assert engine.num_free_blocks == NUM_BLOCKS


def test_failed_forward_leaves_state_intact(model, reference):
    prompt = make_prompt(5, 13)
    engine = make_engine(model)
    streams, _ = start(model, engine, [("r", prompt, SamplingParams(max_tokens=5))])
    real_run = engine.run

    def failing_run(plan):
        raise RuntimeError("device lost")

    engine.run = failing_run
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step()
    engine.run = real_run
    finish_reasons: dict[str, str] = {}
    while engine.has_work():
        collect(streams, finish_reasons, engine.step())
    assert streams["r"] == reference(prompt, 5)
    assert engine.num_free_blocks == NUM_BLOCKS
