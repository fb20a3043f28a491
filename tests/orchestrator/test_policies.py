from orchestrator.policies import get_policy

import pytest


def _load(table):
    return lambda handle: table[handle]


def test_least_loaded_prefers_fewest_inflight_then_most_free_blocks():
    load = _load({"a": {"inflight": 2, "num_free_blocks": 100}, "b": {"inflight": 1, "num_free_blocks": 5},
                  "c": {"inflight": 1, "num_free_blocks": 50}})
    assert list(get_policy("least-loaded").order(["a", "b", "c"], load)) == ["c", "b", "a"]


def test_power_of_two_puts_the_lighter_of_two_first_and_keeps_everyone():
    load = _load({k: {"inflight": i} for i, k in enumerate("abcdef")})
    policy = get_policy("power-of-two")
    for _ in range(50):
        order = list(policy.order(list("abcdef"), load))
        assert sorted(order) == list("abcdef")
        assert load(order[0])["inflight"] <= load(order[1])["inflight"]


def test_round_robin_rotates():
    policy = get_policy("round-robin")
    firsts = [list(policy.order(["a", "b", "c"], None))[0] for _ in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]


def test_unknown_policy_lists_known_ones():
    with pytest.raises(ValueError, match="least-loaded"):
        get_policy("fastest")
