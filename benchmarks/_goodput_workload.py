"""The requests of benchmarks/goodput.py: Poisson arrival times and input/output lengths from a distribution.

Who calls it: goodput.py builds one `Workload` per (rate, configuration) with the same seed, so two configurations
see exactly the same requests at the same offsets. Pure Python (random), no torch, no network.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

DISTRIBUTIONS = ("lognormal", "uniform", "fixed")


@dataclass(frozen=True, kw_only=True)
class LengthDistribution:
    """Token counts with a given mean. lognormal: sigma of the log (mean preserved); uniform: mean x [1 - spread,
    1 + spread]; fixed: always the mean. Every draw is clipped to [minimum, maximum]."""

    kind: str = "lognormal"
    mean: int
    sigma: float = 0.4
    spread: float = 0.5
    minimum: int = 1
    maximum: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in DISTRIBUTIONS:
            raise ValueError(f"length distribution {self.kind!r} is not one of: {', '.join(DISTRIBUTIONS)}")
        if self.mean < 1 or self.minimum < 1:
            raise ValueError(f"length mean and minimum must be >= 1, got {self.mean}, {self.minimum}")
        if self.maximum is not None and self.maximum < self.minimum:
            raise ValueError(f"length maximum {self.maximum} is below the minimum {self.minimum}")
        if self.sigma < 0 or not 0 <= self.spread < 1:
            raise ValueError(f"sigma must be >= 0 and spread in [0, 1), got {self.sigma}, {self.spread}")

    def draw(self, rng: random.Random) -> int:
        if self.kind == "lognormal":
            value = rng.lognormvariate(math.log(self.mean) - self.sigma ** 2 / 2, self.sigma)
        elif self.kind == "uniform":
            value = rng.uniform(self.mean * (1 - self.spread), self.mean * (1 + self.spread))
        else:
            value = self.mean
        value = max(self.minimum, round(value))
        return min(value, self.maximum) if self.maximum is not None else value


@dataclass(frozen=True, kw_only=True)
class RequestPlan:
    index: int
    arrival_s: float  # offset from the start of the rate's run
    token_ids: tuple[int, ...]
    max_tokens: int  # generated exactly (ignore_eos)


def make_workload(*, rate_rps: float, num_requests: int, inputs: LengthDistribution, outputs: LengthDistribution,
                  vocab_size: int, seed: int, first_token_id: int = 3) -> list[RequestPlan]:
    """`num_requests` requests with exponential gaps of mean 1/rate. Prompt tokens are drawn uniformly from
    [first_token_id, vocab_size) (random tokens: no two prompts share a prefix, so no cache can help)."""
    if rate_rps <= 0 or num_requests < 1:
        raise ValueError(f"make_workload needs rate_rps > 0 and num_requests >= 1, got {rate_rps}, {num_requests}")
    if vocab_size <= first_token_id:
        raise ValueError(f"vocab_size {vocab_size} leaves no token id from {first_token_id}")
    arrivals = random.Random(f"{seed}:arrivals:{rate_rps}")
    lengths = random.Random(f"{seed}:lengths")  # the same lengths at every rate: only the arrivals change
    tokens = random.Random(f"{seed}:tokens")
    plans, now = [], 0.0
    for index in range(num_requests):
        input_len, output_len = inputs.draw(lengths), outputs.draw(lengths)
        plans.append(RequestPlan(index=index, arrival_s=now, max_tokens=output_len,
                                 token_ids=tuple(tokens.randrange(first_token_id, vocab_size)
                                                 for _ in range(input_len))))
        now += arrivals.expovariate(rate_rps)
    return plans
