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
from mesh.cp_sharding import PADDING, shard, shard_plan
from mesh.parallel import MeshShape


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
            assert [l for r in ranges for l in r] == list(range(num_layers))
            sizes = [len(r) for r in ranges]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_stage_layer_ranges_refuse_more_stages_than_layers():
    with pytest.raises(ValueError, match="pp=5"):
        stage_layer_ranges(4, 5)


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4, 8])
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_head_ranges_follow_the_models_shard_rule(num_kv_heads, tp):
    # mesh.model.Attention: num_kv_shards = min(tp, H); local heads H / shards; shard index tp_rank * shards // tp.
    num_shards = min(tp, num_kv_heads)
    per_rank = num_kv_heads // num_shards
    holders: dict[int, list[int]] = {}
    for tp_rank in range(tp):
        shard_index = tp_rank * num_shards // tp
        heads = tp_head_range(num_kv_heads, tp, tp_rank)
        assert heads == range(shard_index * per_rank, (shard_index + 1) * per_rank)
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


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
@pytest.mark.parametrize("num_tokens", [1, 2, 5, 7, 8, 16, 23, 24, 25])
def test_token_runs_describe_the_cp_shard_rows(cp, num_tokens):
    layout = PrefillLayout(num_layers=2, num_kv_heads=2, cp=cp, tp=2)
    x = torch.arange(num_tokens, dtype=torch.float64).view(-1, 1) + 1  # row p holds p + 1; padding holds 0
    cp_plan = shard_plan([num_tokens], cp)
    seen = []
    for cp_rank in range(cp):
        rank = layout.rank_of(pp=0, cp=cp_rank, tp=1)
        # cp = 1 does not shard at all: the model emits the sequence's rows in order, unpadded.
        local = shard(x, cp_plan, cp_rank) if cp > 1 else x
        assert local.shape[0] == layout.num_local_rows(num_tokens)
        positions = layout.token_positions(rank, num_tokens)
        assert torch.equal(positions, cp_plan.token_indices[cp_rank] if cp > 1 else torch.arange(num_tokens))
        runs = layout.token_runs(rank, num_tokens)
        assert len(runs) <= 2
        covered_rows = []
        for run in runs:
            assert run.length >= 1
            rows = torch.arange(run.src_row, run.src_row + run.length)
            assert torch.equal(local[rows, 0], torch.arange(run.token_start, run.token_start + run.length) + 1.0)
            covered_rows += rows.tolist()
            seen += range(run.token_start, run.token_start + run.length)
        # Every real row is in a run, every other row is padding.
        assert sorted(covered_rows) == torch.nonzero(positions != PADDING).flatten().tolist()
    assert sorted(seen) == list(range(num_tokens))


@pytest.mark.parametrize("cp", [1, 2, 3])
def test_packed_row_starts_locate_each_sequence_in_a_packed_step(cp):
    layout = PrefillLayout(num_layers=1, num_kv_heads=1, cp=cp)
    query_lens = [5, 1, 12, 7]
    starts = layout.packed_row_starts(query_lens)
    if cp == 1:
        assert starts == [0, 5, 6, 18]
        return
    cp_plan = shard_plan(query_lens, cp)
    seq_starts = [0, 5, 6, 18]
    for cp_rank in range(cp):
        assert starts[-1] + layout.num_local_rows(query_lens[-1]) == cp_plan.num_local_tokens
        for seq, (start, num_tokens) in enumerate(zip(starts, query_lens)):
            rows = slice(start, start + layout.num_local_rows(num_tokens))
            seq_ids = cp_plan.seq_ids[cp_rank][rows]
            assert set(seq_ids.tolist()) <= {seq, PADDING}
            packed = cp_plan.token_indices[cp_rank][rows]
            alone = layout.token_positions(cp_rank, num_tokens)
            assert torch.equal(torch.where(packed == PADDING, PADDING, packed - seq_starts[seq]), alone)


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
