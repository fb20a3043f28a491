"""SLO autoscaling: how many replicas a tier needs, decided from what the router measured. Pure: no Ray, no clock.

Who calls it: the runner (orchestrator/autoscale_runner.py) every `interval_s`: it summarises the requests that
ended in the last `window_s` with `observe(...)` and asks the tier's `TierPlanner.step(observation, now)` for a
`Decision`; it then carries out "up"/"down" through the same code path as `pdcluster apply`. Tests drive the
planner with scripted observations.

The estimate (per tier, per target; the smallest capacity wins):
  - demand: requests per second that reached the tier in the window, plus its queue spread over the window;
  - ttft targets, prefill as a single server: a replica with mean service time s (prefill + KV push, measured)
    meets a TTFT percentile q within T while the rate stays below 1/s - ln(1/(1-q))/T (the M/M/1 sojourn time
    is exponential with rate mu - lambda). Batching only adds capacity: when the target is met, the observed
    per-replica rate scaled by limit / measured is taken instead if it is larger;
  - tpot targets, decode as a batch server: TPOT grows with the sequences a replica runs; its floor (the lowest
    TPOT measured so far, a batch of about one) and the TPOT at the current concurrency (Little: rate x decode
    time / replicas) give a line, and the concurrency at which it reaches T, capped at max_num_seqs, divided by
    the mean decode time is the capacity;
  - wanted = ceil(demand / (capacity x target_utilization)), within [min_replicas, max_replicas].
Rules on top of the estimate: a breached target (or rejected requests) scales up by at least one; scaling down
needs every percentile below `scale_down_margin` x its target and an empty queue (hysteresis), and goes one
replica at a time (each one drains first); no change within `cooldown_s` of the tier's last one; with fewer than
`min_samples` finished requests latencies are not judged (an idle tier, no demand at all, still scales down).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from orchestrator.autoscale_config import AutoscaleSection, LatencyTarget

_COMPLETED = ("stop", "length")  # outcomes whose timings are whole


@dataclass(frozen=True, kw_only=True)
class TierObservation:
    """One tier over the last window, as the router saw it."""

    tier: str
    num_replicas: int  # live (starting or ready) replicas now
    window_s: float
    num_arrived: int = 0  # requests that reached this tier and ended within the window (any outcome)
    num_completed: int = 0  # of those, finished normally: their latencies are the samples
    num_rejected: int = 0  # refused for lack of room (RESOURCE_EXHAUSTED): demand the tier did not take
    num_queued: int = 0  # waiting on the tier's replicas now
    latency_ms: dict[str, list[float]] = field(default_factory=dict)  # "ttft" / "tpot" -> completed samples
    mean_service_s: float | None = None  # prefill forward + KV push per request (prefill_ms + kv_transfer_ms)
    mean_decode_s: float | None = None  # first token to last, per request that decoded
    max_num_seqs: int = 64  # a decode replica's running-batch limit

    def __post_init__(self) -> None:
        if self.num_replicas < 0 or self.window_s <= 0:
            raise ValueError(f"TierObservation: num_replicas >= 0 and window_s > 0, got {self.num_replicas}, "
                             f"{self.window_s}")

    @property
    def demand_rps(self) -> float:
        return (self.num_arrived + self.num_queued) / self.window_s

    def percentile_ms(self, target: LatencyTarget) -> float | None:
        samples = self.latency_ms.get(target.metric) or []
        return percentile(samples, target.percentile) if samples else None


@dataclass(frozen=True, kw_only=True)
class Decision:
    tier: str
    action: str  # "up" | "down" | "hold"
    from_replicas: int
    to_replicas: int
    reason: str
    at: float  # the caller's clock (time.time() in the runner)
    demand_rps: float = 0.0
    capacity_rps: float | None = None  # per replica, within every target; None: not estimated

    @property
    def is_change(self) -> bool:
        return self.to_replicas != self.from_replicas

    def describe(self) -> str:
        capacity = f"{self.capacity_rps:.2f}" if self.capacity_rps is not None else "?"
        return (f"autoscale {self.tier}: {self.action} {self.from_replicas} -> {self.to_replicas} "
                f"(demand {self.demand_rps:.2f} req/s, capacity {capacity} req/s per replica): {self.reason}")


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); the value of a real sample, so p90 of few samples is honest."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def observe(records: Iterable, *, tier: str, now: float, window_s: float, num_replicas: int, num_queued: int = 0,
            max_num_seqs: int = 64) -> TierObservation:
    """Summarise `RequestRecord`s (orchestrator/request_log.py) that ended in (now - window_s, now] and reached
    `tier` (named its replica), plus rejected ones (they reached no replica: counted for every tier)."""
    replica_key = "prefill_replica" if tier == "prefill" else "decode_replica"
    arrived = completed = rejected = 0
    ttft, tpot, service, decode = [], [], [], []
    for record in records:
        if not now - window_s < record.end_time <= now:
            continue
        if record.outcome == "rejected":
            rejected += 1
            continue
        if not getattr(record, replica_key):
            continue
        arrived += 1
        if record.outcome not in _COMPLETED:
            continue
        completed += 1
        ttft.append(record.ttft_ms)
        service.append((record.prefill_ms + record.kv_transfer_ms) / 1e3)
        if record.completion_tokens > 1:
            tpot.append(record.tpot_ms)
            decode.append(max(0.0, record.e2e_ms - record.ttft_ms) / 1e3)
    return TierObservation(
        tier=tier, num_replicas=num_replicas, window_s=window_s, num_arrived=arrived + rejected,
        num_completed=completed, num_rejected=rejected, num_queued=num_queued,
        latency_ms={"ttft": ttft, "tpot": tpot},
        mean_service_s=sum(service) / len(service) if service else None,
        mean_decode_s=sum(decode) / len(decode) if decode else None,
        max_num_seqs=max_num_seqs)


class TierPlanner:
    """Decisions for one tier. Keeps what it learns across intervals: the time of its last change (cooldown)
    and the lowest TPOT seen (the decode floor)."""

    def __init__(self, tier: str, policy: AutoscaleSection):
        self.tier = tier
        self.policy = policy
        self.last_change_at: float | None = None
        self.tpot_floor_ms: float | None = None

    def step(self, obs: TierObservation, now: float) -> Decision:
        """Decide for this interval; a returned change is assumed carried out (it starts the cooldown)."""
        decision = self._decide(obs, now)
        if decision.is_change:
            self.last_change_at = now
        return decision

    def _decide(self, obs: TierObservation, now: float) -> Decision:
        policy, current = self.policy, obs.num_replicas
        judged = obs.num_completed >= policy.min_samples
        if judged and obs.latency_ms.get("tpot"):
            p50 = percentile(obs.latency_ms["tpot"], 50)
            self.tpot_floor_ms = p50 if self.tpot_floor_ms is None else min(self.tpot_floor_ms, p50)
        capacity = self._capacity_rps(obs) if judged else None
        measured = {t.key: obs.percentile_ms(t) for t in policy.targets} if judged else {}
        breaches = [f"{key} {value:.0f} ms > {t.limit_ms:g} ms" for t in policy.targets
                    for key, value in [(t.key, measured.get(t.key))] if value is not None and value > t.limit_ms]
        if obs.num_rejected:
            breaches.append(f"{obs.num_rejected} request(s) rejected for lack of room")

        def decision(to: int, reason: str) -> Decision:
            to = min(policy.max_replicas, max(policy.min_replicas, to))
            action = "up" if to > current else "down" if to < current else "hold"
            return Decision(tier=self.tier, action=action, from_replicas=current, to_replicas=to, reason=reason,
                            at=now, demand_rps=obs.demand_rps, capacity_rps=capacity)

        if current < policy.min_replicas or current > policy.max_replicas:  # e.g. after a manual apply
            return self._unless_cooling(decision(current, f"outside bounds [{policy.min_replicas}, "
                                                          f"{policy.max_replicas}]"), now)
        if not judged:
            if obs.demand_rps == 0 and obs.num_arrived == 0 and current > policy.min_replicas:
                return self._unless_cooling(decision(current - 1, "idle: no requests in the window"), now)
            if breaches:  # rejections alone are enough evidence
                return self._unless_cooling(decision(current + 1, "; ".join(breaches)), now)
            return decision(current, f"{obs.num_completed} finished request(s) in the window, fewer than "
                                     f"min_samples ({policy.min_samples}): latencies not judged")
        wanted = self._wanted(obs.demand_rps, capacity, current)
        if breaches:
            to = max(wanted, current + 1)
            if current >= policy.max_replicas:
                return decision(current, f"{'; '.join(breaches)}, but already at max_replicas "
                                         f"({policy.max_replicas})")
            return self._unless_cooling(decision(to, "; ".join(breaches)), now)
        if wanted > current:
            return self._unless_cooling(decision(wanted, f"demand needs {wanted} replica(s) at "
                                                         f"{policy.target_utilization:.0%} of capacity"), now)
        if wanted < current:
            margin = policy.scale_down_margin
            close = [f"{t.key} {measured[t.key]:.0f} ms >= {margin:g} x {t.limit_ms:g} ms" for t in policy.targets
                     if measured.get(t.key) is not None and measured[t.key] >= margin * t.limit_ms]
            if close or obs.num_queued:
                why = "; ".join(close) if close else f"{obs.num_queued} request(s) queued"
                return decision(current, f"demand fits {wanted} replica(s) but not scaling down: {why}")
            return self._unless_cooling(decision(current - 1, f"demand fits {wanted} replica(s); every target "
                                                              f"below {margin:g} x its limit"), now)
        return decision(current, "targets met; demand fits the current replicas")

    def _unless_cooling(self, decision: Decision, now: float) -> Decision:
        if not decision.is_change or self.last_change_at is None:
            return decision
        left_s = self.policy.cooldown_s - (now - self.last_change_at)
        if left_s <= 0:
            return decision
        return Decision(tier=decision.tier, action="hold", from_replicas=decision.from_replicas,
                        to_replicas=decision.from_replicas, at=now, demand_rps=decision.demand_rps,
                        capacity_rps=decision.capacity_rps,
                        reason=f"cooldown ({left_s:.0f} s left) holds {decision.action} to "
                               f"{decision.to_replicas}: {decision.reason}")

    def _wanted(self, demand_rps: float, capacity_rps: float | None, current: int) -> int:
        if capacity_rps is None:
            return current
        if capacity_rps <= 0:
            return self.policy.max_replicas  # the target is out of reach of one replica: give it all we may
        return max(1, math.ceil(demand_rps / (capacity_rps * self.policy.target_utilization)))

    def _capacity_rps(self, obs: TierObservation) -> float | None:
        """Requests/s one replica sustains within every target (the smallest over targets); None if no target
        can be estimated from this window."""
        estimates = [c for c in (self._target_capacity(t, obs) for t in self.policy.targets) if c is not None]
        return min(estimates) if estimates else None

    def _target_capacity(self, target: LatencyTarget, obs: TierObservation) -> float | None:
        limit_s = target.limit_ms / 1e3
        per_replica_rps = obs.num_completed / obs.window_s / max(1, obs.num_replicas)
        measured = obs.percentile_ms(target)
        if target.metric == "ttft":
            if not obs.mean_service_s:
                return None
            model = 1 / obs.mean_service_s - math.log(1 / (1 - target.percentile / 100)) / limit_s
            if measured is not None and 0 < measured <= target.limit_ms:
                # Met at this rate: batching beat the single-server model. Latency taken as growing with load,
                # the rate that reaches the target is at least the observed one scaled by the headroom left.
                return max(model, per_replica_rps * target.limit_ms / measured)
            return max(0.0, model)
        if not obs.mean_decode_s or measured is None or self.tpot_floor_ms is None:
            return None
        if target.limit_ms <= self.tpot_floor_ms:
            return 0.0
        concurrency = per_replica_rps * obs.mean_decode_s  # Little's law, sequences per replica
        max_concurrency = float(obs.max_num_seqs)
        if concurrency >= 1 and measured > self.tpot_floor_ms * 1.05:
            slope_ms = (measured - self.tpot_floor_ms) / concurrency
            max_concurrency = min(max_concurrency, (target.limit_ms - self.tpot_floor_ms) / slope_ms)
        return max_concurrency / obs.mean_decode_s
