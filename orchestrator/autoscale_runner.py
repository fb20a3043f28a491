"""The autoscale loop inside the serving process: measure, decide (orchestrator/autoscale.py), apply.

Who calls it: `RunningCluster.start` (orchestrator/serve.py) when some tier of cluster.yaml has an `autoscale:`
block. It feeds every finished request to `record` (the router's `on_request_done`) and runs `run()` on the
router's event loop. Each tier is evaluated every `interval_s` of its block (read again each time, so a
`pdcluster apply` that changes the block takes effect). A change is carried out by `apply_config`
(orchestrator/apply.py), the code path of `pdcluster apply`: new replicas start before they take traffic, a
removed one drains first, and the two never run at the same time (one lock per deployment). Every decision is
logged on `pdcluster.autoscale` with its reason; the latest one per tier and the recent changes are in
`status()`, which `pdcluster status` shows.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time

from orchestrator.apply import apply_config, apply_lock
from orchestrator.autoscale import Decision, TierPlanner, observe
from orchestrator.request_log import RequestRecord

log = logging.getLogger("pdcluster.autoscale")

TIERS = ("prefill", "decode")
_MAX_RECORDS = 100_000  # bounds memory under any load; a window holds far fewer at the rates one router serves
_NUM_CHANGES_KEPT = 20


class AutoscaleRunner:
    def __init__(self, backend, *, clock=time.time, tick_s: float = 0.25):
        """backend: the ClusterBackend (its `deployment` is scaled). clock: seconds, the records' end_time scale."""
        self._backend = backend
        self._clock = clock
        self._tick_s = tick_s
        self._records: collections.deque[RequestRecord] = collections.deque(maxlen=_MAX_RECORDS)
        self._planners: dict[str, TierPlanner] = {}
        self._next_at: dict[str, float] = {}
        self.latest: dict[str, Decision] = {}
        self.changes: collections.deque[Decision] = collections.deque(maxlen=_NUM_CHANGES_KEPT)

    @staticmethod
    def is_wanted(config) -> bool:
        return any(tier.autoscale is not None for tier in config.tiers())

    def record(self, record: RequestRecord) -> None:
        self._records.append(record)

    async def run(self) -> None:
        """Until cancelled. A failed evaluation is logged and retried at the tier's next interval."""
        while True:
            now = self._clock()
            for tier in TIERS:
                policy = getattr(self._backend.deployment.config, tier).autoscale
                if policy is None:
                    continue
                self._planner(tier, policy)
                # The first decision waits one interval: before that the window holds no requests.
                if now < self._next_at.setdefault(tier, now + policy.interval_s):
                    continue
                self._next_at[tier] = now + policy.interval_s
                try:
                    await self.evaluate(tier, now)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("autoscale %s: evaluation failed; next try in %.0f s", tier, policy.interval_s)
            await asyncio.sleep(self._tick_s)

    def _planner(self, tier: str, policy) -> TierPlanner:
        planner = self._planners.get(tier)
        if planner is None:
            planner = self._planners[tier] = TierPlanner(tier, policy)
        planner.policy = policy  # an apply may have changed the block; what the planner learned stays
        return planner

    async def evaluate(self, tier: str, now: float | None = None) -> Decision:
        """Measure the tier, decide, and carry a change out (returns once the replicas started or drained)."""
        now = self._clock() if now is None else now
        deployment = self._backend.deployment
        section = getattr(deployment.config, tier)
        planner = self._planner(tier, section.autoscale)
        live = [h for h in deployment.replicas(tier) if h.state in ("starting", "ready")]
        stats = await self._backend.replica_stats()
        num_queued = sum(int(r["stats"].get("num_queued", r["stats"].get("num_waiting_kv", 0)))
                         for r in stats.get(tier, []) if r["state"] in ("starting", "ready"))
        window_s = section.autoscale.window_s
        while self._records and self._records[0].end_time <= now - 2 * window_s:
            self._records.popleft()  # records arrive in end order; older ones cannot enter any window again
        observation = observe(self._records, tier=tier, now=now, window_s=window_s, num_replicas=len(live),
                              num_queued=num_queued, max_num_seqs=section.max_num_seqs)
        decision = planner.step(observation, now)
        self.latest[tier] = decision
        if not decision.is_change:
            log.debug("%s", decision.describe())
            return decision
        log.info("%s", decision.describe())
        self.changes.append(decision)
        await self._carry_out(decision)
        return decision

    async def _carry_out(self, decision: Decision) -> None:
        async with apply_lock(self._backend):
            config = self._backend.deployment.config
            section = getattr(config, decision.tier)
            wanted = dataclasses.replace(config, **{decision.tier: dataclasses.replace(
                section, replicas=decision.to_replicas)})
            plan = await apply_config(self._backend, wanted, dry_run=False,
                                      report=lambda line: log.info("autoscale %s: %s", decision.tier, line))
        if not plan.ok:
            log.warning("autoscale %s: apply refused: %s", decision.tier, "; ".join(plan.refusals))

    def status(self) -> list[dict]:
        """For `pdcluster status`: the latest decision of each autoscaled tier, then the recent changes (oldest
        first), each {"tier", "action", "from_replicas", "to_replicas", "reason", "at", "demand_rps",
        "capacity_rps", "is_latest"}."""
        rows = [_row(d, latest=True) for tier, d in sorted(self.latest.items())]
        return rows + [_row(d, latest=False) for d in self.changes]


def _row(decision: Decision, *, latest: bool) -> dict:
    return {"tier": decision.tier, "action": decision.action, "from_replicas": decision.from_replicas,
            "to_replicas": decision.to_replicas, "reason": decision.reason, "at": decision.at,
            "demand_rps": decision.demand_rps, "capacity_rps": decision.capacity_rps or 0.0,
            "is_latest": latest}
