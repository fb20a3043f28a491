import dataclasses

from orchestrator.apply_plan import plan_apply
from orchestrator.config import MeshSection, parse_config


def _config(prefill=1, decode=1, **changes):
    raw = {"model": {"path": "/models/m"}, "prefill": {"replicas": prefill}, "decode": {"replicas": decode}}
    for key, value in changes.items():
        section, _, field = key.partition("__")
        raw.setdefault(section, {})[field] = value
    return parse_config(raw)


def test_scale_up_and_down_grow_before_shrink():
    plan = plan_apply(_config(1, 2), _config(2, 1))
    assert plan.ok
    assert [(a.kind, a.tier, a.count) for a in plan.actions] == [("add", "prefill", 1), ("remove", "decode", 1)]
    assert plan.describe()[0].startswith("1. add 1 prefill replica")


def test_noop_and_counts_from_the_live_deployment():
    assert plan_apply(_config(1, 1), _config(1, 1)).is_noop
    # one decode replica is already gone (e.g. removed by hand): apply restores the count in the file
    plan = plan_apply(_config(1, 2), _config(1, 2), running_counts={"prefill": 1, "decode": 1})
    assert [(a.kind, a.tier, a.count) for a in plan.actions] == [("add", "decode", 1)]


def test_changed_limits_roll_replicas_one_at_a_time():
    plan = plan_apply(_config(1, 2), _config(1, 2, decode__max_num_seqs=8))
    assert [(a.kind, a.tier, a.count) for a in plan.actions] == [("replace", "decode", 2)]
    assert "max_num_seqs: 64 -> 8" in plan.actions[0].reason


def test_refuses_model_router_and_empty_tier_changes_with_reasons():
    running = _config(1, 1)
    other_model = dataclasses.replace(running, model=dataclasses.replace(running.model, path="/models/other"))
    plan = plan_apply(running, other_model)
    assert not plan.ok and not plan.actions
    assert "model changes" in plan.refusals[0] and "new deployment" in plan.refusals[0]
    assert "router section" in plan_apply(running, _config(1, 1, router__port=6000)).refusals[0]
    assert "no decode replica" in plan_apply(running, _config(1, 0)).refusals[0]
    assert plan_apply(running, _config(1, 0)).describe()[0].startswith("refused:")


def test_mesh_change_is_a_replacement():
    running = _config(1, 1)
    wanted = dataclasses.replace(running, decode=dataclasses.replace(running.decode, mesh=MeshSection(tp=2)))
    plan = plan_apply(running, wanted)
    assert [(a.kind, a.tier) for a in plan.actions] == [("replace", "decode")]
    assert "mesh" in plan.actions[0].reason


def test_refuses_a_mode_change_naming_the_key():
    disaggregated = _config(1, 2)
    colocated = parse_config({"model": {"path": "/models/m"}, "mode": "colocated", "decode": {"replicas": 2}})
    for running, wanted in ((disaggregated, colocated), (colocated, disaggregated)):
        plan = plan_apply(running, wanted)
        assert not plan.ok and not plan.actions
        assert len(plan.refusals) == 1 and plan.refusals[0].startswith(f"mode: {running.mode} -> {wanted.mode}")
