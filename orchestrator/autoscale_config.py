"""The optional `autoscale:` block of a tier in cluster.yaml (`prefill.autoscale`, `decode.autoscale`).

Who calls it: orchestrator/config.py `_parse_tier`, once per tier at load. The planner (orchestrator/autoscale.py)
reads the frozen `AutoscaleSection`; nothing else does.

    decode:
      replicas: 1
      autoscale:
        tpot_p90_ms: 25        # targets: (ttft|tpot)_p<percentile>_ms, at least one
        min_replicas: 1
        max_replicas: 4
        interval_s: 10         # how often the planner decides
        cooldown_s: 60         # no second change of this tier's count sooner than this
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from orchestrator.config import ConfigError, _float, _int, _reject_unknown

_TARGET_KEY = re.compile(r"^(ttft|tpot)_p(\d{1,2}(?:\.\d+)?)_ms$")
_OPTION_KEYS = ("min_replicas", "max_replicas", "interval_s", "cooldown_s", "window_s", "target_utilization",
                "scale_down_margin", "min_samples")


@dataclass(frozen=True, kw_only=True)
class LatencyTarget:
    metric: str  # "ttft" or "tpot"
    percentile: float  # in (0, 100)
    limit_ms: float

    @property
    def key(self) -> str:
        percentile = f"{self.percentile:g}"
        return f"{self.metric}_p{percentile}_ms"

    def __post_init__(self) -> None:
        if self.metric not in ("ttft", "tpot"):
            raise ValueError(f"LatencyTarget.metric must be ttft or tpot, got {self.metric!r}")
        if not 0 < self.percentile < 100:
            raise ValueError(f"LatencyTarget.percentile must be in (0, 100), got {self.percentile}")
        if self.limit_ms <= 0:
            raise ValueError(f"LatencyTarget.limit_ms must be > 0, got {self.limit_ms}")


@dataclass(frozen=True, kw_only=True)
class AutoscaleSection:
    targets: tuple[LatencyTarget, ...]
    min_replicas: int = 1
    max_replicas: int
    interval_s: float = 10.0
    cooldown_s: float = 60.0
    window_s: float = 60.0  # requests that ended this long ago or less are the measurement
    # Plan for each replica to run at this share of its estimated capacity: headroom for bursts.
    target_utilization: float = 0.8
    # Hysteresis: scale down only while every measured percentile is below this share of its target.
    scale_down_margin: float = 0.6
    min_samples: int = 5  # fewer finished requests in the window: latencies are not judged

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("AutoscaleSection needs at least one target")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"AutoscaleSection needs 1 <= min_replicas <= max_replicas, got "
                             f"{self.min_replicas}, {self.max_replicas}")
        if self.interval_s <= 0 or self.cooldown_s < 0 or self.window_s <= 0:
            raise ValueError("AutoscaleSection: interval_s and window_s must be > 0, cooldown_s >= 0")
        if not 0 < self.target_utilization <= 1 or not 0 < self.scale_down_margin <= 1:
            raise ValueError("AutoscaleSection: target_utilization and scale_down_margin must be in (0, 1]")
        if self.min_samples < 1:
            raise ValueError(f"AutoscaleSection.min_samples must be >= 1, got {self.min_samples}")


def parse_autoscale(raw: object, tier: str, *, replicas: int, tier_min: int, tier_max: int | None
                    ) -> AutoscaleSection | None:
    """`raw`: the YAML value of `<tier>.autoscale` (None/absent: no autoscaling). The tier's own bounds are the
    defaults of the block's; the tier's starting `replicas` must lie within the block's bounds."""
    if raw is None:
        return None
    p = f"{tier}.autoscale."
    if not isinstance(raw, dict):
        raise ConfigError(f"{tier}.autoscale", f"expected a mapping of targets and bounds, got {raw!r}")
    targets = []
    for key, value in raw.items():
        match = _TARGET_KEY.match(str(key))
        if match is None:
            continue
        limit_ms = _float(raw, key, p, 1.0)
        percentile = float(match.group(2))
        if not 0 < percentile < 100:
            raise ConfigError(f"{p}{key}", "percentile must be between 0 and 100 exclusive, e.g. ttft_p90_ms")
        targets.append(LatencyTarget(metric=match.group(1), percentile=percentile, limit_ms=limit_ms))
    _reject_unknown({k: v for k, v in raw.items() if not _TARGET_KEY.match(str(k))}, _OPTION_KEYS
                    + ("ttft_p90_ms", "tpot_p90_ms", "(ttft|tpot)_p<N>_ms"), p)
    if not targets:
        raise ConfigError(f"{tier}.autoscale", "needs at least one latency target, e.g. ttft_p90_ms: 1000 or "
                                               "tpot_p90_ms: 25")
    min_replicas = _int(raw, "min_replicas", p, max(1, tier_min), minimum=1)
    max_replicas = _int(raw, "max_replicas", p, tier_max, minimum=1)
    if max_replicas is None:
        raise ConfigError(f"{p}max_replicas", f"missing: set the most replicas the planner may start (or "
                                              f"{tier}.max_replicas)")
    if min_replicas > max_replicas:
        raise ConfigError(f"{p}min_replicas", f"{min_replicas} is above max_replicas ({max_replicas})")
    if not min_replicas <= replicas <= max_replicas:
        raise ConfigError(f"{tier}.replicas", f"{replicas} is outside the autoscale bounds "
                                              f"[{min_replicas}, {max_replicas}]; start within them")
    target_utilization = _float(raw, "target_utilization", p, 0.8)
    scale_down_margin = _float(raw, "scale_down_margin", p, 0.6)
    for key, value in (("target_utilization", target_utilization), ("scale_down_margin", scale_down_margin)):
        if value > 1:
            raise ConfigError(f"{p}{key}", f"must be in (0, 1] (a share), got {value}")
    cooldown_s = raw.get("cooldown_s", 60.0)
    if cooldown_s != 0:
        cooldown_s = _float(raw, "cooldown_s", p, 60.0)
    return AutoscaleSection(
        targets=tuple(sorted(targets, key=lambda t: (t.metric, t.percentile))),
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        interval_s=_float(raw, "interval_s", p, 10.0),
        cooldown_s=float(cooldown_s),
        window_s=_float(raw, "window_s", p, 60.0),
        target_utilization=target_utilization,
        scale_down_margin=scale_down_margin,
        min_samples=_int(raw, "min_samples", p, 5, minimum=1),
    )
