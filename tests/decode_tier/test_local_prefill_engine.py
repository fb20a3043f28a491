"""Local prefill in the DecodeEngine on the real tiny model: prompts prefilled in chunks mixed into decode steps
give transformers' greedy tokens, seeded draws equal the disaggregated path's, and the pool is full afterwards.
Both step runners: the reference StepRunner (CausalLM) and the one-GPU path (GpuChunkedStepRunner around
GpuStepRunner) computed on the CPU with its plain-torch ops."""

import pytest
import torch

from decode_tier.engine import DecodeEngine, default_max_step_tokens
from decode_tier.gpu_chunked_runner import GpuChunkedStepRunner, sub_plan
from decode_tier.scheduler import DecodePlan
from mesh.model import AttentionBatch, CausalLM
from mesh.presets import make_model
from mesh.sampling import SamplingParams, sample

BLOCK_SIZE = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("tiny-llama"), "tiny-llama")


@pytest.fixture(scope="module")
def hf_greedy(model_dir):
    from transformers import LlamaForCausalLM

    hf_model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def generate(prompt: list[int], max_new_tokens: int) -> list[int]:
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    do_sample=False, max_new_tokens=max_new_tokens,
                                    pad_token_id=hf_model.config.eos_token_id)
        return out[0, len(prompt):].tolist()

    return generate


def make_prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, 256, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def make_engine(model_dir, *, runner: str, max_step_tokens: int, max_num_seqs: int = 4) -> DecodeEngine:
    model = CausalLM.load(model_dir)
    engine = DecodeEngine(model, num_blocks=64, block_size=BLOCK_SIZE, max_num_seqs=max_num_seqs,
                          max_step_tokens=max_step_tokens)
    if runner == "gpu-path":
        from mesh.gpu_step_runner import GpuStepRunner

        engine.runner = GpuChunkedStepRunner(GpuStepRunner(model, engine.kv_cache, max_num_seqs), engine.kv_cache)
    return engine


def run_to_end(engine, streams: dict[str, list[int]], on_step=None) -> dict[str, str]:
    finish_reasons: dict[str, str] = {}
    while engine.has_work():
        outputs = engine.step()
        if on_step is not None:
            on_step(outputs)
        for output in outputs:
            assert output.request_id not in finish_reasons
            streams[output.request_id].append(output.token_id)
            if output.finish_reason is not None:
                finish_reasons[output.request_id] = output.finish_reason
    return finish_reasons


def admit_prefilled(engine, request_id, prompt, params) -> int:
    """The disaggregated way in: a plain prefill writes the prompt's K/V into the reserved blocks (what the KV
    transfer does), then admit. Returns the first token."""
    model = engine.model
    table = engine.reserve(request_id, len(prompt), params)
    positions = torch.arange(len(prompt))
    blocks, rows = torch.tensor(table)[positions // BLOCK_SIZE], positions % BLOCK_SIZE

    def copy_layer_kv(layer_index, k, v):
        engine.kv_cache[layer_index][blocks, 0, rows] = k
        engine.kv_cache[layer_index][blocks, 1, rows] = v

    batch = AttentionBatch(query_lens=[len(prompt)], context_lens=[0], block_tables=None,
                           logits_indices=AttentionBatch.last_token_indices([len(prompt)]))
    logits = model(torch.tensor(prompt), positions, batch, None, layer_hook=copy_layer_kv)
    first = sample(logits, [params], [0]).tolist()[0]
    assert engine.admit(request_id, prompt, first) is None
    return first


@pytest.mark.parametrize("runner", ["reference", "gpu-path"])
def test_chunked_local_prefill_matches_transformers_while_a_stream_keeps_decoding(model_dir, hf_greedy, runner):
    engine = make_engine(model_dir, runner=runner, max_step_tokens=12)
    stream_prompt, long_prompt, short_prompt = make_prompt(6, 1), make_prompt(41, 2), make_prompt(3, 3)
    params = {"stream": SamplingParams(max_tokens=16, ignore_eos=True),
              "long": SamplingParams(max_tokens=8, ignore_eos=True),
              "short": SamplingParams(max_tokens=6, ignore_eos=True)}
    streams = {"stream": [admit_prefilled(engine, "stream", stream_prompt, params["stream"])], "long": [],
               "short": []}
    engine.add_prompt("long", long_prompt, params["long"])
    engine.add_prompt("short", short_prompt, params["short"])
    assert engine.num_prefilling == 2 and engine.num_queued_prompt_tokens == 44
    per_step: list[set[str]] = []
    finish_reasons = run_to_end(engine, streams, lambda outputs: per_step.append({o.request_id for o in outputs}))
    # 41 + 3 prompt tokens at <= 11 per step next to the stream's decode token: the long prompt takes 4 steps
    # (short rides along in the 4th), and the stream got a token in every one of them.
    first_long = next(i for i, ids in enumerate(per_step) if "long" in ids)
    assert first_long == 3
    assert all("stream" in ids for ids in per_step[:first_long + 1])
    for request_id, prompt in (("stream", stream_prompt), ("long", long_prompt), ("short", short_prompt)):
        assert streams[request_id] == hf_greedy(prompt, params[request_id].max_tokens), request_id
        assert finish_reasons[request_id] == "length"
    assert engine.num_free_blocks == engine.num_total_blocks


@pytest.mark.parametrize("runner", ["reference", "gpu-path"])
def test_prompts_sharing_a_small_budget_get_one_token_and_partial_chunks(model_dir, hf_greedy, runner):
    # A 5-token budget, one running stream: p (3) fits whole, q (5) gets what is left: 1 token (fresh, samples
    # nothing), then 3 against its cached token, then its last token alone (a one-row chunk that samples, which the
    # GPU path runs as a decode row), next to r (2, fresh).
    engine = make_engine(model_dir, runner=runner, max_step_tokens=5, max_num_seqs=4)
    params = SamplingParams(max_tokens=6)  # eos ends a stream here as it ends transformers' generate
    prompts = {"s": make_prompt(4, 20), "p": make_prompt(3, 21), "q": make_prompt(5, 22), "r": make_prompt(2, 23)}
    streams = {"s": [admit_prefilled(engine, "s", prompts["s"], params)]}
    for rid in "pqr":
        engine.add_prompt(rid, prompts[rid], params)
        streams[rid] = []
    plans = []
    original_run = engine.runner.run

    def recording_run(plan, **kwargs):
        plans.append(plan)
        return original_run(plan, **kwargs)

    engine.runner.run = recording_run
    run_to_end(engine, streams)

    def shape(plan, rid):
        i = plan.request_ids.index(rid)
        return plan.query_lens[i], plan.context_lens[i], plan.is_sampled[i]

    assert [shape(plan, "q") for plan in plans[:3]] == [(1, 0, False), (3, 1, False), (1, 4, True)]
    assert shape(plans[0], "p") == (3, 0, True) and shape(plans[2], "r") == (2, 0, True)
    for rid, prompt in prompts.items():
        assert streams[rid] == hf_greedy(prompt, 6), rid
    assert engine.num_free_blocks == engine.num_total_blocks


@pytest.mark.parametrize("runner", ["reference", "gpu-path"])
def test_seeded_local_prefill_equals_the_disaggregated_stream_and_resumes_with_output_offset(model_dir, runner):
    engine = make_engine(model_dir, runner=runner, max_step_tokens=8)
    prompt = make_prompt(19, 7)
    params = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=1234, ignore_eos=True)
    via_transfer = {"t": [admit_prefilled(engine, "t", prompt, params)]}
    run_to_end(engine, via_transfer)
    local = {"l": []}
    engine.add_prompt("l", prompt, params)
    run_to_end(engine, local)
    assert local["l"] == via_transfer["t"] and len(local["l"]) == 10
    # A retry re-prefills prompt + the 4 tokens already sent, with output_offset 4: the same continuation.
    sent = local["l"][:4]
    retry = {"r": []}
    engine.add_prompt("r", prompt + sent, SamplingParams(max_tokens=6, temperature=0.8, top_p=0.9, seed=1234,
                                                          ignore_eos=True, output_offset=4))
    run_to_end(engine, retry)
    assert retry["r"] == local["l"][4:]
    assert engine.num_free_blocks == engine.num_total_blocks


def test_abort_mid_prefill_frees_blocks_and_others_continue(model_dir, hf_greedy):
    engine = make_engine(model_dir, runner="reference", max_step_tokens=8)
    prompt = make_prompt(5, 11)
    engine.add_prompt("gone", make_prompt(30, 10), SamplingParams(max_tokens=4))
    engine.add_prompt("kept", prompt, SamplingParams(max_tokens=5, ignore_eos=True))
    engine.step()  # "gone" takes the whole budget
    assert engine.abort("gone") and engine.num_prefilling == 1
    streams = {"kept": []}
    run_to_end(engine, streams)
    assert streams["kept"] == hf_greedy(prompt, 5)
    assert engine.num_free_blocks == engine.num_total_blocks


def test_default_budget_depends_on_the_device_and_leaves_room_for_chunks():
    assert default_max_step_tokens("cpu", 64) == 512
    assert default_max_step_tokens("cuda", 64) == 2048
    assert default_max_step_tokens("cpu", 400) == 800


def test_sub_plan_keeps_each_sequences_own_tokens():
    plan = DecodePlan(request_ids=("a", "b", "c"), input_token_ids=(1, 20, 21, 22, 3),
                      positions=(9, 0, 1, 2, 4), context_lens=(9, 0, 4), block_tables=((0, 1, 2), (3,), (4, 5)),
                      params=("pa", "pb", "pc"), output_indices=(3, 0, 1), query_lens=(1, 3, 1),
                      is_sampled=(True, False, True))
    part = sub_plan(plan, [2, 1])
    assert part.request_ids == ("c", "b") and part.input_token_ids == (3, 20, 21, 22)
    assert part.positions == (4, 0, 1, 2) and part.query_lens == (1, 3) and part.is_sampled == (True, False)
    assert part.block_tables == ((4, 5), (3,)) and part.params == ("pc", "pb")
