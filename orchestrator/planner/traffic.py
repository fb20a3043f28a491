"""The traffic a deployment must serve: arrival rate, prompt and output lengths, and the latency targets.

Who calls it: `orchestrator.planner.cli` builds a `Traffic` from flags or from a YAML/JSON file (`--traffic`), and
the search evaluates every candidate against it. Lengths are discrete distributions (value, weight), so the cost
model can take exact expectations (the M/G/1 queue needs E[S] and E[S^2]) and quantiles (latency is checked at the
`latency_quantile` prompt or output, 0.9 by default, DistServe's usual attainment goal).

Length specs (`LengthDistribution.parse`): "1024" (always 1024), "512-2048" (uniform over the range, represented
by 16 evenly spaced points), "256:0.7,4096:0.3" (weighted points; weights are normalised).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

_UNIFORM_POINTS = 16
TRAFFIC_KEYS = ("rate", "input_len", "output_len", "ttft_ms", "tpot_ms", "quantile")


@dataclass(frozen=True, kw_only=True)
class LengthDistribution:
    values: tuple[int, ...]
    weights: tuple[float, ...]  # normalised to sum 1

    def __post_init__(self) -> None:
        if not self.values or len(self.values) != len(self.weights):
            raise ValueError("length distribution: need one weight per value and at least one value")
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in self.values):
            raise ValueError(f"length distribution: lengths must be integers >= 1, got {self.values}")
        if any(w < 0 for w in self.weights) or not math.isclose(sum(self.weights), 1.0, rel_tol=1e-9):
            raise ValueError(f"length distribution: weights must be >= 0 and sum to 1, got {self.weights}")

    @classmethod
    def fixed(cls, value: int) -> LengthDistribution:
        return cls(values=(value,), weights=(1.0,))

    @classmethod
    def parse(cls, spec: str | int, *, what: str = "length") -> LengthDistribution:
        if isinstance(spec, int) and not isinstance(spec, bool):
            return cls.fixed(spec)
        text = str(spec).replace(" ", "")
        try:
            if ":" in text:
                pairs = [part.split(":") for part in text.split(",") if part]
                values = tuple(int(v) for v, _ in pairs)
                raw_weights = [float(w) for _, w in pairs]
                total = sum(raw_weights)
                if total <= 0:
                    raise ValueError
                return cls(values=values, weights=tuple(w / total for w in raw_weights))
            if "-" in text:
                low, high = (int(part) for part in text.split("-"))
                if not 1 <= low <= high:
                    raise ValueError
                count = min(_UNIFORM_POINTS, high - low + 1)
                values = tuple(sorted({round(low + (high - low) * i / max(count - 1, 1)) for i in range(count)}))
                return cls(values=values, weights=tuple(1.0 / len(values) for _ in values))
            return cls.fixed(int(text))
        except ValueError:
            raise ValueError(f"{what}: cannot read {spec!r}; write 1024, 512-2048 or 256:0.7,4096:0.3 "
                             "(lengths >= 1, weights > 0)") from None

    def expect(self, f: Callable[[int], float]) -> float:
        return sum(w * f(v) for v, w in zip(self.values, self.weights))

    @property
    def mean(self) -> float:
        return self.expect(float)

    @property
    def max(self) -> int:
        return max(self.values)

    def quantile(self, q: float) -> int:
        """The smallest length L with P(length <= L) >= q."""
        cumulative = 0.0
        for value, weight in sorted(zip(self.values, self.weights)):
            cumulative += weight
            if cumulative >= q - 1e-12:
                return value
        return self.max

    def describe(self) -> str:
        if len(self.values) == 1:
            return str(self.values[0])
        return f"mean {self.mean:.0f}, max {self.max}"


@dataclass(frozen=True, kw_only=True)
class Traffic:
    arrival_rate_per_s: float
    input_lengths: LengthDistribution  # prompt tokens
    output_lengths: LengthDistribution  # generated tokens, the first (sampled by the prefill) included
    ttft_target_s: float
    tpot_target_s: float
    latency_quantile: float = 0.9

    def __post_init__(self) -> None:
        if not self.arrival_rate_per_s > 0:
            raise ValueError(f"traffic: arrival rate must be > 0 requests/s, got {self.arrival_rate_per_s}")
        for name in ("ttft_target_s", "tpot_target_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"traffic: {name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.latency_quantile <= 1:
            raise ValueError(f"traffic: latency_quantile must be in (0, 1], got {self.latency_quantile}")

    @property
    def design_input_len(self) -> int:
        return self.input_lengths.quantile(self.latency_quantile)

    @property
    def design_output_len(self) -> int:
        return self.output_lengths.quantile(self.latency_quantile)

    @property
    def mean_decode_steps(self) -> float:
        """Decode steps per request: every output token but the first, which the prefill samples."""
        return self.output_lengths.expect(lambda n: n - 1)

    @classmethod
    def from_mapping(cls, raw: dict[str, Any], *, where: str = "traffic") -> Traffic:
        """Keys: rate (requests/s), input_len, output_len (length specs), ttft_ms, tpot_ms, quantile."""
        allowed = set(TRAFFIC_KEYS)
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected a mapping with keys {sorted(allowed)}")
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; allowed: {sorted(allowed)}")
        missing = sorted({"rate", "input_len", "output_len", "ttft_ms", "tpot_ms"} - set(raw))
        if missing:
            raise ValueError(f"{where}: missing keys {missing}")
        return cls(
            arrival_rate_per_s=float(raw["rate"]),
            input_lengths=LengthDistribution.parse(raw["input_len"], what=f"{where}.input_len"),
            output_lengths=LengthDistribution.parse(raw["output_len"], what=f"{where}.output_len"),
            ttft_target_s=float(raw["ttft_ms"]) / 1e3,
            tpot_target_s=float(raw["tpot_ms"]) / 1e3,
            latency_quantile=float(raw.get("quantile", 0.9)),
        )

    def describe(self) -> str:
        return (f"{self.arrival_rate_per_s:g} req/s, input {self.input_lengths.describe()} tokens, output "
                f"{self.output_lengths.describe()} tokens, TTFT <= {self.ttft_target_s * 1e3:g} ms and "
                f"TPOT <= {self.tpot_target_s * 1e3:g} ms at p{self.latency_quantile * 100:g} lengths")
