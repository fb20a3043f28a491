"""The N-D device mesh of one replica: its degrees (`MeshShape`) and one rank's view of it (`ParallelDims`).

Rank layout: `world = pp * cp * tp` ranks with axes named (pp, cp, tp), tp varying fastest, so the ranks of one
tensor-parallel group are consecutive (on one host they share NVLink):

    rank = (pp_rank * cp + cp_rank) * tp + tp_rank

Expert parallelism does not add ranks: experts are sharded over the (cp, tp) sub-mesh of a pipeline stage, so an
`ep` group is all ranks of one pp stage (ep must be 1 or cp * tp). With ep = cp * tp each rank of a stage holds
num_experts / ep whole experts (attention stays TP x CP sharded on the same ranks); with ep = 1 every rank holds
every expert, each expert's MLP split over tp like the dense MLP. See mesh/moe.py.

Pipeline stages hold contiguous, balanced layer ranges (`stage_layer_range`): the first `num_layers % pp` stages
take one layer more than the others.

Who calls it: the tier rank actors build `ParallelDims(shape, rank)` once per rank after
`torch.distributed.init_process_group` (every rank must build it: group creation is collective); the model layers
receive the groups explicitly. In the one-rank case nothing touches torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mesh.config import ModelConfig

AXES = ("pp", "cp", "tp")


@dataclass(frozen=True, kw_only=True)
class MeshShape:
    tp: int = 1
    cp: int = 1
    pp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "cp", "pp", "ep"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"mesh degree {name} must be an integer >= 1, got {value!r}")
        if self.ep not in (1, self.cp * self.tp):
            raise ValueError(
                f"mesh degree ep={self.ep}: experts are sharded over the cp x tp sub-mesh, so ep must be 1 or "
                f"cp * tp = {self.cp * self.tp}; set ep to one of those"
            )

    @property
    def world_size(self) -> int:
        return self.pp * self.cp * self.tp

    def validate(self, model_config: ModelConfig) -> None:
        """Raises ValueError naming the degree and a fix when the model cannot be split this way."""
        c = model_config
        if c.num_heads % self.tp != 0:
            raise ValueError(
                f"mesh degree tp={self.tp} does not divide the model's {c.num_heads} attention heads; "
                f"use a tp in {_divisors(c.num_heads)}"
            )
        if self.tp > c.num_kv_heads and self.tp % c.num_kv_heads != 0:
            raise ValueError(
                f"mesh degree tp={self.tp} is larger than the model's {c.num_kv_heads} KV heads but not a multiple "
                f"of it, so KV heads cannot be replicated evenly; use a tp in {_divisors(c.num_heads)} that is a "
                f"divisor or multiple of {c.num_kv_heads}"
            )
        if self.tp <= c.num_kv_heads and c.num_kv_heads % self.tp != 0:
            raise ValueError(
                f"mesh degree tp={self.tp} does not divide the model's {c.num_kv_heads} KV heads; "
                f"use a tp in {_divisors(c.num_kv_heads)}"
            )
        uses_tp_mlp = not c.is_moe or self.ep == 1  # with ep > 1, experts are whole on each rank
        if uses_tp_mlp and c.intermediate_size % self.tp != 0:
            raise ValueError(
                f"mesh degree tp={self.tp} does not divide intermediate_size={c.intermediate_size}; "
                f"use a tp in {_divisors(c.intermediate_size, limit=64)}"
            )
        if c.vocab_size % self.tp != 0:
            raise ValueError(
                f"mesh degree tp={self.tp} does not divide vocab_size={c.vocab_size}; "
                f"use a tp in {_divisors(c.vocab_size, limit=64)}"
            )
        if self.pp > c.num_layers:
            raise ValueError(
                f"mesh degree pp={self.pp} is larger than the model's {c.num_layers} layers; use pp <= {c.num_layers}"
            )
        if self.ep > 1 and not c.is_moe:
            raise ValueError(
                f"mesh degree ep={self.ep}: {c.architecture} has no experts; set ep to 1"
            )
        if self.ep > 1 and c.num_experts % self.ep != 0:
            raise ValueError(
                f"mesh degree ep={self.ep} does not divide the model's {c.num_experts} experts; use ep = 1 or a "
                f"mesh whose cp * tp divides {c.num_experts} (ep must be 1 or cp * tp)"
            )

    def coords(self, rank: int) -> dict[str, int]:
        """The (pp, cp, tp) coordinates of `rank`."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the mesh of {self.world_size} ranks")
        return {"pp": rank // (self.cp * self.tp), "cp": (rank // self.tp) % self.cp, "tp": rank % self.tp}

    def rank_of(self, *, pp: int, cp: int, tp: int) -> int:
        return (pp * self.cp + cp) * self.tp + tp

    def axis_groups(self, axis: str) -> list[list[int]]:
        """Every group of ranks along `axis` ('pp', 'cp', 'tp' or 'ep'), in a fixed order all ranks agree on."""
        if axis == "ep":
            # All ranks of one pipeline stage: the cp x tp sub-mesh.
            size = self.cp * self.tp
            return [list(range(stage * size, (stage + 1) * size)) for stage in range(self.pp)]
        if axis not in AXES:
            raise ValueError(f"unknown mesh axis {axis!r}; expected one of {AXES + ('ep',)}")
        groups: dict[tuple[int, ...], list[int]] = {}
        for rank in range(self.world_size):
            coords = self.coords(rank)
            key = tuple(coords[other] for other in AXES if other != axis)
            groups.setdefault(key, []).append(rank)
        return list(groups.values())


def stage_layer_range(num_layers: int, pp_size: int, pp_rank: int) -> range:
    """Global indices of the layers pipeline stage `pp_rank` holds: contiguous, sizes differing by at most one,
    the first `num_layers % pp_size` stages taking the extra layer."""
    if not 1 <= pp_size <= num_layers:
        raise ValueError(f"stage_layer_range: pp={pp_size} must be in 1..{num_layers} (the model's layers)")
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"stage_layer_range: pp_rank {pp_rank} is outside 0..{pp_size - 1}")
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (1 if pp_rank < extra else 0))


def _divisors(n: int, limit: int | None = None) -> list[int]:
    found = [d for d in range(1, n + 1) if n % d == 0]
    return [d for d in found if limit is None or d <= limit]


@dataclass(frozen=True)
class _AxisView:
    rank: int
    size: int
    group: Any  # torch.distributed.ProcessGroup | None


@dataclass(eq=False)
class ParallelDims:
    """One rank's place in the mesh and its process groups (None when that axis has one rank or world is 1)."""

    shape: MeshShape
    rank: int
    _axes: dict[str, _AxisView] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        coords = self.shape.coords(self.rank)
        coords["ep"] = self.rank % (self.shape.cp * self.shape.tp) if self.shape.ep > 1 else 0
        sizes = {"pp": self.shape.pp, "cp": self.shape.cp, "tp": self.shape.tp, "ep": self.shape.ep}
        groups = self._create_groups() if self.shape.world_size > 1 else {}
        self._axes = {axis: _AxisView(coords[axis], sizes[axis], groups.get(axis)) for axis in sizes}

    @classmethod
    def single(cls) -> ParallelDims:
        """The one-rank mesh: every degree 1, every group None."""
        return cls(MeshShape(), 0)

    def _create_groups(self) -> dict[str, Any]:
        """Collective: every rank creates every group in the same order and keeps the ones it belongs to."""
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                f"ParallelDims for a {self.shape.world_size}-rank mesh needs torch.distributed initialised first "
                "(init_process_group on every rank)"
            )
        if dist.get_world_size() != self.shape.world_size:
            raise RuntimeError(
                f"torch.distributed world size {dist.get_world_size()} does not match the mesh "
                f"{self.shape} (world_size {self.shape.world_size})"
            )
        mine: dict[str, Any] = {}
        sizes = {"pp": self.shape.pp, "cp": self.shape.cp, "tp": self.shape.tp, "ep": self.shape.ep}
        for axis in ("pp", "cp", "tp", "ep"):
            if sizes[axis] == 1:
                continue  # a one-rank axis never communicates
            for ranks in self.shape.axis_groups(axis):
                group = dist.new_group(ranks)
                if self.rank in ranks:
                    mine[axis] = group
        return mine

    # One property per axis and field, so call sites read `dims.tp_group`, `dims.tp_rank`, `dims.tp_size`.
    @property
    def tp_group(self) -> Any:
        return self._axes["tp"].group

    @property
    def tp_rank(self) -> int:
        return self._axes["tp"].rank

    @property
    def tp_size(self) -> int:
        return self._axes["tp"].size

    @property
    def cp_group(self) -> Any:
        return self._axes["cp"].group

    @property
    def cp_rank(self) -> int:
        return self._axes["cp"].rank

    @property
    def cp_size(self) -> int:
        return self._axes["cp"].size

    @property
    def pp_group(self) -> Any:
        return self._axes["pp"].group

    @property
    def pp_rank(self) -> int:
        return self._axes["pp"].rank

    @property
    def pp_size(self) -> int:
        return self._axes["pp"].size

    @property
    def ep_group(self) -> Any:
        return self._axes["ep"].group

    @property
    def ep_rank(self) -> int:
        return self._axes["ep"].rank

    @property
    def ep_size(self) -> int:
        return self._axes["ep"].size

    @property
    def world_size(self) -> int:
        return self.shape.world_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1
