"""DecodeScheduler's local prefill: the step token budget, decode tokens first, prompt chunks in the rest.

No model: the engine's forward is replaced by chosen sampled tokens, as in test_decode_scheduler.py.
"""

from dataclasses import dataclass

import pytest

from decode_tier.block_pool import OutOfBlocks
from decode_tier.scheduler import DecodePlan, DecodeScheduler, FinishReason, SchedulerConfig, StepOutput

EOS = 2


@dataclass(frozen=True, kw_only=True)
class Params:
    """The fields of mesh.sampling.SamplingParams that the scheduler reads."""

    max_tokens: int
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


def make_scheduler(*, max_step_tokens=16, max_num_seqs=4, num_blocks=64, block_size=4, max_model_len=256):
    return DecodeScheduler(SchedulerConfig(num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                                           max_model_len=max_model_len, eos_token_ids=(EOS,),
                                           max_step_tokens=max_step_tokens))


def run_step(scheduler, token=10) -> tuple[DecodePlan | None, list[StepOutput]]:
    plan = scheduler.schedule()
    if plan is None:
        return None, []
    return plan, scheduler.postprocess(plan, [token] * len(plan))


def admit_running(scheduler, request_id, num_prompt_tokens=3, max_tokens=10):
    scheduler.reserve(request_id, num_prompt_tokens, Params(max_tokens=max_tokens))
    assert scheduler.admit(request_id, list(range(num_prompt_tokens)), 10) is None


def test_short_prompt_prefills_in_one_step_and_samples_its_first_token():
    scheduler = make_scheduler(block_size=4)
    prompt = [5, 6, 7, 8, 9]
    block_ids = scheduler.add_prompt("a", prompt, Params(max_tokens=3))
    assert (scheduler.num_prefilling, scheduler.num_waiting_kv, scheduler.num_running) == (1, 0, 0)
    assert scheduler.num_queued_prompt_tokens == 5 and scheduler.has_work()
    plan = scheduler.schedule()
    assert plan.input_token_ids == tuple(prompt) and plan.positions == (0, 1, 2, 3, 4)
    assert plan.query_lens == (5,) and plan.context_lens == (0,) and plan.is_sampled == (True,)
    assert plan.output_indices == (0,)  # the first token: the same draw as the prefill tier's
    assert plan.block_tables == (tuple(block_ids[:2]),)  # 5 tokens in blocks of 4
    assert not plan.is_decode_only
    assert scheduler.postprocess(plan, [42]) == [StepOutput("a", 42, None)]
    assert (scheduler.num_prefilling, scheduler.num_running) == (0, 1)
    plan = scheduler.schedule()  # from now on a plain decode row
    assert plan.input_token_ids == (42,) and plan.positions == (5,) and plan.output_indices == (1,)
    assert plan.is_decode_only


def test_long_prompt_spreads_over_steps_while_a_stream_gets_a_token_each_step():
    scheduler = make_scheduler(max_step_tokens=8, block_size=4)
    admit_running(scheduler, "stream")
    prompt = list(range(100, 120))  # 20 tokens: 7 + 7 + 6 with one decode token per step
    scheduler.add_prompt("long", prompt, Params(max_tokens=5))
    fed: list[int] = []
    stream_tokens = 0
    for expected_chunk in (7, 7, 6):
        plan, outputs = run_step(scheduler, token=11)
        assert plan.request_ids == ("stream", "long")  # decode first
        assert plan.query_lens == (1, expected_chunk)
        assert plan.num_tokens <= 8
        assert plan.context_lens[1] == len(fed)
        assert plan.positions[1:] == tuple(range(len(fed), len(fed) + expected_chunk))
        fed.extend(plan.input_token_ids[1:])
        assert len(plan.block_tables[1]) == -(-(len(fed)) // 4)  # blocks up to the chunk's end only
        stream_tokens += sum(o.request_id == "stream" for o in outputs)
        is_last = len(fed) == len(prompt)
        assert plan.is_sampled == (True, is_last)
        assert [o.request_id for o in outputs] == (["stream", "long"] if is_last else ["stream"])
    assert fed == prompt
    assert stream_tokens == 3  # the running stream never skipped a step
    plan, _ = run_step(scheduler)
    assert plan.request_ids == ("stream", "long") and plan.query_lens == (1, 1)
    assert plan.output_indices == (4, 1)


def test_decode_tokens_take_the_budget_first():
    scheduler = make_scheduler(max_step_tokens=6, max_num_seqs=5)
    for name in "abcd":
        admit_running(scheduler, name)
    scheduler.add_prompt("p", list(range(10)), Params(max_tokens=2))
    plan = scheduler.schedule()
    assert plan.request_ids == ("a", "b", "c", "d", "p") and plan.query_lens == (1, 1, 1, 1, 2)
    assert plan.num_tokens == 6


def test_sequence_slots_bound_the_chunks():
    scheduler = make_scheduler(max_step_tokens=64, max_num_seqs=2)
    admit_running(scheduler, "a")
    scheduler.add_prompt("p", [1, 2, 3], Params(max_tokens=2))
    scheduler.add_prompt("q", [4, 5, 6], Params(max_tokens=2))
    plan = scheduler.schedule()
    assert plan.request_ids == ("a", "p")  # two sequences per forward, decode first


def test_several_prompts_share_a_step_oldest_first_and_the_last_gets_a_partial_chunk():
    scheduler = make_scheduler(max_step_tokens=10, max_num_seqs=4)
    scheduler.add_prompt("p", [1, 2, 3, 4], Params(max_tokens=2))
    scheduler.add_prompt("q", list(range(20, 30)), Params(max_tokens=2))
    scheduler.add_prompt("r", [7], Params(max_tokens=2))
    plan, outputs = run_step(scheduler)
    assert plan.request_ids == ("p", "q") and plan.query_lens == (4, 6) and plan.is_sampled == (True, False)
    assert [o.request_id for o in outputs] == ["p"]
    assert scheduler.num_queued_prompt_tokens == 4 + 1
    plan, outputs = run_step(scheduler)
    # p now decodes; q finishes its prompt; r fits in what is left
    assert plan.request_ids == ("p", "q", "r") and plan.query_lens == (1, 4, 1)
    assert plan.context_lens == (4, 6, 0)
    assert [o.request_id for o in outputs] == ["p", "q", "r"]


def test_first_token_can_finish_the_request_and_free_its_blocks():
    scheduler = make_scheduler()
    scheduler.add_prompt("one", [1, 2, 3], Params(max_tokens=1))
    scheduler.add_prompt("eos", [1, 2, 3], Params(max_tokens=9))
    plan = scheduler.schedule()
    outputs = scheduler.postprocess(plan, [10, EOS])
    assert outputs == [StepOutput("one", 10, FinishReason.LENGTH), StepOutput("eos", EOS, FinishReason.STOP)]
    assert scheduler.num_free_blocks == 64 and not scheduler.has_work() and scheduler.request_ids() == []


def test_abort_while_prefilling_between_and_during_steps():
    scheduler = make_scheduler(max_step_tokens=8)
    scheduler.add_prompt("a", list(range(30)), Params(max_tokens=4))
    scheduler.add_prompt("b", list(range(30)), Params(max_tokens=4))
    run_step(scheduler)  # a: 8 tokens fed
    assert scheduler.abort("a") is True and scheduler.abort("a") is False
    plan = scheduler.schedule()
    assert plan.request_ids == ("b",)
    held = scheduler.num_free_blocks
    assert scheduler.abort("b") is True
    assert scheduler.num_free_blocks == held  # the forward still writes b's chunk: freed at postprocess
    assert scheduler.postprocess(plan, [1]) == []
    assert scheduler.num_free_blocks == 64 and not scheduler.has_work()


def test_cancelled_step_feeds_the_same_chunk_again():
    scheduler = make_scheduler(max_step_tokens=8)
    scheduler.add_prompt("a", list(range(20)), Params(max_tokens=4))
    run_step(scheduler)
    plan = scheduler.schedule()
    scheduler.cancel_step(plan)
    again = scheduler.schedule()
    assert again.positions == plan.positions and again.input_token_ids == plan.input_token_ids


def test_add_prompt_errors_leave_nothing_held():
    scheduler = make_scheduler(num_blocks=4, block_size=4, max_model_len=64)
    with pytest.raises(OutOfBlocks):
        scheduler.add_prompt("a", list(range(10)), Params(max_tokens=10))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        scheduler.add_prompt("a", list(range(65)), Params(max_tokens=1))
    scheduler.add_prompt("a", [1], Params(max_tokens=1))
    with pytest.raises(ValueError, match="already has a reservation"):
        scheduler.add_prompt("a", [1], Params(max_tokens=1))
    assert scheduler.num_free_blocks == 3 and scheduler.request_ids() == ["a"]


def test_budget_must_leave_room_for_a_chunk():
    with pytest.raises(ValueError, match="max_step_tokens .4. must be larger than max_num_seqs .4."):
        make_scheduler(max_step_tokens=4, max_num_seqs=4)


def test_decode_plan_defaults_and_checks():
    plan = DecodePlan(request_ids=("a", "b"), input_token_ids=(1, 2), positions=(3, 4), context_lens=(3, 4),
                      block_tables=((0,), (1,)), params=(None, None), output_indices=(1, 1))
    assert plan.query_lens == (1, 1) and plan.is_sampled == (True, True) and plan.is_decode_only
    with pytest.raises(ValueError, match="query_lens sum to 3 but there are 2 input tokens"):
        DecodePlan(request_ids=("a", "b"), input_token_ids=(1, 2), positions=(3, 4), context_lens=(3, 4),
                   block_tables=((0,), (1,)), params=(None, None), output_indices=(1, 1), query_lens=(1, 2))
