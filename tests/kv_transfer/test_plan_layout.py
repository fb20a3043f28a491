"""Replica-wide KV layouts (kv_transfer.mesh_layout): layer stages, head placement, CP token rows."""

from __future__ import annotations

import pytest
import torch

from kv_transfer.mesh_layout import (
    DecodeLayout,
    PrefillLayout,
    TokenRun,
    stage_layer_ranges,
    tp_head_holders,
    tp_head_range,
)
from mesh.config import ModelConfig
from mesh.context_parallel import CPHookRows, CPRates, CPStep
from mesh.kv_layout import kv_head_range
from mesh.parallel import MeshShape, stage_layer_range


@pytest.mark.parametrize("num_layers, pp, expected", [
    (4, 1, [range(0, 4)]),
    (4, 2, [range(0, 2), range(2, 4)]),
    (5, 2, [range(0, 3), range(3, 5)]),
    (7, 3, [range(0, 3), range(3, 5), range(5, 7)]),
    (3, 3, [range(0, 1), range(1, 2), range(2, 3)]),
])
def test_stage_layer_ranges_are_contiguous_and_front_loaded(num_layers, pp, expected):
    assert list(stage_layer_ranges(num_layers, pp)) == expected


def test_stage_layer_ranges_cover_every_layer_once_and_balance():
    for num_layers in range(1, 20):
        for pp in range(1, num_layers + 1):
            ranges = stage_layer_ranges(num_layers, pp)
            assert list(ranges) == [stage_layer_range(num_layers, pp, stage) for stage in range(pp)]  # the model's
            assert [l for r in ranges for l in r] == list(range(num_layers))
            sizes = [len(r) for r in ranges]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_stage_layer_ranges_refuse_more_stages_than_layers():
    with pytest.raises(ValueError, match="pp=5"):
        stage_layer_ranges(4, 5)


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4, 8])
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_head_ranges_follow_the_models_shard_rule(num_kv_heads, tp):
    # The rule, spelled out: num_kv_shards = min(tp, H); local heads H / shards; shard index tp_rank * shards // tp.
    num_shards = min(tp, num_kv_heads)
    per_rank = num_kv_heads // num_shards
    holders: dict[int, list[int]] = {}
    for tp_rank in range(tp):
        shard_index = tp_rank * num_shards // tp
        heads = tp_head_range(num_kv_heads, tp, tp_rank)
        assert heads == range(shard_index * per_rank, (shard_index + 1) * per_rank)
        assert heads == kv_head_range(num_kv_heads, tp, tp_rank)  # what mesh.decoder's attention takes
        for head in heads:
            holders.setdefault(head, []).append(tp_rank)
    assert sorted(holders) == list(range(num_kv_heads))
    for head, ranks in holders.items():
        assert list(tp_head_holders(num_kv_heads, tp, head)) == ranks
        assert len(ranks) == max(1, tp // num_kv_heads)


def test_rank_coordinates_match_the_mesh_rank_layout():
    layout = PrefillLayout(num_layers=6, num_kv_heads=4, pp=3, cp=2, tp=2)
    shape = MeshShape(pp=3, cp=2, tp=2)
    assert layout.world_size == 12
    for rank in range(12):
        coords = shape.coords(rank)
        assert layout.coords(rank) == coords
        assert layout.rank_of(**coords) == rank
        assert layout.layer_range(rank) == stage_layer_ranges(6, 3)[coords["pp"]]
        assert layout.head_range(rank) == range(2 * coords["tp"], 2 * coords["tp"] + 2)
    decode = DecodeLayout(num_layers=6, num_kv_heads=4, pp=2, tp=4, block_size=4)
    assert decode.world_size == 8
    assert decode.coords(5) == {"pp": 1, "cp": 0, "tp": 1}
    assert decode.rank_of(pp=1, tp=1) == 5
    assert decode.layer_range(5) == range(3, 6) and decode.head_range(5) == range(1, 2)


def hook_rows(query_lens: list[int], cp: int, cp_rank: int) -> CPHookRows:
    """What the model's layer hook receives on cp rank `cp_rank` of a CP prefill step (mesh.context_parallel)."""
    input_ids = torch.zeros(sum(query_lens), dtype=torch.long)
    return CPStep.build(input_ids, query_lens, [0] * len(query_lens), cp_size=cp, cp_rank=cp_rank, group=None,
                        cp_mode="pass-kv", heads=(1, 1, 1), dtype_bytes=4, rates=CPRates()).hook_rows


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
@pytest.mark.parametrize("num_tokens", [1, 2, 5, 7, 8, 16, 23, 24, 25])
def test_token_rows_are_the_rows_the_layer_hook_receives(cp, num_tokens):
    layout = PrefillLayout(num_layers=2, num_kv_heads=2, cp=cp, tp=2)
    seen = []
    for cp_rank in range(cp):
        rank = layout.rank_of(pp=0, cp=cp_rank, tp=1)
        positions = layout.token_positions(rank, num_tokens)
        # cp = 1 does not shard: the hook gets the step's rows in order.
        want = hook_rows([num_tokens], cp, cp_rank).positions if cp > 1 else torch.arange(num_tokens)
        assert torch.equal(positions, want)
        assert layout.num_local_rows(rank, num_tokens) == want.numel()
        runs = layout.token_runs(rank, num_tokens)
        assert len(runs) <= 2
        rows = []
        for run in runs:
            assert run.length >= 1
            assert positions[run.src_row:run.src_row + run.length].tolist() == list(
                range(run.token_start, run.token_start + run.length))
            rows += range(run.src_row, run.src_row + run.length)
            seen += range(run.token_start, run.token_start + run.length)
        assert rows == list(range(positions.numel()))  # the runs tile the rows in order
    assert sorted(seen) == list(range(num_tokens))


@pytest.mark.parametrize("cp", [1, 2, 3])
def test_packed_row_starts_locate_each_sequence_in_a_packed_step(cp):
    layout = PrefillLayout(num_layers=1, num_kv_heads=1, cp=cp)
    query_lens = [5, 1, 12, 7, 2]
    for cp_rank in range(cp):
        starts = layout.packed_row_starts(cp_rank, query_lens)
        if cp == 1:
            assert starts == [0, 5, 6, 18, 25]
            continue
        rows = hook_rows(query_lens, cp, cp_rank)
        for seq, num_tokens in enumerate(query_lens):
            mine = torch.nonzero(rows.seq_ids == seq).flatten()
            count = layout.num_local_rows(cp_rank, num_tokens)
            assert mine.tolist() == list(range(starts[seq], starts[seq] + count))
            assert torch.equal(rows.positions[mine], layout.token_positions(cp_rank, num_tokens))


def test_adjacent_middle_chunks_form_one_run():
    layout = PrefillLayout(num_layers=1, num_kv_heads=1, cp=2)
    # 8 tokens, 4 chunks of 2: rank 1 holds chunks 1 and 2, positions 2..5 in rows 0..3.
    assert layout.token_runs(1, 8) == (TokenRun(src_row=0, token_start=2, length=4),)
    assert layout.token_runs(0, 8) == (TokenRun(0, 0, 2), TokenRun(2, 6, 2))
    # 3 tokens, chunks of 1: rank 1's chunks 1 and 2 hold tokens 1 and 2; rank 0's chunk 3 is padding.
    assert layout.token_runs(0, 3) == (TokenRun(0, 0, 1),)
    assert layout.token_runs(1, 3) == (TokenRun(0, 1, 2),)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_layers=0, num_kv_heads=2), "num_layers must be an integer >= 1"),
    (dict(num_layers=2, num_kv_heads=2, pp=3), "pp=3 is larger than num_layers=2"),
    (dict(num_layers=2, num_kv_heads=4, tp=3), "tp=3 does not divide num_kv_heads=4"),
    (dict(num_layers=2, num_kv_heads=2, tp=6, cp=1), None),
    (dict(num_layers=2, num_kv_heads=4, tp=6), "not a multiple"),
    (dict(num_layers=2, num_kv_heads=2, cp=0), "cp must be an integer >= 1"),
    (dict(num_layers=2, num_kv_heads=2, tp=True), "tp must be an integer"),
])
def test_prefill_layout_validation_names_the_problem(kwargs, message):
    if message is None:
        PrefillLayout(**kwargs)  # tp=6 replicates each of 2 heads on 3 ranks: allowed
        return
    with pytest.raises(ValueError, match=message):
        PrefillLayout(**kwargs)


def test_decode_layout_validation_names_the_problem():
    with pytest.raises(ValueError, match="block_size must be an integer >= 1"):
        DecodeLayout(num_layers=2, num_kv_heads=2, block_size=0)
    with pytest.raises(ValueError, match="DecodeLayout: tp=3"):
        DecodeLayout(num_layers=2, num_kv_heads=2, tp=3)
    with pytest.raises(ValueError, match="rank 4 is outside"):
        DecodeLayout(num_layers=2, num_kv_heads=2, tp=2, pp=2).layer_range(4)


def test_layouts_are_frozen():
    layout = DecodeLayout(num_layers=2, num_kv_heads=2)
    with pytest.raises(AttributeError):
        layout.tp = 2  # type: ignore[misc]


def test_layouts_from_a_mesh_and_model_config():
    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_layers=5, num_heads=8, num_kv_heads=2, head_dim=4, rope_theta=10000.0, rope_scaling=None,
                         rms_norm_eps=1e-5, max_position_embeddings=128, tie_word_embeddings=False, qkv_bias=False,
                         bos_token_id=None, eos_token_ids=(1,))
    prefill = PrefillLayout.from_mesh(MeshShape(pp=2, cp=3, tp=4), config)
    assert prefill == PrefillLayout(num_layers=5, num_kv_heads=2, pp=2, cp=3, tp=4)
    decode = DecodeLayout.from_mesh(MeshShape(tp=8), config, block_size=16)
    assert decode == DecodeLayout(num_layers=5, num_kv_heads=2, tp=8, block_size=16)
    with pytest.raises(ValueError, match="decode meshes have cp=1"):
        DecodeLayout.from_mesh(MeshShape(cp=2), config, block_size=16)
    with pytest.raises(ValueError, match="tp=3"):
        PrefillLayout.from_mesh(MeshShape(tp=3), config)
