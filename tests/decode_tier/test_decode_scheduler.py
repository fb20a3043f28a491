"""DecodeScheduler without a model: the engine's forward is replaced by chosen sampled tokens."""

from dataclasses import dataclass

import pytest

from decode_tier.block_pool import OutOfBlocks
from decode_tier.scheduler import DecodeScheduler, FinishReason, SchedulerConfig, StepOutput

EOS = 2


@dataclass(frozen=True, kw_only=True)
class Params:
    """The fields of mesh.sampling.SamplingParams that the scheduler reads."""

    max_tokens: int
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


def make_scheduler(*, num_blocks=16, block_size=4, max_num_seqs=8, max_model_len=64):
    return DecodeScheduler(
        SchedulerConfig(
            num_blocks=num_blocks,
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            eos_token_ids=(EOS,),
        )
    )


def start(scheduler, request_id, num_prompt_tokens, first_token=10, **params):
    scheduler.reserve(request_id, num_prompt_tokens, Params(**params))
    return scheduler.admit(request_id, list(range(num_prompt_tokens)), first_token)


def step(scheduler, token_for=lambda request_id: 10):
    plan = scheduler.schedule()
    if plan is None:
        return []
    return scheduler.postprocess(plan, [token_for(request_id) for request_id in plan.request_ids])


def test_reserve_takes_blocks_for_prompt_plus_max_tokens():
    scheduler = make_scheduler(block_size=4)
    block_ids = scheduler.reserve("a", 5, Params(max_tokens=4))  # 9 slots -> 3 blocks
    assert len(block_ids) == 3 and len(set(block_ids)) == 3
    assert scheduler.num_free_blocks == 13
    assert (scheduler.num_waiting_kv, scheduler.num_running) == (1, 0)
    assert scheduler.request_ids() == ["a"]


def test_reserve_is_capped_at_model_context():
    scheduler = make_scheduler(block_size=4, max_model_len=16)
    assert len(scheduler.reserve("a", 5, Params(max_tokens=1000))) == 4


def test_reserve_errors():
    scheduler = make_scheduler(num_blocks=4, block_size=4, max_model_len=64)
    scheduler.reserve("a", 3, Params(max_tokens=1))
    with pytest.raises(ValueError, match="already has a reservation"):
        scheduler.reserve("a", 3, Params(max_tokens=1))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        scheduler.reserve("b", 65, Params(max_tokens=1))
    with pytest.raises(ValueError, match="max_tokens"):
        scheduler.reserve("b", 3, Params(max_tokens=0))
    with pytest.raises(OutOfBlocks, match="requested 4, free 3"):
        scheduler.reserve("b", 10, Params(max_tokens=6))
    assert scheduler.num_free_blocks == 3
    assert scheduler.request_ids() == ["a"]


def test_plan_describes_one_token_per_sequence():
    scheduler = make_scheduler(block_size=4)
    block_ids = scheduler.reserve("a", 5, Params(max_tokens=8))
    assert scheduler.admit("a", [1, 2, 3, 4, 5], 42) is None
    plan = scheduler.schedule()
    assert plan.request_ids == ("a",)
    assert plan.input_token_ids == (42,)
    assert plan.positions == (5,) and plan.context_lens == (5,)
    assert plan.block_tables == (tuple(block_ids[:2]),)  # positions 0..5 live in the first two blocks
    assert plan.output_indices == (1,)  # the prefill's first token was index 0
    assert scheduler.postprocess(plan, [43]) == [StepOutput("a", 43, None)]
    plan = scheduler.schedule()
    assert (plan.input_token_ids, plan.positions, plan.output_indices) == ((43,), (6,), (2,))
    scheduler.cancel_step(plan)


def test_max_tokens_counts_the_first_token():
    scheduler = make_scheduler()
    start(scheduler, "a", 3, max_tokens=3)
    assert step(scheduler) == [StepOutput("a", 10, None)]
    assert step(scheduler) == [StepOutput("a", 10, FinishReason.LENGTH)]
    assert scheduler.num_free_blocks == 16 and not scheduler.has_work()
    assert scheduler.request_ids() == []


def test_max_tokens_one_finishes_at_admit():
    scheduler = make_scheduler()
    output = start(scheduler, "a", 3, first_token=7, max_tokens=1)
    assert output == StepOutput("a", 7, FinishReason.LENGTH)
    assert output.finish_reason == "length"
    assert scheduler.num_free_blocks == 16 and scheduler.request_ids() == []


def test_stop_token_and_eos_at_admit_and_in_step():
    scheduler = make_scheduler()
    assert start(scheduler, "eos", 3, first_token=EOS, max_tokens=5) == StepOutput("eos", EOS, FinishReason.STOP)
    assert start(scheduler, "stop", 3, first_token=9, max_tokens=5, stop_token_ids=(9,)).finish_reason == "stop"
    assert start(scheduler, "ignore", 3, first_token=EOS, max_tokens=5, ignore_eos=True) is None
    assert start(scheduler, "later", 3, first_token=5, max_tokens=5, stop_token_ids=(9,)) is None
    outputs = step(scheduler, lambda request_id: {"ignore": EOS, "later": 9}[request_id])
    assert outputs == [StepOutput("ignore", EOS, None), StepOutput("later", 9, FinishReason.STOP)]
    assert scheduler.request_ids() == ["ignore"]


def test_context_full_finishes_with_length():
    scheduler = make_scheduler(block_size=4, max_model_len=6)
    assert start(scheduler, "a", 4, max_tokens=100) is None  # room for positions 4 and 5
    assert step(scheduler) == [StepOutput("a", 10, None)]  # fed at 4
    assert step(scheduler) == [StepOutput("a", 10, FinishReason.LENGTH)]  # fed at 5; no slot for the next
    assert start(scheduler, "full", 6, max_tokens=100).finish_reason == "length"
    assert scheduler.num_free_blocks == 16


def test_max_num_seqs_runs_oldest_first_and_the_rest_wait():
    scheduler = make_scheduler(max_num_seqs=2)
    start(scheduler, "a", 3, max_tokens=3)
    start(scheduler, "b", 3, max_tokens=4)
    start(scheduler, "c", 3, max_tokens=3)
    assert [o.request_id for o in step(scheduler)] == ["a", "b"]
    outputs = step(scheduler)
    assert [(o.request_id, o.finish_reason) for o in outputs] == [("a", "length"), ("b", None)]
    outputs = step(scheduler)
    assert [(o.request_id, o.finish_reason) for o in outputs] == [("b", "length"), ("c", None)]
    assert step(scheduler) == [StepOutput("c", 10, FinishReason.LENGTH)]
    assert step(scheduler) == [] and scheduler.num_free_blocks == 16


def test_abort_in_every_state_frees_blocks_and_is_idempotent():
    scheduler = make_scheduler()
    scheduler.reserve("waiting", 5, Params(max_tokens=5))
    start(scheduler, "running", 5, max_tokens=5)
    assert scheduler.num_free_blocks < 16
    assert scheduler.abort("waiting") is True
    assert scheduler.abort("running") is True
    assert scheduler.abort("running") is False
    assert scheduler.abort("never") is False
    assert scheduler.num_free_blocks == 16
    assert (scheduler.num_waiting_kv, scheduler.num_running, scheduler.has_work()) == (0, 0, False)
    with pytest.raises(KeyError, match="no reservation"):
        scheduler.admit("waiting", [0] * 5, 1)


def test_abort_during_step_defers_free_and_drops_output():
    scheduler = make_scheduler()
    start(scheduler, "a", 5, max_tokens=5)
    start(scheduler, "b", 5, max_tokens=5)
    plan = scheduler.schedule()
    num_free_in_step = scheduler.num_free_blocks
    assert scheduler.abort("a") is True
    # The forward may still be writing into a's blocks, so they stay held until postprocess.
    assert scheduler.num_free_blocks == num_free_in_step
    assert scheduler.request_ids() == ["b"] and scheduler.num_running == 1
    # The same id may be reserved again at once without clashing with the sequence in flight.
    scheduler.reserve("a", 5, Params(max_tokens=5))
    scheduler.abort("a")
    assert scheduler.postprocess(plan, [11, 12]) == [StepOutput("b", 12, None)]
    assert scheduler.num_free_blocks == num_free_in_step + 3
    scheduler.abort("b")
    assert scheduler.num_free_blocks == 16


def test_cancel_step_keeps_state_and_frees_aborted():
    scheduler = make_scheduler()
    start(scheduler, "a", 5, max_tokens=5)
    start(scheduler, "b", 5, max_tokens=5)
    plan = scheduler.schedule()
    scheduler.abort("b")
    scheduler.cancel_step(plan)
    again = scheduler.schedule()
    assert again.request_ids == ("a",) and again.positions == plan.positions[:1]
    assert again.output_indices == (1,)
    scheduler.postprocess(again, [3])
    scheduler.abort("a")
    assert scheduler.num_free_blocks == 16


def test_step_protocol_errors():
    scheduler = make_scheduler()
    start(scheduler, "a", 3, max_tokens=5)
    plan = scheduler.schedule()
    with pytest.raises(RuntimeError, match="previous step"):
        scheduler.schedule()
    with pytest.raises(ValueError, match="sampled 2 tokens for 1"):
        scheduler.postprocess(plan, [1, 2])
    assert scheduler.postprocess(plan, [1]) == [StepOutput("a", 1, None)]  # the bad call changed nothing
    with pytest.raises(RuntimeError, match="not the step in flight"):
        scheduler.postprocess(plan, [1])


def test_admit_errors():
    scheduler = make_scheduler()
    scheduler.reserve("a", 3, Params(max_tokens=5))
    with pytest.raises(ValueError, match="2 prompt tokens but reserved for 3"):
        scheduler.admit("a", [1, 2], 5)
    scheduler.admit("a", [1, 2, 3], 5)
    with pytest.raises(ValueError, match="already admitted"):
        scheduler.admit("a", [1, 2, 3], 5)


@pytest.mark.parametrize("field", ["num_blocks", "block_size", "max_num_seqs", "max_model_len"])
def test_config_validation(field):
    values = dict(num_blocks=4, block_size=4, max_num_seqs=2, max_model_len=16)
    values[field] = 0
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**values)
