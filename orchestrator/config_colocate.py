"""cluster.yaml keys of colocated mode and conditional disaggregation.

Who calls it: orchestrator/config.py `parse_config`, once at load. The router's backend (orchestrator/cluster.py)
reads `ClusterConfig.mode` and `RouterSection.disaggregation` to decide, per request, where the prompt is prefilled;
deploy (orchestrator/deploy.py) starts no prefill tier in colocated mode.

    mode: disaggregated          # or colocated: no prefill tier; every decode replica prefills its own prompts
    router:
      disaggregation:
        min_prefill_tokens: 0    # prompts shorter than this are prefilled on their decode replica (0: never)
        prefill_when_saturated: false
        saturated_queued_tokens: 8192
    decode:
      max_step_tokens: 512       # tokens one decode step feeds: decode rows first, prompt chunks in the rest
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.config import ConfigError, _bool, _int, _reject_unknown, _section

MODES = ("disaggregated", "colocated")
_DISAGGREGATION_KEYS = ("min_prefill_tokens", "prefill_when_saturated", "saturated_queued_tokens")


@dataclass(frozen=True, kw_only=True)
class DisaggregationSection:
    """When the router keeps a prompt off the prefill tier and lets the chosen decode replica prefill it."""

    # Prompts with fewer tokens than this are prefilled locally: a short prompt's prefill costs less than shipping
    # its KV and a second queue. 0 (the default): every prompt goes through the prefill tier.
    min_prefill_tokens: int = 0
    # Also prefill locally while every prefill replica is saturated (more than saturated_queued_tokens prompt
    # tokens queued or running on it, as the router counts them).
    prefill_when_saturated: bool = False
    saturated_queued_tokens: int = 8192

    def __post_init__(self) -> None:
        for name in ("min_prefill_tokens", "saturated_queued_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"DisaggregationSection.{name} must be an int >= 0, got {value!r}")
        if not isinstance(self.prefill_when_saturated, bool):
            raise ValueError(f"DisaggregationSection.prefill_when_saturated must be a bool, got "
                             f"{self.prefill_when_saturated!r}")

    def is_local(self, num_prompt_tokens: int, *, is_prefill_saturated: bool) -> bool:
        """Whether a prompt of this length is prefilled on its decode replica (disaggregated mode)."""
        if num_prompt_tokens < self.min_prefill_tokens:
            return True
        return self.prefill_when_saturated and is_prefill_saturated


def parse_mode(raw: dict) -> str:
    """The top-level `mode`; in colocated mode a `prefill:` section is an error (nothing would read it)."""
    mode = raw.get("mode", "disaggregated")
    if mode not in MODES:
        raise ConfigError("mode", f"{mode!r} is not one of: {', '.join(MODES)}")
    if mode == "colocated" and raw.get("prefill") is not None:
        raise ConfigError("prefill", "mode: colocated deploys no prefill tier (each decode replica prefills its own "
                                     "prompts); remove the prefill section, or set mode: disaggregated")
    return mode


def parse_disaggregation(router_raw: dict) -> DisaggregationSection:
    raw = _section(router_raw, "disaggregation", "router.")
    prefix = "router.disaggregation."
    _reject_unknown(raw, _DISAGGREGATION_KEYS, prefix)
    return DisaggregationSection(
        min_prefill_tokens=_int(raw, "min_prefill_tokens", prefix, 0, minimum=0),
        prefill_when_saturated=_bool(raw, "prefill_when_saturated", prefix, False),
        saturated_queued_tokens=_int(raw, "saturated_queued_tokens", prefix, 8192, minimum=0),
    )


def parse_max_step_tokens(tier_raw: dict, name: str, *, max_num_seqs: int, uses_gpu: bool) -> int | None:
    """decode.max_step_tokens (a decode key: the prefill tier batches with max_batch_tokens; None for it). Unset:
    512 on CPU, 2048 on GPU, at least 2 x max_num_seqs; set: it must exceed max_num_seqs (decode rows go first)."""
    key = f"{name}.max_step_tokens"
    if name != "decode":
        if tier_raw.get("max_step_tokens") is not None:
            raise ConfigError(key, "max_step_tokens is the decode tier's step budget; the prefill tier batches with "
                                   "max_batch_tokens")
        return None
    if "max_step_tokens" not in tier_raw or tier_raw["max_step_tokens"] is None:
        return max(2048 if uses_gpu else 512, 2 * max_num_seqs)
    value = _int(tier_raw, "max_step_tokens", f"{name}.", None, minimum=1)
    if value <= max_num_seqs:
        raise ConfigError(key, f"{value} must be larger than {name}.max_num_seqs ({max_num_seqs}): decode tokens go "
                               "first in each step, so a smaller budget could leave no room for a prompt chunk")
    return value
