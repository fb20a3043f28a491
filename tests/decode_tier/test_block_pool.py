import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decode_tier.block_pool import BlockPool, OutOfBlocks


def test_fresh_pool_counts():
    pool = BlockPool(8)
    assert (pool.num_total, pool.num_free, pool.num_used) == (8, 8, 0)


def test_allocate_returns_distinct_ids_and_updates_counts():
    pool = BlockPool(8)
    first = pool.allocate(3)
    second = pool.allocate(5)
    assert len(first) == 3 and len(second) == 5
    assert sorted(first + second) == list(range(8))
    assert (pool.num_free, pool.num_used) == (0, 8)
    assert all(pool.is_allocated(block_id) for block_id in first + second)


def test_allocate_zero_is_empty():
    pool = BlockPool(2)
    assert pool.allocate(0) == []
    assert pool.num_free == 2


def test_free_returns_blocks_for_reuse():
    pool = BlockPool(4)
    ids = pool.allocate(4)
    pool.free(ids[:2])
    assert pool.num_free == 2
    again = pool.allocate(2)
    assert sorted(again) == sorted(ids[:2])


def test_out_of_blocks_message_and_pool_unchanged():
    pool = BlockPool(5)
    held = pool.allocate(3)
    with pytest.raises(OutOfBlocks) as info:
        pool.allocate(4)
    message = str(info.value)
    assert "requested 4" in message and "free 2" in message and "of 5" in message
    assert (info.value.num_requested, info.value.num_free, info.value.num_total) == (4, 2, 5)
    assert pool.num_free == 2
    assert all(pool.is_allocated(block_id) for block_id in held)


def test_double_free_raises():
    pool = BlockPool(4)
    ids = pool.allocate(2)
    pool.free(ids)
    with pytest.raises(ValueError, match="double free"):
        pool.free([ids[0]])


def test_free_never_allocated_raises():
    pool = BlockPool(4)
    with pytest.raises(ValueError, match="not allocated"):
        pool.free([0])


def test_duplicate_in_one_call_raises_and_frees_nothing():
    pool = BlockPool(4)
    ids = pool.allocate(2)
    with pytest.raises(ValueError):
        pool.free([ids[0], ids[0]])
    assert pool.num_free == 2
    assert pool.is_allocated(ids[0])


@pytest.mark.parametrize("bad_id", [-1, 4, 100])
def test_unknown_id_raises_and_frees_nothing(bad_id):
    pool = BlockPool(4)
    ids = pool.allocate(2)
    with pytest.raises(ValueError, match="unknown block id"):
        pool.free([ids[0], bad_id])
    assert pool.num_free == 2
    assert pool.is_allocated(ids[0])


@pytest.mark.parametrize("bad", [0, -3, 2.0, True])
def test_bad_pool_size_raises(bad):
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(bad)


def test_negative_allocate_raises():
    with pytest.raises(ValueError):
        BlockPool(2).allocate(-1)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 6)), max_size=40))
def test_random_allocate_free_keeps_invariants(operations):
    pool = BlockPool(10)
    held: list[list[int]] = []
    for is_allocate, amount in operations:
        if is_allocate:
            try:
                held.append(pool.allocate(amount))
            except OutOfBlocks:
                assert amount > pool.num_free
        elif held:
            pool.free(held.pop(amount % len(held)))
        flat = [block_id for ids in held for block_id in ids]
        assert len(flat) == len(set(flat)) == pool.num_used
        assert pool.num_free + pool.num_used == 10
