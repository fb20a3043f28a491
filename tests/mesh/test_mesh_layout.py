"""Pure pieces of the mesh, no processes: stage layer ranges, the KV layout the transfer planner reads, degree
validation for MoE models, micro-batch splitting, and the step checks of the CP store."""

from __future__ import annotations

import json

import pytest
import torch

from mesh.attention import AttentionBatch
from mesh.config import ModelConfig
from mesh.context_parallel import CPRates
from mesh.cp_sharding import shard, shard_plan
from mesh.kv_layout import kv_head_range, kv_layout
from mesh.parallel import MeshShape, stage_layer_range
from mesh.pipeline import split_micro_batches
from mesh.presets import PRESETS
from mesh.round_robin_kv import RoundRobinKVStore


def _config(preset: str, **overrides) -> ModelConfig:
    raw = json.loads(json.dumps(PRESETS[preset]))
    raw.update(overrides)
    return ModelConfig.from_hf_dict(raw)


@pytest.mark.parametrize(("num_layers", "pp"), [(4, 1), (4, 2), (4, 3), (4, 4), (7, 3), (32, 5)])
def test_stage_ranges_are_contiguous_balanced_and_cover_every_layer(num_layers, pp):
    ranges = [stage_layer_range(num_layers, pp, stage) for stage in range(pp)]
    assert [i for r in ranges for i in r] == list(range(num_layers))
    sizes = [len(r) for r in ranges]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_stage_range_errors():
    with pytest.raises(ValueError, match="pp=5"):
        stage_layer_range(4, 5, 0)
    with pytest.raises(ValueError, match="pp_rank 2"):
        stage_layer_range(4, 2, 2)


def test_kv_head_range_splits_then_replicates():
    assert [kv_head_range(8, 4, r) for r in range(4)] == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    # tp 4 over 2 KV heads: ranks 0, 1 share head 0 (they hold query heads 0-1 and 2-3... of group 0).
    assert [kv_head_range(2, 4, r) for r in range(4)] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    assert [kv_head_range(1, 2, r) for r in range(2)] == [range(0, 1), range(0, 1)]


def test_kv_layout_names_layers_heads_and_token_rule_per_rank():
    config = _config("tiny-llama")  # 4 layers, 2 KV heads
    layout = kv_layout(MeshShape(pp=2, cp=2, tp=4), config)
    assert len(layout) == 16
    rank = layout[MeshShape(pp=2, cp=2, tp=4).rank_of(pp=1, cp=1, tp=2)]
    assert (rank.pp_rank, rank.cp_rank, rank.tp_rank) == (1, 1, 2)
    assert rank.layers == range(2, 4) and rank.kv_heads == range(1, 2) and rank.kv_replicas == 2
    assert rank.token_rule == "cp" and rank.cp_size == 2
    single = kv_layout(MeshShape(tp=2), config)
    assert [r.kv_heads for r in single] == [range(0, 1), range(1, 2)] and single[0].kv_replicas == 1
    assert all(r.token_rule == "all" and r.layers == range(0, 4) for r in single)


def test_kv_layout_validates_the_mesh():
    with pytest.raises(ValueError, match="tp=3"):
        kv_layout(MeshShape(tp=3), _config("tiny-llama"))


@pytest.mark.parametrize("shape", [MeshShape(tp=2, ep=2), MeshShape(cp=2, ep=2), MeshShape(tp=2, cp=2, ep=4),
                                   MeshShape(tp=4, ep=4), MeshShape(tp=2, pp=2), MeshShape(cp=3)])
def test_mixtral_accepts_expert_layouts(shape):
    shape.validate(_config("tiny-mixtral"))  # 4 experts


def test_mixtral_rejects_ep_that_does_not_divide_the_experts():
    with pytest.raises(ValueError, match=r"ep=3 does not divide the model's 4 experts"):
        MeshShape(cp=3, ep=3).validate(_config("tiny-mixtral"))
    with pytest.raises(ValueError, match="ep must be 1 or cp \\* tp = 4"):
        MeshShape(tp=2, cp=2, ep=2)
    with pytest.raises(ValueError, match="set ep to 1"):
        MeshShape(tp=2, ep=2).validate(_config("tiny-llama"))


def test_whole_experts_need_no_intermediate_split():
    # intermediate 96 does not split over tp 4... only when experts are tp-split (ep == 1).
    config = _config("tiny-mixtral", intermediate_size=90)
    MeshShape(tp=4, ep=4).validate(config)
    with pytest.raises(ValueError, match="intermediate_size"):
        MeshShape(tp=4).validate(config)


def test_micro_batches_hold_whole_sequences_and_logits_come_back_in_order():
    query_lens, context_lens = [3, 1, 4, 2, 5], [0, 7, 0, 2, 1]
    ids = torch.arange(15)
    positions = torch.arange(15) + 100
    logits_indices = torch.tensor([14, 2, 3, 7, 9, 0])  # any order, any rows
    batch = AttentionBatch(query_lens, context_lens, [[i] for i in range(5)], logits_indices,
                           seq_keys=list("abcde"))
    micro_batches, order = split_micro_batches(ids, positions, batch, 2)
    assert len(micro_batches) == 2
    assert [mb.batch.query_lens for mb in micro_batches] == [[3, 1, 4], [2, 5]]
    assert micro_batches[1].batch.context_lens == [2, 1] and micro_batches[1].batch.seq_keys == ["d", "e"]
    assert micro_batches[1].batch.block_tables == [[3], [4]]
    # Pretend each micro-batch's "logits" are its packed ids: reassembled, they must be the requested rows.
    fake_logits = [mb.input_ids[mb.batch.logits_indices] for mb in micro_batches]
    assert torch.equal(torch.cat(fake_logits)[order], ids[logits_indices])
    assert torch.equal(micro_batches[1].positions, positions[8:])


def test_more_micro_batches_than_sequences():
    batch = AttentionBatch([2, 3], [0, 0], None, torch.tensor([1, 4]))
    micro_batches, order = split_micro_batches(torch.arange(5), torch.arange(5), batch, 4)
    assert [mb.batch.query_lens for mb in micro_batches] == [[2], [3]] and order.tolist() == [0, 1]


def test_store_step_must_extend_exactly_what_is_stored():
    store = RoundRobinKVStore(num_layers=2, num_kv_heads=1, head_dim=4, cp_size=1, cp_rank=0)
    with pytest.raises(ValueError, match="context_len=3"):
        store.begin_step(shard_plan([2], 1, context_lens=[3]), ["a"], None)
    with pytest.raises(ValueError, match="distinct key"):
        store.begin_step(shard_plan([2, 2], 1), ["a", "a"], None)
    plan = shard_plan([3, 2], 1)
    step = store.begin_step(plan, ["a", "b"], None)
    for layer in range(2):
        packed = torch.arange(5 * 4, dtype=torch.float32).view(5, 1, 4) + 100 * layer
        k = shard(packed, plan, 0)  # the rank's rows, padding included
        step.send_new(layer, k, -k)
    step.commit()
    assert (store.num_tokens("a"), store.num_tokens("b"), store.num_tokens("c")) == (3, 2, 0)
    k_b, v_b = store.rows("b", 1)
    assert torch.equal(k_b[:, 0, 0], torch.tensor([112.0, 116.0])) and torch.equal(v_b, -k_b)
    assert store.drop("a") and not store.drop("a") and store.keys() == ["b"]


def test_attention_batch_context_needs_a_cache_and_keys_match_sequences():
    with pytest.raises(ValueError, match="seq_keys"):
        AttentionBatch([2], [3], None, torch.tensor([1]))
    AttentionBatch([2], [3], None, torch.tensor([1]), seq_keys=["a"])
    with pytest.raises(ValueError, match="2 keys for 1 sequences"):
        AttentionBatch([2], [0], None, torch.tensor([1]), seq_keys=["a", "b"])


def test_cp_rates_must_be_positive():
    with pytest.raises(ValueError, match="peak_flops"):
        CPRates(peak_flops=0)
