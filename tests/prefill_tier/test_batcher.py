from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefill_tier.batcher import PrefillBatcher


@dataclass(frozen=True)
class Item:
    request_id: str
    num_tokens: int


def ids(batch):
    return [item.request_id for item in batch]


def filled(batcher, *lengths):
    for index, num_tokens in enumerate(lengths):
        batcher.add(Item(f"r{index}", num_tokens))
    return batcher


def test_empty_queue_gives_empty_batch():
    batcher = PrefillBatcher(max_batch_tokens=10, max_batch_seqs=4)
    assert batcher.next_batch() == []
    assert len(batcher) == 0 and batcher.num_queued_tokens == 0


def test_packs_in_arrival_order_until_token_budget():
    batcher = filled(PrefillBatcher(max_batch_tokens=10, max_batch_seqs=8), 3, 4, 3, 2)
    assert batcher.num_queued_tokens == 12
    assert ids(batcher.next_batch()) == ["r0", "r1", "r2"]
    assert batcher.num_queued_tokens == 2
    assert ids(batcher.next_batch()) == ["r3"]
    assert batcher.next_batch() == []


def test_does_not_skip_ahead_of_a_prompt_that_does_not_fit():
    # r1 does not fit after r0; r2 would, but FCFS keeps it behind r1.
    batcher = filled(PrefillBatcher(max_batch_tokens=10, max_batch_seqs=8), 6, 7, 1)
    assert ids(batcher.next_batch()) == ["r0"]
    assert ids(batcher.next_batch()) == ["r1", "r2"]


def test_prompt_longer_than_budget_goes_alone():
    batcher = filled(PrefillBatcher(max_batch_tokens=10, max_batch_seqs=8), 25, 1)
    assert ids(batcher.next_batch()) == ["r0"]
    assert ids(batcher.next_batch()) == ["r1"]


def test_long_prompt_behind_short_ones_waits_then_goes_alone():
    batcher = filled(PrefillBatcher(max_batch_tokens=10, max_batch_seqs=8), 2, 25, 3)
    assert ids(batcher.next_batch()) == ["r0"]
    assert ids(batcher.next_batch()) == ["r1"]
    assert ids(batcher.next_batch()) == ["r2"]


def test_exact_budget_fits():
    batcher = filled(PrefillBatcher(max_batch_tokens=10, max_batch_seqs=8), 4, 6, 1)
    assert ids(batcher.next_batch()) == ["r0", "r1"]


def test_sequence_limit():
    batcher = filled(PrefillBatcher(max_batch_tokens=100, max_batch_seqs=2), 1, 1, 1)
    assert ids(batcher.next_batch()) == ["r0", "r1"]
    assert ids(batcher.next_batch()) == ["r2"]


def test_remove_queued_and_unknown():
    batcher = filled(PrefillBatcher(max_batch_tokens=100, max_batch_seqs=8), 5, 6, 7)
    assert batcher.remove("r1") is True
    assert batcher.remove("r1") is False
    assert batcher.remove("nope") is False
    assert len(batcher) == 2 and batcher.num_queued_tokens == 12
    assert "r1" not in batcher and "r0" in batcher
    assert ids(batcher.next_batch()) == ["r0", "r2"]
    assert batcher.remove("r0") is False  # already handed out


def test_duplicate_request_id_raises():
    batcher = PrefillBatcher(max_batch_tokens=10, max_batch_seqs=2)
    batcher.add(Item("a", 3))
    with pytest.raises(ValueError, match="already queued"):
        batcher.add(Item("a", 4))
    assert batcher.num_queued_tokens == 3


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_bad_num_tokens_raises(bad):
    with pytest.raises(ValueError, match="num_tokens"):
        PrefillBatcher(max_batch_tokens=10, max_batch_seqs=2).add(Item("a", bad))


@pytest.mark.parametrize("kwargs", [dict(max_batch_tokens=0, max_batch_seqs=1), dict(max_batch_tokens=4, max_batch_seqs=0)])
def test_bad_limits_raise(kwargs):
    with pytest.raises(ValueError, match=next(k for k, v in kwargs.items() if v == 0)):
        PrefillBatcher(**kwargs)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 30), max_size=25),
    max_batch_tokens=st.integers(1, 40),
    max_batch_seqs=st.integers(1, 6),
)
def test_batches_preserve_order_and_respect_limits(lengths, max_batch_tokens, max_batch_seqs):
    batcher = filled(PrefillBatcher(max_batch_tokens=max_batch_tokens, max_batch_seqs=max_batch_seqs), *lengths)
    drained = []
    while batcher:
        batch = batcher.next_batch()
        assert 1 <= len(batch) <= max_batch_seqs
        total = sum(item.num_tokens for item in batch)
        assert total <= max_batch_tokens or len(batch) == 1
        drained.extend(batch)
        # Maximal: the next prompt in line would not have fitted.
        num_next = lengths[len(drained)] if len(drained) < len(lengths) else None
        if num_next is not None and len(batch) < max_batch_seqs:
            assert total + num_next > max_batch_tokens
    assert ids(drained) == [f"r{i}" for i in range(len(lengths))]
    assert batcher.num_queued_tokens == 0
