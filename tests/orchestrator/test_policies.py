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


# ---- prefix-aware ----------------------------------------------------------------------------------------------

from orchestrator.config import ConfigError, parse_config  # noqa: E402
from orchestrator.policies import PolicyOptions  # noqa: E402
from prefill_tier.prefix_cache import block_hashes  # noqa: E402

BS = 4


def _prefix_policy(**options):
    return get_policy("prefix-aware", PolicyOptions(block_size=BS, **options))


def test_prefix_aware_sends_a_follow_up_turn_to_the_replica_holding_its_prefix():
    policy = _prefix_policy()
    load = _load({"a": {"inflight": 0}, "b": {"inflight": 1}, "c": {"inflight": 2}})
    turn1 = list(range(10))
    assert list(policy.order(["a", "b", "c"], load, prompt_token_ids=turn1)) == ["a", "b", "c"]  # nothing known
    policy.record("c", turn1)
    turn2 = turn1 + [40, 41, 42, 43, 44]
    assert list(policy.order(["a", "b", "c"], load, prompt_token_ids=turn2)) == ["c", "a", "b"]
    assert policy.num_matched_blocks("c", block_hashes(turn2, BS)) == 2
    # A prompt sharing less than one block with it goes least-loaded.
    assert list(policy.order(["a", "b", "c"], load, prompt_token_ids=[0, 1, 2, 9, 9])) == ["a", "b", "c"]


def test_prefix_aware_prefers_the_longest_match_then_the_less_loaded():
    policy = _prefix_policy()
    load = _load({"a": {"inflight": 3}, "b": {"inflight": 1}, "c": {"inflight": 0}})
    prompt = list(range(16))
    policy.record("a", prompt[:12])
    policy.record("b", prompt[:8])
    assert list(policy.order(["a", "b", "c"], load, prompt_token_ids=prompt))[0] == "a"
    policy.record("b", prompt[:12])  # now b holds as much as a and is less loaded
    assert list(policy.order(["a", "b", "c"], load, prompt_token_ids=prompt)) == ["b", "c", "a"]


def test_prefix_aware_falls_back_to_least_loaded_beyond_the_imbalance():
    policy = _prefix_policy(max_imbalance=2)
    prompt = list(range(8))
    policy.record("a", prompt)
    at_limit = _load({"a": {"inflight": 2}, "b": {"inflight": 0}})
    assert list(policy.order(["a", "b"], at_limit, prompt_token_ids=prompt))[0] == "a"
    beyond = _load({"a": {"inflight": 3}, "b": {"inflight": 0}})
    assert list(policy.order(["a", "b"], beyond, prompt_token_ids=prompt)) == ["b", "a"]


def test_prefix_aware_index_is_bounded_and_forgets_a_replica():
    policy = _prefix_policy(index_blocks=3)
    load = _load({"a": {"inflight": 1}, "b": {"inflight": 0}})
    old = [1] * 4 + [2] * 4
    policy.record("a", old)
    policy.record("a", [7] * 8)  # 2 more blocks: the oldest of old's blocks is forgotten
    assert list(policy.order(["a", "b"], load, prompt_token_ids=old + [3])) == ["b", "a"]  # leading block gone
    assert list(policy.order(["a", "b"], load, prompt_token_ids=[7] * 9))[0] == "a"
    policy.forget("a")
    assert list(policy.order(["a", "b"], load, prompt_token_ids=[7] * 9)) == ["b", "a"]


def test_prefix_aware_uses_replica_ids_of_handles():
    class Handle:
        def __init__(self, replica_id):
            self.replica_id = replica_id

    a, b = Handle("prefill-0"), Handle("prefill-1")
    policy = _prefix_policy()
    policy.record(b, list(range(8)))
    loads = {id(a): {"inflight": 0}, id(b): {"inflight": 0}}
    assert list(policy.order([a, b], lambda h: loads[id(h)], prompt_token_ids=list(range(9))))[0] is b


def test_other_policies_ignore_prompts_and_records():
    load = _load({"a": {"inflight": 1}, "b": {"inflight": 0}})
    for name in ("least-loaded", "round-robin", "power-of-two"):
        policy = get_policy(name)
        policy.record("a", list(range(8)))
        policy.forget("a")
        assert sorted(policy.order(["a", "b"], load, prompt_token_ids=list(range(8)))) == ["a", "b"]


def test_policy_options_are_validated():
    with pytest.raises(ValueError, match="block_size"):
        PolicyOptions(block_size=0)
    with pytest.raises(ValueError, match="max_imbalance"):
        PolicyOptions(max_imbalance=-1)


def test_tier_policies_default_to_the_router_policy_and_prefix_keys_are_checked():
    base = {"model": {"path": "/models/m"}}
    config = parse_config({**base, "router": {"policy": "round-robin"}})
    assert config.prefill.policy == config.decode.policy == "round-robin"
    assert config.prefill.prefix_cache.max_tokens == 0  # off unless asked for
    config = parse_config({**base, "prefill": {"policy": "prefix-aware", "prefix_cache": {"max_tokens": 4096,
                                                                                         "block_size": 8},
                                               "prefix_routing": {"max_imbalance": 2}}})
    assert (config.prefill.policy, config.decode.policy) == ("prefix-aware", "least-loaded")
    assert config.prefill.prefix_cache.block_size == 8 and config.prefill.prefix_routing.max_imbalance == 2
    with pytest.raises(ConfigError, match="prefill.policy.*prefix_cache.max_tokens"):
        parse_config({**base, "prefill": {"policy": "prefix-aware"}})
    with pytest.raises(ConfigError, match="decode.prefix_cache"):
        parse_config({**base, "decode": {"prefix_cache": {"max_tokens": 10}}})
    with pytest.raises(ConfigError, match="prefill.prefix_cache.size"):
        parse_config({**base, "prefill": {"prefix_cache": {"size": 10}}})
    with pytest.raises(ConfigError, match="prefill.policy"):
        parse_config({**base, "prefill": {"policy": "fastest"}})
