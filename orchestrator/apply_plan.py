"""`pdcluster apply`: what must change to make a running deployment match an edited cluster.yaml.

Pure: `plan_apply(running, wanted)` compares two validated configs and returns the ordered actions, or the reasons
the change is refused. The deployment (orchestrator/deploy.py) carries the actions out; the CLI prints the plan
first (`--dry-run` prints only).

What apply can change safely, without dropping a request:
  - a tier's replica count: new replicas start before they take traffic; removed ones drain first (no new work,
    in-flight requests finish, reservations released), newest first;
  - a tier's mesh, resources or batch limits: a rolling replacement, one replica at a time (start the new one,
    then drain and remove an old one), so capacity never drops below the current count;
  - min/max bounds (checked against the counts).
What it refuses, saying why: a different model (prefill and decode replicas must hold the same weights, and the
router's tokenizer belongs to the model), and router, kv_transfer or ray sections (they live in the serving
process: restart `pdcluster serve` with the new file).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from orchestrator.config import ClusterConfig, TierSection

_REPLICA_SHAPE_FIELDS = ("mesh", "resources", "max_batch_tokens", "max_batch_seqs", "num_kv_blocks",
                         "gpu_memory_fraction", "block_size", "max_num_seqs")


@dataclass(frozen=True, kw_only=True)
class Action:
    kind: str  # "add" | "remove" | "replace"
    tier: str
    count: int = 1
    reason: str = ""

    def describe(self) -> str:
        noun = "replica" if self.count == 1 else "replicas"
        verbs = {"add": f"add {self.count} {self.tier} {noun}",
                 "remove": f"drain and remove {self.count} {self.tier} {noun}",
                 "replace": f"replace {self.count} {self.tier} {noun} one at a time (start new, then drain old)"}
        return verbs[self.kind] + (f" ({self.reason})" if self.reason else "")


@dataclass(frozen=True, kw_only=True)
class ApplyPlan:
    actions: tuple[Action, ...] = ()
    refusals: tuple[str, ...] = ()
    tiers: dict = dataclasses.field(default_factory=dict)  # tier name -> wanted TierSection

    @property
    def is_noop(self) -> bool:
        return not self.actions and not self.refusals

    @property
    def ok(self) -> bool:
        return not self.refusals

    def describe(self) -> list[str]:
        if self.refusals:
            return [f"refused: {r}" for r in self.refusals]
        if not self.actions:
            return ["nothing to change: the deployment already matches the file"]
        return [f"{i + 1}. {a.describe()}" for i, a in enumerate(self.actions)]


def _shape_changes(old: TierSection, new: TierSection) -> list[str]:
    return [f"{name}: {getattr(old, name)} -> {getattr(new, name)}" for name in _REPLICA_SHAPE_FIELDS
            if getattr(old, name) != getattr(new, name)]


def plan_apply(running: ClusterConfig, wanted: ClusterConfig, running_counts: dict[str, int] | None = None) -> ApplyPlan:
    """`running_counts`: replicas per tier as deployed now (defaults to the running config's counts)."""
    refusals: list[str] = []
    if (running.model.path, running.model.dtype) != (wanted.model.path, wanted.model.dtype):
        refusals.append(f"model changes ({running.model.path} [{running.model.dtype}] -> {wanted.model.path} "
                        f"[{wanted.model.dtype}]) need a new deployment: both tiers and the router's tokenizer must "
                        "use the same weights; start `pdcluster serve` with the new file")
    if running.mode != wanted.mode:
        # The router decides per request whether a prefill tier exists; switching modes under it would leave a tier
        # it never uses (colocated -> disaggregated) or a router sending to a tier that is gone.
        refusals.append(f"mode: {running.mode} -> {wanted.mode} changes how the router serves every request; "
                        "restart `pdcluster serve` with the new file")
        return ApplyPlan(actions=(), refusals=tuple(refusals))
    for section in ("router", "kv_transfer", "ray"):
        if getattr(running, section) != getattr(wanted, section):
            refusals.append(f"the {section} section changed; it belongs to the serving process: restart "
                            "`pdcluster serve` with the new file")
    counts = dict(running_counts or {t.name: t.replicas for t in running.tiers()})
    actions: list[Action] = []
    for old, new in zip(running.tiers(), wanted.tiers()):
        have = counts.get(new.name, old.replicas)
        if new.replicas == 0 and have > 0:
            refusals.append(f"{new.name}.replicas: 0 would leave no {new.name} replica to serve requests")
            continue
        changes = _shape_changes(old, new)
        if changes and have > 0:
            actions.append(Action(kind="replace", tier=new.name, count=min(have, new.replicas),
                                  reason="; ".join(changes)))
        if new.replicas > have:
            actions.append(Action(kind="add", tier=new.name, count=new.replicas - have))
        elif new.replicas < have:
            actions.append(Action(kind="remove", tier=new.name, count=have - new.replicas))
    # Grow before shrinking, so capacity never dips while the plan runs.
    order = {"add": 0, "replace": 1, "remove": 2}
    actions.sort(key=lambda a: order[a.kind])
    return ApplyPlan(actions=tuple(actions) if not refusals else (), refusals=tuple(refusals),
                     tiers={t.name: t for t in wanted.tiers()})
