"""The prefill tier's prefix cache: rank 0's bookkeeping (pure Python: hashing, matching, LRU eviction under a
token budget, pinning) and one rank running steps with it: a follow-up turn computes only its new tokens, yet the
KV shipped to the decode side is the whole prompt's, so decoding continues exactly as after a full prefill."""

from __future__ import annotations

import asyncio

import pytest
import torch

from decode_tier.engine import DecodeEngine
from kv_transfer.local_transport import LocalTransport
from kv_transfer.mesh_layout import DecodeLayout, PrefillLayout
from kv_transfer.mesh_session import MeshReservation, RankKVReceiver, RankKVSender
from mesh.model import AttentionBatch, CausalLM
from mesh.presets import make_model
from mesh.sampling import SamplingParams
from prefill_tier.prefix_cache import PrefixCacheConfig, PrefixCacheIndex, PrefixStepPlan, block_hashes
from prefill_tier.prefix_store import PrefixKVStore
from prefill_tier.rank_step import PrefillRankCore, PrefillStep

BS = 4  # tokens per hashed block in these tests


def _index(max_tokens: int = 1000) -> PrefixCacheIndex:
    return PrefixCacheIndex(PrefixCacheConfig(max_tokens=max_tokens, block_size=BS))


def _run(index: PrefixCacheIndex, *prompts) -> PrefixStepPlan:
    plan = index.plan([list(p) for p in prompts])
    index.commit(plan)
    return plan


# ---- hashing and matching --------------------------------------------------------------------------------------

def test_block_hashes_are_chained_over_full_blocks_only():
    a = block_hashes(list(range(10)), BS)
    assert len(a) == 2  # 10 tokens: two full blocks, the partial third is not hashed
    assert block_hashes(list(range(8)) + [99, 98], BS) == a  # same full blocks, other tail
    # Same second block after a different first block: a different chain.
    b = block_hashes([7, 7, 7, 7, 4, 5, 6, 7], BS)
    assert b[1] != a[1]
    assert block_hashes([1, 2, 3], BS) == []
    with pytest.raises(ValueError, match="block_size"):
        block_hashes([1], 0)


def test_config_validates_and_zero_disables():
    assert not PrefixCacheConfig(max_tokens=0).is_enabled
    for bad in (dict(max_tokens=-1), dict(block_size=0), dict(max_tokens=True)):
        with pytest.raises(ValueError, match="PrefixCacheConfig"):
            PrefixCacheConfig(**bad)
    with pytest.raises(ValueError, match="disabled"):
        PrefixCacheIndex(PrefixCacheConfig(max_tokens=0))


def test_follow_up_turn_reuses_the_longest_full_block_prefix():
    index = _index()
    turn1 = list(range(10))
    first = _run(index, turn1)
    assert first.source_keys == (None,) and first.num_cached_tokens == (0,)
    turn2 = turn1 + [50, 51, 52] + [60, 61, 62, 63]  # previous prompt + answer + new user tokens
    second = index.plan([turn2])
    assert second.source_keys == first.store_keys
    assert second.num_cached_tokens == (8,)  # the two full blocks of turn 1
    index.commit(second)
    assert index.stats.num_hits == 1 and index.stats.num_misses == 1 and index.stats.num_cached_tokens == 8
    # An unrelated prompt misses.
    assert index.match([9, 9, 9, 9, 9]) == (None, 0)


def test_a_fully_cached_prompt_still_computes_its_last_token():
    index = _index()
    plan = _run(index, range(8))
    again = index.plan([list(range(8))])
    assert again.source_keys == plan.store_keys and again.num_cached_tokens == (7,)


def test_redundant_source_is_dropped_and_branches_are_kept():
    index = _index()
    base = _run(index, range(8))
    branch_a = _run(index, list(range(8)) + [1, 1, 1, 1])  # covers all of base: base is dropped after the step
    assert base.store_keys[0] in branch_a.drop_after
    assert index.keys() == list(branch_a.store_keys)
    # A second branch off the first 8 tokens keeps branch_a (it holds more than the shared part).
    branch_b = _run(index, list(range(8)) + [2, 2, 2, 2])
    assert branch_b.source_keys == branch_a.store_keys and branch_b.num_cached_tokens == (8,)
    assert branch_b.drop_after == ()
    assert set(index.keys()) == {branch_a.store_keys[0], branch_b.store_keys[0]}


def test_lru_eviction_under_the_token_budget():
    index = _index(max_tokens=26)
    a = _run(index, [1] * 8)
    b = _run(index, [2] * 8)
    index.match([1] * 8)  # matching alone does not count as use: only a step does
    # Uses a's first block (so a is the most recently used; not redundant: it holds a block more).
    c = _run(index, [1] * 4 + [5] * 5)
    assert c.source_keys == a.store_keys and c.drop_before == ()
    d = _run(index, [4] * 8)  # 8 + 8 + 9 + 8 > 26: the least recently used (b) goes, a stays
    assert d.drop_before == b.store_keys
    assert index.keys() == [a.store_keys[0], c.store_keys[0], d.store_keys[0]]
    assert index.num_stored_tokens == 25 and index.stats.num_evictions == 1


def test_entries_in_use_are_never_evicted_and_oversized_prompts_not_kept():
    index = _index(max_tokens=16)
    a = _run(index, [1] * 12)
    plan = index.plan([[1] * 12 + [5] * 3])  # reuses a; a is pinned while the step runs
    assert plan.source_keys == a.store_keys
    other = index.plan([[7] * 10])  # needs room: a is the only entry and it is pinned
    assert a.store_keys[0] not in other.drop_before
    assert other.store_keys[0] in other.drop_after  # could not be kept
    index.commit(plan)
    index.commit(other)
    too_long = _run(index, [8] * 17)
    assert too_long.store_keys[0] in too_long.drop_after and too_long.store_keys[0] not in index.keys()


def test_an_aborted_step_stores_nothing_and_every_rank_drops_its_keys():
    index = _index()
    failed = index.plan([[1] * 8])
    index.abort(failed)
    assert index.keys() == [] and index.match([1] * 9) == (None, 0)
    nxt = index.plan([[2] * 4])
    assert failed.store_keys[0] in nxt.drop_before


# ---- one rank running steps with the cache ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return CausalLM.load(make_model(tmp_path_factory.mktemp("m") / "tiny-llama", "tiny-llama", seed=5))


def _greedy(model: CausalLM, prompt: list[int], num_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(num_tokens):
        batch = AttentionBatch([len(tokens)], [0], None, torch.tensor([len(tokens) - 1]))
        tokens.append(int(model(torch.tensor(tokens), torch.arange(len(tokens)), batch).argmax(-1)))
    return tokens[len(prompt):]


def test_store_fork_copies_a_prefix_under_a_new_key(model):
    store = PrefixKVStore.for_model(model)
    with pytest.raises(ValueError, match="cannot take"):
        store.fork("missing", "x", 3)
    k = torch.randn(6, model.num_kv_heads_local, model.head_dim)
    for layer in range(model.num_layers):
        store._append("src", layer, k + layer, -k)
    store._lengths["src"] = 6
    store.fork("src", "dst", 4)
    assert store.num_tokens("dst") == 4 and store.num_tokens("src") == 6
    got_k, got_v = store.rows("dst", 1)
    assert torch.equal(got_k, k[:4] + 1) and torch.equal(got_v, -k[:4])
    with pytest.raises(ValueError, match="already stored"):
        store.fork("src", "dst", 2)


@pytest.mark.parametrize("layerwise", [True, False])
def test_multi_turn_steps_reuse_the_prefix_and_decode_exactly(model, loop, layerwise):
    config = model.config
    src = PrefillLayout(num_layers=config.num_layers, num_kv_heads=config.num_kv_heads)
    dst = DecodeLayout(num_layers=config.num_layers, num_kv_heads=config.num_kv_heads, block_size=BS)
    engine = DecodeEngine(model, num_blocks=64, block_size=BS, max_num_seqs=4)
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    server = LocalTransport.make_server(token="t")
    receiver = asyncio.run_coroutine_threadsafe(_receiver(server, engine, dst), loop).result(10)
    core = PrefillRankCore(model, RankKVSender(LocalTransport.make_client(token="t"), src, 0), loop,
                           layerwise=layerwise)
    index = PrefixCacheIndex(PrefixCacheConfig(max_tokens=500, block_size=BS))

    prompt = [5, 9, 200, 31, 7, 7, 64, 12, 3, 40]
    cached_per_turn = []
    for turn in range(3):
        request_id = f"turn{turn}"
        block_ids = engine.reserve(request_id, len(prompt), params)
        target = asyncio.run_coroutine_threadsafe(
            _post(receiver, request_id, src, block_ids, len(prompt)), loop).result(10)
        info = MeshReservation(request_id=request_id, num_tokens=len(prompt), block_ids=tuple(block_ids), src=src,
                               dst=dst, head_dim=config.head_dim, dtype="float32", targets=(target,))
        plan = index.plan([prompt])
        cached_per_turn.append(plan.num_cached_tokens[0])
        outcome = core.run(PrefillStep(request_ids=(request_id,), prompts=(tuple(prompt),), params=(params,),
                                       reservations=(info,), prefix=plan))
        assert outcome.failure is None and not outcome.errors, outcome
        index.commit(plan)
        asyncio.run_coroutine_threadsafe(receiver.wait_complete(request_id), loop).result(10)
        assert engine.admit(request_id, prompt, outcome.first_tokens[0]) is None
        answer = [outcome.first_tokens[0]]
        while engine.has_work():
            answer += [o.token_id for o in engine.step()]
        # The decode side continued from the shipped KV: equal to greedy decoding of the whole prompt.
        assert answer == _greedy(model, prompt, params.max_tokens), f"turn {turn}"
        prompt = prompt + answer + [turn + 1, 77, 78]  # the next turn: history + answer + new user tokens
    assert cached_per_turn[0] == 0 and cached_per_turn[1] == 8 and cached_per_turn[2] >= 16
    # The store holds exactly what the index says (redundant turns were dropped on the rank too).
    assert sorted(core.prefix_store.keys()) == sorted(index.keys())
    assert core.prefix_store.num_stored_tokens() == index.num_stored_tokens


async def _receiver(server, engine, dst):
    await server.start()
    return RankKVReceiver(server, engine.kv_cache, dst, 0)


async def _post(receiver, request_id, src, block_ids, num_tokens):
    return receiver.post(request_id, src, block_ids, num_tokens, lease_s=30)
