"""Direct-access (DDA) collectives for one NCCL-backed CUDA process group on one host: one-shot and two-shot
all-reduce and a direct all-to-all, each one Triton launch over buffers every rank of the group can read and write
(PyTorch symmetric memory, no multicast: the machines keep NVLink multicast off and nothing here uses multimem).

Who calls it: `mesh.collectives` (which decides per message size between these and NCCL, and plugs them into
mesh.comm), benchmarks/collectives.py and tests. `DirectAccessGroup.create(group, buffer_bytes=...)` is
collective over `group` (every rank calls it, in the same order as its other collectives); after that each method
is a collective too, called by every rank with the same shapes.

What it promises:
- `all_reduce(tensor, algorithm)`: sums `tensor` in place over the group; 16-bit inputs are accumulated in float32
  and rounded once; every rank ends with bit-identical values. `tensor` must be contiguous, on this rank's GPU, and
  at most `buffer_bytes / 2` (`message_bytes`: calls alternate between two halves). Algorithms: "one-shot" (the
  low-latency kernel, mesh/dda_ll_kernels.py, up to `ll_max_bytes` when the size is a multiple of 4 bytes; else
  "one-shot-barrier"), "one-shot-barrier" and "two-shot" (mesh/dda_epoch_kernels.py).
- `all_to_all_single(output, input, output_split_sizes, input_split_sizes)`: as torch.distributed's (splits in
  rows of dim 0; None = equal), each rank's share at most `message_bytes / world_size`.
- The kernel chosen depends on the size, dtype and 4-byte alignment of the tensor: the same on every rank when the
  ranks run the same code (equal shapes and offsets), which collectives require anyway.
- No host synchronisation and fixed buffers: every call can be captured in a CUDA graph and replayed. The
  all-to-all's split sizes become device tensors; pass `split_tensors=` (int64 element offsets/sizes) to keep
  them fixed inside a graph.
- `DirectAccessUnavailable` (from `create`) says why this group cannot use it (not CUDA, not one host, no peer
  access, more ranks than supported, symmetric memory missing); the caller falls back to NCCL.
"""

from __future__ import annotations

import importlib
import socket
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

MAX_WORLD_SIZE = 8  # ranks of one NVLink host; the one-shot reads grow with the world anyway
MAX_BLOCKS = 128  # flag slots and epoch counters are reserved for this many blocks
NUM_PHASES = 2  # barriers per launch at most (two-shot: scattered, reduced)
ALGORITHMS = ("one-shot", "one-shot-barrier", "two-shot")
_VECTOR_BYTES = 16  # per thread per iteration: one 128-bit load


class DirectAccessUnavailable(RuntimeError):
    """This group cannot use direct access; the message says why (the caller falls back to NCCL)."""


@dataclass(frozen=True, kw_only=True)
class LaunchShape:
    """Grid of one launch: `num_blocks` programs of `block_elems` elements per iteration, `num_warps` warps."""

    num_blocks: int
    block_elems: int
    num_warps: int

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.block_elems < 1 or self.num_warps < 1:
            raise ValueError(f"LaunchShape: all fields must be >= 1, got {self}")


def num_flag_slots(world_size: int) -> int:
    """int64 epoch flags each rank holds for a group of `world_size` ranks (slot (phase, block, src))."""
    return NUM_PHASES * MAX_BLOCKS * world_size


def launch_shape(num_elements: int, element_size: int, *, max_blocks: int, num_warps: int = 8) -> LaunchShape:
    """One 16-byte vector per thread per iteration; as many blocks as there are iterations, at most `max_blocks`
    (small messages: few blocks, each one iteration; large ones: `max_blocks` blocks that loop, enough loads in
    flight to cover NVLink's latency). The block size depends on the dtype only: one compiled kernel per dtype."""
    block_elems = num_warps * 32 * max(1, _VECTOR_BYTES // element_size)
    num_blocks = max(1, min(max_blocks, -(-num_elements // block_elems)))
    return LaunchShape(num_blocks=num_blocks, block_elems=block_elems, num_warps=num_warps)


def check_group_supports_direct_access(group: Any, device: torch.device) -> None:
    """Raises DirectAccessUnavailable naming the first reason this group cannot use direct access. Collective
    (gathers each rank's host and device)."""
    if device.type != "cuda":
        raise DirectAccessUnavailable(f"device {device} is not CUDA")
    backend = dist.get_backend(group)
    if "nccl" not in str(backend):
        raise DirectAccessUnavailable(f"group backend is {backend}, not nccl")
    world_size = dist.get_world_size(group)
    if world_size > MAX_WORLD_SIZE:
        raise DirectAccessUnavailable(f"{world_size} ranks; the direct-access buffers support at most "
                                      f"{MAX_WORLD_SIZE}")
    places: list[Any] = [None] * world_size
    dist.all_gather_object(places, (socket.gethostname(), torch.cuda.current_device()), group=group)
    hosts = {host for host, _ in places}
    if len(hosts) != 1:
        raise DirectAccessUnavailable(f"ranks span {len(hosts)} hosts; direct access needs one")
    me = torch.cuda.current_device()
    for _, other in places:
        if other != me and not torch.cuda.can_device_access_peer(me, other):
            raise DirectAccessUnavailable(f"GPU {me} has no peer access to GPU {other}")


class DirectAccessGroup:
    """Symmetric buffers, flags and launches for one process group. Create with `create` (collective)."""

    def __init__(self, *, group: Any, rank: int, world_size: int, buffer_bytes: int, ll_max_bytes: int,
                 pointers: dict[str, torch.Tensor], epochs: torch.Tensor, keep_alive: tuple, max_blocks: int) -> None:
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self.buffer_bytes = buffer_bytes
        self.ll_max_bytes = ll_max_bytes
        self.max_blocks = max_blocks  # every launch runs this grid (the epochs count per block)
        self._buffer_ptrs = pointers["buffer"]  # int64 [world]: each rank's buffer, mapped here
        self._flag_ptrs = pointers["flags"]
        self._ll_ptrs = pointers["ll"]
        self._epochs = epochs  # this rank's call counter per block (mesh/dda_epoch_kernels.py)
        self._keep_alive = keep_alive  # the symmetric tensors and handles: peers map them
        self._equal_splits: dict[tuple, tuple[torch.Tensor, ...]] = {}  # fixed device splits, reused by graphs

    @classmethod
    def create(cls, group: Any, *, buffer_bytes: int = 8 << 20, ll_max_bytes: int = 512 << 10,
               max_blocks: int = MAX_BLOCKS) -> DirectAccessGroup:
        """Collective over `group`: checks support, allocates `buffer_bytes` of symmetric memory, the low-latency
        buffer (2 halves x world slots x 2 x `ll_max_bytes`) and the flags on the current CUDA device, and
        exchanges the peer addresses once."""
        for name, value in (("buffer_bytes", buffer_bytes), ("ll_max_bytes", ll_max_bytes)):
            if value < 4096 or value % 4096:
                raise ValueError(f"DirectAccessGroup: {name} must be a positive multiple of 4096, got {value}")
        if not 1 <= max_blocks <= MAX_BLOCKS:
            raise ValueError(f"DirectAccessGroup: max_blocks must be in [1, {MAX_BLOCKS}], got {max_blocks}")
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        check_group_supports_direct_access(group, device)
        try:
            for module in ("mesh.dda_epoch_kernels", "mesh.dda_ll_kernels"):
                importlib.import_module(module)  # Triton compiles the kernels at their first call
        except ImportError as error:
            raise DirectAccessUnavailable(f"Triton is not importable: {error}") from error
        try:
            import torch.distributed._symmetric_memory as symm_mem
        except ImportError as error:
            raise DirectAccessUnavailable(f"torch has no symmetric memory: {error}") from error
        world_size, rank = dist.get_world_size(group), dist.get_rank(group)
        ll_words = 2 * world_size * (ll_max_bytes // 4)  # two halves of one slot per source, 8 bytes per word
        try:
            _prefer_cuda_backend(symm_mem, device, group)
            tensors = {"buffer": symm_mem.empty(buffer_bytes, dtype=torch.uint8, device=device),
                       "flags": symm_mem.empty(num_flag_slots(world_size), dtype=torch.int64, device=device),
                       "ll": symm_mem.empty(ll_words, dtype=torch.int64, device=device)}
            tensors["flags"].zero_()  # epoch 0 everywhere before any peer can signal (the barrier below orders it)
            tensors["ll"].zero_()  # tag 0: no word looks sent
            torch.cuda.synchronize(device)
            handles = {name: symm_mem.rendezvous(tensor, group) for name, tensor in tensors.items()}
        except (RuntimeError, AttributeError) as error:
            raise DirectAccessUnavailable(f"symmetric memory rendezvous failed: {error}") from error
        pointers = {name: torch.tensor(list(handle.buffer_ptrs), dtype=torch.int64, device=device)
                    for name, handle in handles.items()}
        epochs = torch.zeros(MAX_BLOCKS, dtype=torch.int64, device=device)
        torch.cuda.synchronize(device)
        dist.barrier(group=group)  # no rank signals before every rank zeroed its flags
        return cls(group=group, rank=rank, world_size=world_size, buffer_bytes=buffer_bytes,
                   ll_max_bytes=ll_max_bytes, pointers=pointers, epochs=epochs,
                   keep_alive=(tensors, handles), max_blocks=max_blocks)

    # ---- all-reduce -------------------------------------------------------------------------------------------

    @property
    def message_bytes(self) -> int:
        """Largest all-reduce / all-to-all input: half the buffer (calls alternate between the halves)."""
        return self.buffer_bytes // 2

    def supports(self, tensor: torch.Tensor) -> bool:
        """True when `all_reduce` takes this tensor (else the caller uses NCCL)."""
        return (tensor.is_cuda and tensor.is_contiguous() and tensor.dtype in (torch.bfloat16, torch.float16,
                                                                               torch.float32)
                and tensor.numel() * tensor.element_size() <= self.message_bytes)

    def takes_low_latency(self, tensor: torch.Tensor) -> bool:
        """"one-shot" runs the low-latency kernel for this tensor (whole 32-bit words, at most ll_max_bytes)."""
        num_bytes = tensor.numel() * tensor.element_size()
        return num_bytes <= self.ll_max_bytes and num_bytes % 4 == 0 and tensor.data_ptr() % 4 == 0

    def all_reduce(self, tensor: torch.Tensor, algorithm: str = "one-shot") -> None:
        """Sums `tensor` in place over the group (module docstring)."""
        from mesh.dda_epoch_kernels import one_shot_kernel, two_shot_kernel
        from mesh.dda_ll_kernels import one_shot_ll_kernel

        if algorithm not in ALGORITHMS:
            raise ValueError(f"DirectAccessGroup.all_reduce: algorithm {algorithm!r} is not one of {ALGORITHMS}")
        if not self.supports(tensor):
            raise ValueError(f"DirectAccessGroup.all_reduce: needs a contiguous CUDA bf16/fp16/fp32 tensor of at "
                             f"most {self.message_bytes} bytes, got {tensor.dtype} {tuple(tensor.shape)} "
                             f"contiguous={tensor.is_contiguous()} on {tensor.device}")
        num_elements = tensor.numel()
        if num_elements == 0:
            return
        element_size = tensor.element_size()
        shape = launch_shape(1, element_size, max_blocks=1)  # the block size of this dtype; the grid is fixed
        grid = (self.max_blocks,)
        if algorithm == "one-shot" and self.takes_low_latency(tensor):
            words = num_elements * element_size // 4
            one_shot_ll_kernel[grid](tensor, self._ll_ptrs, self._epochs, words, self.ll_max_bytes // 4, self.rank,
                                     WORLD=self.world_size, BLOCK=shape.num_warps * 32 * 2,
                                     IS_16BIT=element_size == 2, num_warps=shape.num_warps)
            return
        common = dict(WORLD=self.world_size, BLOCK=shape.block_elems, MAX_B=MAX_BLOCKS, num_warps=shape.num_warps)
        half_elements = self.message_bytes // element_size
        if algorithm == "two-shot":
            vector = max(1, _VECTOR_BYTES // element_size)
            slice_size = -(-(-(-num_elements // self.world_size)) // vector) * vector  # whole vectors per slice
            two_shot_kernel[grid](tensor, self._buffer_ptrs, self._flag_ptrs, self._epochs, num_elements,
                                  slice_size, half_elements, self.rank, **common)
        else:
            one_shot_kernel[grid](tensor, self._buffer_ptrs, self._flag_ptrs, self._epochs, num_elements,
                                  half_elements, self.rank, **common)

    # ---- all-to-all -------------------------------------------------------------------------------------------

    @property
    def slot_bytes(self) -> int:
        """Bytes one source rank may send to one destination in an all-to-all."""
        return self.message_bytes // self.world_size

    def split_tensors(self, output: torch.Tensor, input: torch.Tensor, output_split_sizes: list[int] | None,
                      input_split_sizes: list[int] | None) -> tuple[torch.Tensor, ...]:
        """(send_offsets, send_sizes, recv_offsets, recv_sizes), int64 element counts on the device, from splits
        in rows of dim 0 (None = equal)."""
        send = _element_splits(input, input_split_sizes, self.world_size, "input")
        recv = _element_splits(output, output_split_sizes, self.world_size, "output")
        largest = max(max(send[1]), max(recv[1])) * input.element_size()
        if largest > self.slot_bytes:
            raise ValueError(f"DirectAccessGroup.all_to_all_single: a {largest}-byte share exceeds the "
                             f"{self.slot_bytes}-byte slot of each source (message_bytes / world_size)")
        host = torch.tensor([*send[0], *send[1], *recv[0], *recv[1]], dtype=torch.int64)
        return tuple(host.to(input.device, non_blocking=False).view(4, self.world_size).unbind(0))

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor,
                          output_split_sizes: list[int] | None = None, input_split_sizes: list[int] | None = None,
                          *, split_tensors: tuple[torch.Tensor, ...] | None = None) -> None:
        """As torch.distributed.all_to_all_single (module docstring)."""
        from mesh.dda_epoch_kernels import all_to_all_kernel

        if not (input.is_cuda and output.is_cuda and input.is_contiguous() and output.is_contiguous()
                and input.dtype == output.dtype):
            raise ValueError("DirectAccessGroup.all_to_all_single: input and output must be contiguous CUDA tensors "
                             "of one dtype")
        if split_tensors is None and output_split_sizes is None and input_split_sizes is None:
            key = (tuple(input.shape), tuple(output.shape), input.dtype)
            if key not in self._equal_splits:  # first call (warm-up, before any capture) makes them
                self._equal_splits[key] = self.split_tensors(output, input, None, None)
            split_tensors = self._equal_splits[key]
        elif split_tensors is None:
            split_tensors = self.split_tensors(output, input, output_split_sizes, input_split_sizes)
        send_offsets, send_sizes, recv_offsets, recv_sizes = split_tensors
        element_size = input.element_size()
        shape = launch_shape(1, element_size, max_blocks=1)  # the block size of this dtype; the grid is fixed
        all_to_all_kernel[(self.max_blocks,)](
            input, output, self._buffer_ptrs, self._flag_ptrs, self._epochs, send_offsets, send_sizes, recv_offsets,
            recv_sizes, self.slot_bytes // element_size, self.message_bytes // element_size, self.rank,
            WORLD=self.world_size, BLOCK=shape.block_elems, MAX_B=MAX_BLOCKS, num_warps=shape.num_warps)


def _prefer_cuda_backend(symm_mem: Any, device: torch.device, group: Any) -> None:
    """CUDA IPC peer mappings (no NVSHMEM bootstrap, no multicast) unless this process already chose a backend."""
    try:
        if symm_mem.get_backend(device) is None:
            symm_mem.set_backend("CUDA")
    except (RuntimeError, AttributeError, ValueError):
        pass  # older torch without backends, or already fixed by an allocation: keep its default
    with warnings.catch_warnings():  # a no-op (deprecated) on recent torch, required on older ones
        warnings.simplefilter("ignore")
        try:
            symm_mem.enable_symm_mem_for_group(group.group_name)
        except (AttributeError, RuntimeError):
            pass


def _element_splits(tensor: torch.Tensor, split_sizes: list[int] | None, world_size: int,
                    what: str) -> tuple[list[int], list[int]]:
    """(offsets, sizes) in elements of `tensor` from row splits of dim 0."""
    num_rows = tensor.shape[0] if tensor.dim() else 1
    row_elements = tensor.numel() // num_rows if num_rows else 0
    if split_sizes is None:
        if num_rows % world_size:
            raise ValueError(f"all_to_all_single: {what} has {num_rows} rows, not divisible by {world_size} ranks")
        split_sizes = [num_rows // world_size] * world_size
    if len(split_sizes) != world_size or sum(split_sizes) != num_rows or min(split_sizes) < 0:
        raise ValueError(f"all_to_all_single: {what}_split_sizes {list(split_sizes)} must be {world_size} "
                         f"non-negative row counts summing to {num_rows}")
    sizes = [s * row_elements for s in split_sizes]
    offsets = [sum(sizes[:i]) for i in range(world_size)]
    return offsets, sizes
