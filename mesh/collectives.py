"""Which algorithm carries each model collective of a process group: direct-access one-shot / two-shot all-reduce
and direct all-to-all (mesh/dda.py) for the small messages of decode, NCCL above the measured crossover and
wherever direct access is unavailable, Gloo on CPU untouched.

Who calls it: a tier rank, once per process group after the group exists and before the first forward:
`install(group, config)` (collective over the group). It plugs the group's all-reduce and all-to-all into
mesh.comm (so the layers keep calling `comm.all_reduce`) and returns the `GroupCollectives` that decides per call.
Benchmarks and tests use `GroupCollectives` and `measure_table` directly.

What it promises:
- Every rank of a group takes the same decision for the same message (the table is agreed over the group: the
  start-up timings are reduced with MAX before the crossover is read off them), so the ranks never run different
  collectives against each other.
- The decision depends only on the message's size and dtype, so a CUDA graph captures one fixed algorithm per
  call site; replays are correct for any tensor contents.
- Fallback to torch.distributed (NCCL) for messages above the table or the buffer, non-contiguous or unsupported
  tensors, and for whole groups that cannot use direct access (CPU/Gloo, several hosts, no peer access, too many
  ranks, no symmetric memory): `GroupCollectives.fallback_reason` says why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from mesh import comm
from mesh.collectives_config import CollectivesConfig

log = logging.getLogger(__name__)

NCCL = "nccl"
ONE_SHOT = "one-shot"
TWO_SHOT = "two-shot"
DIRECT = "direct"
# Start-up sweep: few sizes (decode messages are 8 KiB (batch 1, hidden 4096, bf16) to a few MiB).
STARTUP_ALL_REDUCE_SIZES = (16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20)
STARTUP_ALL_TO_ALL_SIZES = (64 << 10, 256 << 10, 1 << 20, 4 << 20)


@dataclass(frozen=True, kw_only=True)
class CrossoverTable:
    """Largest message (bytes) each direct algorithm takes; 0 = never. All-reduce: one-shot up to
    `one_shot_max_bytes`, two-shot above it up to `two_shot_max_bytes`, NCCL above both."""

    one_shot_max_bytes: int = 0
    two_shot_max_bytes: int = 0
    direct_all_to_all_max_bytes: int = 0

    def __post_init__(self) -> None:
        for name in ("one_shot_max_bytes", "two_shot_max_bytes", "direct_all_to_all_max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"CrossoverTable.{name} must be a byte count >= 0, got {value!r}")

    def all_reduce_algorithm(self, num_bytes: int) -> str:
        if num_bytes <= self.one_shot_max_bytes:
            return ONE_SHOT
        if num_bytes <= self.two_shot_max_bytes:
            return TWO_SHOT
        return NCCL

    def all_to_all_algorithm(self, num_bytes: int) -> str:
        return DIRECT if num_bytes <= self.direct_all_to_all_max_bytes else NCCL

    def as_dict(self) -> dict[str, int]:
        return {"one_shot_max_bytes": self.one_shot_max_bytes, "two_shot_max_bytes": self.two_shot_max_bytes,
                "direct_all_to_all_max_bytes": self.direct_all_to_all_max_bytes}


NEVER = CrossoverTable()


def crossover_from_timings(sizes: Sequence[int], timings_us: dict[str, Sequence[float]],
                           direct: Sequence[str]) -> int:
    """Largest size up to which (from the smallest on, with no gap) one of the `direct` algorithms beat every other
    one timed; 0 if none did at the smallest size. Between two measured sizes the lower one counts (conservative)."""
    if list(sizes) != sorted(sizes):
        raise ValueError(f"crossover_from_timings: sizes must ascend, got {list(sizes)}")
    for name, row in timings_us.items():
        if len(row) != len(sizes):
            raise ValueError(f"crossover_from_timings: {name} has {len(row)} timings for {len(sizes)} sizes")
    crossover = 0
    for i, size in enumerate(sizes):
        best = min(timings_us, key=lambda name: timings_us[name][i])
        if best not in direct:
            break
        crossover = size
    return crossover


def table_from_timings(*, all_reduce_sizes: Sequence[int] = (), all_reduce_us: dict[str, Sequence[float]] | None = None,
                       all_to_all_sizes: Sequence[int] = (), all_to_all_us: dict[str, Sequence[float]] | None = None,
                       ) -> CrossoverTable:
    """The crossover table from a sweep: one-shot up to where it stops being fastest, two-shot up to where neither
    direct algorithm is, the direct all-to-all up to where NCCL overtakes it."""
    one_shot = two_shot = a2a = 0
    if all_reduce_us:
        two_shot = crossover_from_timings(all_reduce_sizes, all_reduce_us, (ONE_SHOT, TWO_SHOT))
        # one-shot up to the largest size of that run where it was the fastest, two-shot for the rest of the run
        one_shot = max((size for i, size in enumerate(all_reduce_sizes) if size <= two_shot
                        and min(all_reduce_us, key=lambda name: all_reduce_us[name][i]) == ONE_SHOT), default=0)
    if all_to_all_us:
        a2a = crossover_from_timings(all_to_all_sizes, all_to_all_us, (DIRECT,))
    return CrossoverTable(one_shot_max_bytes=one_shot, two_shot_max_bytes=two_shot, direct_all_to_all_max_bytes=a2a)


def merge_table(config: CollectivesConfig, measured: CrossoverTable | None) -> CrossoverTable:
    """The table a group uses: forced algorithms as configured (up to the buffer), else the configured crossovers,
    the measured ones where the config left them out."""
    measured = measured or NEVER
    buffer = config.buffer_bytes // 2  # the largest message: calls alternate between the buffer's halves

    def pick(configured: int | None, measured_value: int) -> int:
        return min(buffer, measured_value if configured is None else configured)

    if config.all_reduce == NCCL:
        one_shot = two_shot = 0
    elif config.all_reduce == ONE_SHOT:
        one_shot = two_shot = buffer
    elif config.all_reduce == TWO_SHOT:
        one_shot, two_shot = 0, buffer
    else:
        one_shot = pick(config.one_shot_max_bytes, measured.one_shot_max_bytes)
        two_shot = max(one_shot, pick(config.two_shot_max_bytes, measured.two_shot_max_bytes))
    if config.all_to_all == NCCL:
        a2a = 0
    elif config.all_to_all == DIRECT:
        a2a = buffer
    else:
        a2a = pick(config.direct_all_to_all_max_bytes, measured.direct_all_to_all_max_bytes)
    return CrossoverTable(one_shot_max_bytes=one_shot, two_shot_max_bytes=two_shot, direct_all_to_all_max_bytes=a2a)


class GroupCollectives:
    """One group's all-reduce and all-to-all, each call routed by the table. `dda` None: everything on
    torch.distributed (`fallback_reason` says why)."""

    def __init__(self, group: Any, table: CrossoverTable, dda: Any = None, *, fallback_reason: str = "") -> None:
        self.group = group
        self.table = table if dda is not None else NEVER
        self.dda = dda
        self.fallback_reason = fallback_reason
        self.calls_by_algorithm: dict[str, int] = {}  # counted at call (capture) time, for start-up reports/tests

    def all_reduce_algorithm(self, tensor: torch.Tensor) -> str:
        if self.dda is None or not self.dda.supports(tensor):
            return NCCL
        return self.table.all_reduce_algorithm(tensor.numel() * tensor.element_size())

    def all_to_all_algorithm(self, output: torch.Tensor, input: torch.Tensor) -> str:
        if self.dda is None or not (input.is_cuda and input.is_contiguous() and output.is_contiguous()):
            return NCCL
        num_bytes = max(input.numel() * input.element_size(), output.numel() * output.element_size())
        if num_bytes > self.dda.message_bytes:
            return NCCL
        return self.table.all_to_all_algorithm(num_bytes)

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum in place over the group (what mesh.comm calls for this group)."""
        algorithm = self.all_reduce_algorithm(tensor)
        self._count(algorithm)
        if algorithm == NCCL:
            dist.all_reduce(tensor, group=self.group)
        else:
            self.dda.all_reduce(tensor, algorithm)

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor, output_split_sizes: list[int] | None = None,
                          input_split_sizes: list[int] | None = None) -> None:
        """As torch.distributed.all_to_all_single, synchronous in stream order (what mesh.comm calls)."""
        algorithm = self.all_to_all_algorithm(output, input)
        if algorithm == DIRECT:
            try:
                self.dda.all_to_all_single(output, input, output_split_sizes, input_split_sizes)
                self._count(DIRECT)
                return
            except ValueError:
                pass  # one peer's share is larger than its slot: this call goes through NCCL
        self._count(NCCL)
        dist.all_to_all_single(output, input, output_split_sizes, input_split_sizes, group=self.group)

    def _count(self, algorithm: str) -> None:
        self.calls_by_algorithm[algorithm] = self.calls_by_algorithm.get(algorithm, 0) + 1


def install(group: Any, config: CollectivesConfig | None = None, *,
            measure: Callable[..., CrossoverTable] | None = None) -> GroupCollectives:
    """Collective over `group`: sets up direct access where it can, reads or measures the table, and plugs the
    group into mesh.comm (nothing is plugged for Gloo/CPU groups or `nccl`-only configs: torch.distributed stays).
    `measure(dda, config)` replaces the start-up sweep (tests)."""
    config = config or CollectivesConfig()
    if group is None:
        raise ValueError("collectives.install: pass a process group (None means no communication)")
    reason = _group_fallback_reason(group, config)
    if reason:
        log.info("collectives: group of %d ranks stays on torch.distributed (%s)", dist.get_world_size(group), reason)
        return GroupCollectives(group, NEVER, None, fallback_reason=reason)
    from mesh.dda import DirectAccessGroup, DirectAccessUnavailable

    try:
        dda = DirectAccessGroup.create(group, buffer_bytes=config.buffer_bytes)
    except DirectAccessUnavailable as error:
        log.info("collectives: direct access unavailable (%s); NCCL for every message", error)
        return GroupCollectives(group, NEVER, None, fallback_reason=str(error))
    measured = None
    if config.needs_measurement:
        measured = (measure or measure_table)(dda, config)
    table = merge_table(config, measured)
    collectives = GroupCollectives(group, table, dda)
    comm.register_group_impl(group, all_reduce=collectives.all_reduce,
                             all_to_all_single=collectives.all_to_all_single)
    log.info("collectives: group of %d ranks: %s", dda.world_size, table.as_dict())
    return collectives


def _group_fallback_reason(group: Any, config: CollectivesConfig) -> str:
    if config.is_all_nccl:
        return "configured nccl for both collectives"
    backend = str(dist.get_backend(group))
    if "nccl" not in backend:
        return f"backend {backend} (CPU collectives unchanged)"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return ""


# ---- start-up measurement (CUDA) -------------------------------------------------------------------------------

def measure_table(dda: Any, config: CollectivesConfig, *, calls_per_graph: int = 20,
                  replays: int = 5) -> CrossoverTable:
    """Times each algorithm at a few sizes, each as a CUDA graph of `calls_per_graph` calls (what a captured decode
    step pays), agrees the timings over the group (MAX) and reads the crossovers off them. About a second."""
    from mesh.dda_timing import time_all_reduce, time_all_to_all

    sizes = [s for s in STARTUP_ALL_REDUCE_SIZES if s <= dda.message_bytes]
    a2a_sizes = [s for s in STARTUP_ALL_TO_ALL_SIZES if s <= dda.message_bytes]
    algorithms = (NCCL, ONE_SHOT, TWO_SHOT)
    all_reduce_us = {name: [time_all_reduce(dda, name, size, dtype=torch.bfloat16, calls=calls_per_graph,
                                            replays=replays) for size in sizes] for name in algorithms}
    all_to_all_us = {name: [time_all_to_all(dda, name, size, dtype=torch.bfloat16, calls=calls_per_graph,
                                            replays=replays) for size in a2a_sizes] for name in (NCCL, DIRECT)}
    flat = torch.tensor([v for name in algorithms for v in all_reduce_us[name]]
                        + [v for name in (NCCL, DIRECT) for v in all_to_all_us[name]],
                        dtype=torch.float64, device=torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=dda.group)  # every rank reads the same table
    values = flat.tolist()
    n = len(sizes)
    agreed_ar = {name: values[i * n:(i + 1) * n] for i, name in enumerate(algorithms)}
    rest = values[len(algorithms) * n:]
    m = len(a2a_sizes)
    agreed_a2a = {NCCL: rest[:m], DIRECT: rest[m:2 * m]}
    return table_from_timings(all_reduce_sizes=sizes, all_reduce_us=agreed_ar, all_to_all_sizes=a2a_sizes,
                              all_to_all_us=agreed_a2a)


def install_for_mesh(dims: Any, config: CollectivesConfig | None = None) -> list[GroupCollectives]:
    """Collective over the whole replica: `install` for each group of this rank that carries model collectives (the
    tp group's all-reduces, the ep group's all-to-alls), in the same order on every rank. Tier ranks call it right
    after joining their mesh (prefill_tier / decode_tier `join_and_load`); a one-rank mesh has no group to set up."""
    installed = []
    for group in (dims.tp_group, dims.ep_group):
        if group is not None:
            installed.append(install(group, config))
    return installed
