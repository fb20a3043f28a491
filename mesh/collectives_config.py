"""How a tier's model collectives are carried out: the `collectives:` mapping of a tier in cluster.yaml.

Who calls it: orchestrator/config.py parses each tier's `collectives` mapping with `parse_collectives_config`
(turning `CollectivesConfigError` into its ConfigError with the full key); the rank workers hand the resulting
`CollectivesConfig` to `mesh.collectives.install`. Pure Python: no torch, no GPU.

Keys (all optional):
- `all_reduce`: `auto` (default: by message size from the crossover table), `nccl`, `one-shot`, `two-shot`
  (forced wherever the message fits the buffer; NCCL above it).
- `all_to_all`: `auto` (default), `nccl`, `direct`.
- `one_shot_max_bytes`, `two_shot_max_bytes`, `direct_all_to_all_max_bytes`: the crossover table. With `auto`,
  the ones given are used as they are and the missing ones are measured at start-up (a few sizes, a fraction of a
  second); 0 means "never".
- `buffer_bytes`: symmetric buffer per group and rank (default 8 MiB, a multiple of 4096); no direct-access
  message is larger than half of it (calls alternate between the halves).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ALL_REDUCE_CHOICES = ("auto", "nccl", "one-shot", "two-shot")
ALL_TO_ALL_CHOICES = ("auto", "nccl", "direct")
TABLE_KEYS = ("one_shot_max_bytes", "two_shot_max_bytes", "direct_all_to_all_max_bytes")
KEYS = ("all_reduce", "all_to_all", *TABLE_KEYS, "buffer_bytes")
DEFAULT_BUFFER_BYTES = 8 << 20


class CollectivesConfigError(ValueError):
    """A bad `collectives` setting; `key` is the key inside the mapping."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.detail = message
        super().__init__(f"collectives.{key}: {message}")


@dataclass(frozen=True, kw_only=True)
class CollectivesConfig:
    all_reduce: str = "auto"
    all_to_all: str = "auto"
    one_shot_max_bytes: int | None = None  # None: measured at start-up (auto)
    two_shot_max_bytes: int | None = None
    direct_all_to_all_max_bytes: int | None = None
    buffer_bytes: int = DEFAULT_BUFFER_BYTES

    def __post_init__(self) -> None:
        if self.all_reduce not in ALL_REDUCE_CHOICES:
            raise CollectivesConfigError("all_reduce", f"{self.all_reduce!r} is not one of: "
                                                       f"{', '.join(ALL_REDUCE_CHOICES)}")
        if self.all_to_all not in ALL_TO_ALL_CHOICES:
            raise CollectivesConfigError("all_to_all", f"{self.all_to_all!r} is not one of: "
                                                       f"{', '.join(ALL_TO_ALL_CHOICES)}")
        for key in TABLE_KEYS:
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise CollectivesConfigError(key, f"expected a byte count >= 0 (0 = never), got {value!r}")
        if (self.one_shot_max_bytes is not None and self.two_shot_max_bytes is not None
                and 0 < self.two_shot_max_bytes < self.one_shot_max_bytes):
            raise CollectivesConfigError("two_shot_max_bytes", f"{self.two_shot_max_bytes} is below "
                                         f"one_shot_max_bytes ({self.one_shot_max_bytes}); two-shot takes the "
                                         f"sizes above one-shot's, so give 0 (never) or a larger value")
        if (isinstance(self.buffer_bytes, bool) or not isinstance(self.buffer_bytes, int) or self.buffer_bytes < 4096
                or self.buffer_bytes % 4096):
            raise CollectivesConfigError("buffer_bytes", f"expected a positive multiple of 4096, got "
                                                         f"{self.buffer_bytes!r}")

    @property
    def is_all_nccl(self) -> bool:
        """Nothing to set up: both collectives stay on torch.distributed."""
        return self.all_reduce == "nccl" and self.all_to_all == "nccl"

    @property
    def needs_measurement(self) -> bool:
        """An `auto` choice with a missing crossover: the start-up sweep fills it in."""
        return ((self.all_reduce == "auto" and (self.one_shot_max_bytes is None or self.two_shot_max_bytes is None))
                or (self.all_to_all == "auto" and self.direct_all_to_all_max_bytes is None))


def parse_collectives_config(raw: Any) -> CollectivesConfig:
    """The `collectives` mapping of cluster.yaml (None or missing: defaults). Raises CollectivesConfigError naming
    the key inside the mapping."""
    if raw is None:
        return CollectivesConfig()
    if not isinstance(raw, dict):
        raise CollectivesConfigError("", f"expected a mapping, got {type(raw).__name__} ({raw!r})")
    for key in raw:
        if key not in KEYS:
            raise CollectivesConfigError(str(key), f"unknown key; allowed keys here: {', '.join(KEYS)}")
    values = dict(raw)
    for key in ("all_reduce", "all_to_all"):
        if key in values and not isinstance(values[key], str):
            raise CollectivesConfigError(key, f"expected a string, got {values[key]!r}")
    return CollectivesConfig(**values)
