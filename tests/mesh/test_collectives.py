"""The collective selection on CPU: config validation, the crossover table read off timings, the merge of configured
and measured crossovers, per-call routing (with a recording stand-in for the direct-access group), and the fallback
to torch.distributed for Gloo groups. The real kernels are checked against NCCL in test_dda_nccl.py (GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mesh import collectives as coll
from mesh import comm
from mesh.collectives import (NCCL, ONE_SHOT, TWO_SHOT, DIRECT, CrossoverTable, GroupCollectives,
                              crossover_from_timings, install, merge_table, table_from_timings)
from mesh.collectives_config import CollectivesConfig, CollectivesConfigError, parse_collectives_config
from mesh.dda import DirectAccessGroup, DirectAccessUnavailable, _element_splits, launch_shape

KIB = 1024


# ---- config ------------------------------------------------------------------------------------------------------

def test_defaults_are_auto_and_measured():
    config = parse_collectives_config(None)
    assert config == CollectivesConfig()
    assert config.all_reduce == "auto" and config.all_to_all == "auto"
    assert config.needs_measurement and not config.is_all_nccl


def test_fully_configured_table_needs_no_measurement():
    config = parse_collectives_config({"one_shot_max_bytes": 64 * KIB, "two_shot_max_bytes": 1 << 20,
                                       "direct_all_to_all_max_bytes": 0})
    assert not config.needs_measurement
    assert parse_collectives_config({"all_reduce": "nccl", "all_to_all": "nccl"}).is_all_nccl


@pytest.mark.parametrize("raw, key", [
    ({"all_reduce": "fastest"}, "all_reduce"),
    ({"all_reduce": 1}, "all_reduce"),
    ({"all_to_all": "one-shot"}, "all_to_all"),
    ({"one_shot_max_bytes": -1}, "one_shot_max_bytes"),
    ({"two_shot_max_bytes": True}, "two_shot_max_bytes"),
    ({"direct_all_to_all_max_bytes": 1.5}, "direct_all_to_all_max_bytes"),
    ({"one_shot_max_bytes": 1 << 20, "two_shot_max_bytes": 64 * KIB}, "two_shot_max_bytes"),
    ({"buffer_bytes": 5000}, "buffer_bytes"),
    ({"buffer_bytes": 0}, "buffer_bytes"),
    ({"allreduce": "auto"}, "allreduce"),
])
def test_bad_settings_name_their_key(raw, key):
    with pytest.raises(CollectivesConfigError) as caught:
        parse_collectives_config(raw)
    assert caught.value.key == key
    assert f"collectives.{key}" in str(caught.value)


def test_a_non_mapping_is_refused():
    with pytest.raises(CollectivesConfigError, match="expected a mapping"):
        parse_collectives_config("auto")


# ---- the table ---------------------------------------------------------------------------------------------------

SIZES = [16 * KIB, 64 * KIB, 256 * KIB, 1 << 20, 4 << 20]


def test_crossovers_read_off_a_sweep():
    timings = {NCCL: [20, 22, 30, 40, 90], ONE_SHOT: [5, 7, 15, 60, 200], TWO_SHOT: [8, 9, 14, 35, 100]}
    a2a = {NCCL: [25, 30, 45, 80], DIRECT: [8, 12, 50, 150]}
    table = table_from_timings(all_reduce_sizes=SIZES, all_reduce_us=timings, all_to_all_sizes=SIZES[:4],
                               all_to_all_us=a2a)
    # one-shot wins 16 and 64 KiB, two-shot 256 KiB and 1 MiB, NCCL 4 MiB
    assert table == CrossoverTable(one_shot_max_bytes=64 * KIB, two_shot_max_bytes=1 << 20,
                                   direct_all_to_all_max_bytes=64 * KIB)
    assert [table.all_reduce_algorithm(n) for n in (8 * KIB, 64 * KIB, 65 * KIB, 1 << 20, (1 << 20) + 2)] == \
        [ONE_SHOT, ONE_SHOT, TWO_SHOT, TWO_SHOT, NCCL]
    assert table.all_to_all_algorithm(64 * KIB) == DIRECT and table.all_to_all_algorithm(100 * KIB) == NCCL


def test_no_crossover_when_nccl_wins_the_smallest_size():
    assert crossover_from_timings(SIZES, {NCCL: [1] * 5, ONE_SHOT: [2] * 5}, (ONE_SHOT,)) == 0
    # a direct win after a loss does not count: the crossover is where the first run of wins ends
    assert crossover_from_timings(SIZES, {NCCL: [9, 1, 9, 9, 9], ONE_SHOT: [2] * 5}, (ONE_SHOT,)) == 16 * KIB


def test_two_shot_only_range_and_bad_input():
    timings = {NCCL: [20, 20, 20, 20, 20], ONE_SHOT: [30, 30, 30, 30, 30], TWO_SHOT: [10, 10, 10, 10, 30]}
    table = table_from_timings(all_reduce_sizes=SIZES, all_reduce_us=timings)
    assert table.one_shot_max_bytes == 0 and table.two_shot_max_bytes == 1 << 20
    with pytest.raises(ValueError, match="ascend"):
        crossover_from_timings(SIZES[::-1], {NCCL: [1] * 5}, (ONE_SHOT,))
    with pytest.raises(ValueError, match="timings"):
        crossover_from_timings(SIZES, {NCCL: [1] * 4}, (ONE_SHOT,))
    with pytest.raises(ValueError, match="byte count"):
        CrossoverTable(one_shot_max_bytes=-5)


MEASURED = CrossoverTable(one_shot_max_bytes=128 * KIB, two_shot_max_bytes=2 << 20,
                          direct_all_to_all_max_bytes=1 << 20)


@pytest.mark.parametrize("settings, expected", [
    ({}, (128 * KIB, 2 << 20, 1 << 20)),
    ({"one_shot_max_bytes": 32 * KIB}, (32 * KIB, 2 << 20, 1 << 20)),  # configured beats measured
    ({"one_shot_max_bytes": 0, "two_shot_max_bytes": 0}, (0, 0, 1 << 20)),
    ({"all_reduce": "nccl", "all_to_all": "nccl"}, (0, 0, 0)),
    ({"all_reduce": "one-shot"}, (4 << 20, 4 << 20, 1 << 20)),  # forced: up to half the buffer
    ({"all_reduce": "two-shot", "all_to_all": "direct"}, (0, 4 << 20, 4 << 20)),
    ({"buffer_bytes": 1 << 20}, (128 * KIB, 512 * KIB, 512 * KIB)),  # nothing larger than half the buffer
])
def test_merge_of_configured_and_measured(settings, expected):
    table = merge_table(CollectivesConfig(**settings), MEASURED)
    assert (table.one_shot_max_bytes, table.two_shot_max_bytes, table.direct_all_to_all_max_bytes) == expected


# ---- dda helpers that need no GPU -----------------------------------------------------------------------------------

def test_launch_shape_and_splits():
    small = launch_shape(8192, 2, max_blocks=64)
    assert (small.block_elems, small.num_blocks) == (2048, 4)  # 16-byte vectors: 8 bf16 per thread, 256 threads
    assert launch_shape(1 << 26, 4, max_blocks=64).num_blocks == 64
    assert launch_shape(1, 4, max_blocks=64).num_blocks == 1
    x = torch.empty(10, 3)
    assert _element_splits(x, [4, 6], 2, "input") == ([0, 12], [12, 18])
    assert _element_splits(x, None, 2, "input") == ([0, 15], [15, 15])
    with pytest.raises(ValueError, match="input_split_sizes"):
        _element_splits(x, [4, 5], 2, "input")
    with pytest.raises(ValueError, match="not divisible"):
        _element_splits(torch.empty(9, 3), None, 2, "input")


# ---- routing and fallback on a one-rank Gloo group -----------------------------------------------------------------

@pytest.fixture(scope="module")
def gloo_group(tmp_path_factory):
    if dist.is_initialized():
        pytest.fail("another test left a torch.distributed world open")
    store = dist.FileStore(str(tmp_path_factory.mktemp("store") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


class RecordingDirectAccess:
    """Stands in for DirectAccessGroup: takes CPU tensors, records what it was asked to run."""

    def __init__(self, buffer_bytes: int = 1 << 20) -> None:
        self.buffer_bytes = buffer_bytes
        self.message_bytes = buffer_bytes
        self.world_size = 1
        self.calls: list[tuple] = []

    def supports(self, tensor):
        return tensor.is_contiguous() and tensor.numel() * tensor.element_size() <= self.buffer_bytes

    def all_reduce(self, tensor, algorithm):
        self.calls.append(("all_reduce", algorithm, tensor.numel()))

    def all_to_all_single(self, output, input, output_split_sizes=None, input_split_sizes=None):
        if input.numel() > 1000:
            raise ValueError("share larger than its slot")
        self.calls.append(("all_to_all", input.numel()))
        output.copy_(input)


def _fake_cuda(monkeypatch):
    """GroupCollectives asks input.is_cuda for the all-to-all; CPU tensors stand in here."""
    monkeypatch.setattr(coll.GroupCollectives, "all_to_all_algorithm",
                        lambda self, output, input: NCCL if self.dda is None or input.numel() * 4 >
                        self.dda.message_bytes else self.table.all_to_all_algorithm(input.numel() * 4))


def test_calls_follow_the_table_and_fall_back(gloo_group, monkeypatch):
    _fake_cuda(monkeypatch)
    dda = RecordingDirectAccess()
    table = CrossoverTable(one_shot_max_bytes=4 * KIB, two_shot_max_bytes=64 * KIB,
                           direct_all_to_all_max_bytes=16 * KIB)
    group = GroupCollectives(gloo_group, table, dda)
    for numel in (16, 1024, 1025, 16384, 16385, 1 << 20):  # float32: 64 B, 4 KiB, >4 KiB, 64 KiB, >64 KiB, 4 MiB
        x = torch.ones(numel)
        group.all_reduce(x)
        assert torch.equal(x, torch.ones(numel))  # NCCL fallback over one rank: the sum is the input
    wide = torch.ones(64, 4).t()  # non-contiguous: NCCL
    group.all_reduce(wide)
    assert dda.calls == [("all_reduce", ONE_SHOT, 16), ("all_reduce", ONE_SHOT, 1024), ("all_reduce", TWO_SHOT, 1025),
                         ("all_reduce", TWO_SHOT, 16384)]
    assert group.calls_by_algorithm == {ONE_SHOT: 2, TWO_SHOT: 2, NCCL: 3}
    out = torch.empty(100)
    group.all_to_all_single(out, torch.arange(100.0))  # direct
    assert torch.equal(out, torch.arange(100.0))
    big_out = torch.empty(2000)
    group.all_to_all_single(big_out, torch.arange(2000.0))  # direct refuses (slot): NCCL
    assert torch.equal(big_out, torch.arange(2000.0))
    assert dda.calls[-1] == ("all_to_all", 100)
    assert group.calls_by_algorithm[DIRECT] == 1 and group.calls_by_algorithm[NCCL] == 4


def test_install_leaves_gloo_groups_on_torch_distributed(gloo_group):
    result = install(gloo_group, CollectivesConfig())
    assert result.dda is None and "gloo" in result.fallback_reason
    assert comm.group_impl(gloo_group) is None
    x = torch.full((8,), 3.0)
    result.all_reduce(x)
    assert torch.equal(x, torch.full((8,), 3.0))
    assert install(gloo_group, CollectivesConfig(all_reduce="nccl", all_to_all="nccl")).dda is None


def test_direct_access_refuses_a_cpu_group(gloo_group):
    with pytest.raises(DirectAccessUnavailable, match="not CUDA|not nccl"):
        DirectAccessGroup.create(gloo_group)


def test_install_plugs_the_group_into_comm(gloo_group, monkeypatch):
    dda = RecordingDirectAccess()
    monkeypatch.setattr(coll, "_group_fallback_reason", lambda group, config: "")
    monkeypatch.setattr(DirectAccessGroup, "create", classmethod(lambda cls, group, buffer_bytes: dda))
    seen_configs = []

    def measure(dda_group, config):
        seen_configs.append(config)
        return CrossoverTable(one_shot_max_bytes=1 * KIB, two_shot_max_bytes=1 * KIB)

    try:
        result = install(gloo_group, CollectivesConfig(two_shot_max_bytes=0), measure=measure)
        assert result.table.as_dict() == {"one_shot_max_bytes": 1 * KIB, "two_shot_max_bytes": 1 * KIB,
                                          "direct_all_to_all_max_bytes": 0}
        assert len(seen_configs) == 1
        with comm.ledger_scope() as ledger:
            comm.all_reduce(torch.ones(100), group=gloo_group, kind="tp_allreduce")  # 400 B: one-shot
            comm.all_reduce(torch.ones(1000), group=gloo_group, kind="tp_allreduce")  # 4000 B: NCCL
        assert dda.calls == [("all_reduce", ONE_SHOT, 100)]
        assert ledger.bytes_by_kind["tp_allreduce"] == 4400  # still counted by mesh.comm
        # a complete table is not measured again
        install(gloo_group, CollectivesConfig(one_shot_max_bytes=0, two_shot_max_bytes=0,
                                              direct_all_to_all_max_bytes=0), measure=measure)
        assert len(seen_configs) == 1
    finally:
        comm.unregister_group_impl(gloo_group)


def test_install_for_mesh_sets_up_the_tp_and_ep_groups_in_order(gloo_group, monkeypatch):
    """Tier ranks call install_for_mesh after joining: each model group once, tp before ep, none on one rank."""
    from types import SimpleNamespace

    seen = []
    monkeypatch.setattr(coll, "install", lambda group, config=None: seen.append((group, config)) or group)
    config = CollectivesConfig(all_reduce="nccl")
    assert coll.install_for_mesh(SimpleNamespace(tp_group=None, ep_group=None), config) == []
    assert coll.install_for_mesh(SimpleNamespace(tp_group="tp", ep_group="ep"), config) == ["tp", "ep"]
    assert seen == [("tp", config), ("ep", config)]
    seen.clear()
    monkeypatch.undo()
    installed = coll.install_for_mesh(SimpleNamespace(tp_group=gloo_group, ep_group=None))
    assert len(installed) == 1 and installed[0].dda is None and "gloo" in installed[0].fallback_reason
