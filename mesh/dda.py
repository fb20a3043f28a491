"""Direct-access (DDA) collectives for one NCCL-backed CUDA process group on one host: one-shot and two-shot
all-reduce and a direct all-to-all, each one Triton launch over buffers every rank of the group can read and write
(PyTorch symmetric memory, no multicast: the machines keep NVLink multicast off and nothing here uses multimem).

Who calls it: `mesh.collectives` (which decides per message size between these and NCCL, and plugs them into
mesh.comm), benchmarks/collectives.py and tests. `DirectAccessGroup.create(group, buffer_bytes=...)` is
collective over `group` (every rank calls it, in the same order as its other collectives); after that each method
is a collective too, called by every rank with the same shapes.

What it promises:
- `all_reduce(tensor, algorithm="one-shot" | "two-shot")`: sums `tensor` in place over the group; 16-bit inputs are
  accumulated in float32 and rounded once; every rank ends with bit-identical values. `tensor` must be contiguous,
  on this rank's GPU, and at most `buffer_bytes / 2` (`message_bytes`: calls alternate between two halves).
- `all_to_all_single(output, input, output_split_sizes, input_split_sizes)`: as torch.distributed's (splits in
  rows of dim 0; None = equal), each rank's share at most `message_bytes / world_size`.
- The "-2b" algorithms (the first kernels, mesh/dda_kernels.py) and `all_reduce_torch_views` use the buffer without
  the halves: they are for measurement only, and must not follow a double-buffered call of the group before a
  device synchronisation and a group barrier.
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
MAX_BLOCKS = 128  # flag slots are reserved for this many blocks per phase
NUM_PHASES = 3  # barriers per launch at most (two-shot: scattered, reduced, done)
ALGORITHMS = ("one-shot", "two-shot", "one-shot-2b", "two-shot-2b")
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
    """int32 flags each rank holds for a group of `world_size` ranks (slot (phase, block, src))."""
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

    def __init__(self, *, group: Any, rank: int, world_size: int, buffer_bytes: int, buffer: torch.Tensor,
                 buffer_ptrs: torch.Tensor, flag_ptrs: torch.Tensor, epoch_flag_ptrs: torch.Tensor,
                 epochs: torch.Tensor, handles: tuple, max_blocks: int) -> None:
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self.buffer_bytes = buffer_bytes
        self.max_blocks = max_blocks
        self._buffer = buffer  # kept alive: peers map it
        self._buffer_ptrs = buffer_ptrs
        self._flag_ptrs = flag_ptrs  # int32 mailboxes of the "-2b" kernels
        self._epoch_flag_ptrs = epoch_flag_ptrs  # int64 epoch slots of the double-buffered kernels
        self._epochs = epochs  # this rank's call counter per block (mesh/dda_epoch_kernels.py)
        self._handles = handles
        self._buffer_handle = handles[0]
        self._equal_splits: dict[tuple, tuple[torch.Tensor, ...]] = {}  # fixed device splits, reused by graphs

    @classmethod
    def create(cls, group: Any, *, buffer_bytes: int = 8 << 20, max_blocks: int = MAX_BLOCKS) -> DirectAccessGroup:
        """Collective over `group`: checks support, allocates `buffer_bytes` of symmetric memory (+ flags) on the
        current CUDA device and exchanges the peer addresses once."""
        if buffer_bytes < 4096 or buffer_bytes % 4096:
            raise ValueError(f"DirectAccessGroup: buffer_bytes must be a positive multiple of 4096, got "
                             f"{buffer_bytes}")
        if not 1 <= max_blocks <= MAX_BLOCKS:
            raise ValueError(f"DirectAccessGroup: max_blocks must be in [1, {MAX_BLOCKS}], got {max_blocks}")
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        check_group_supports_direct_access(group, device)
        try:
            importlib.import_module("mesh.dda_kernels")  # Triton compiles the kernels at their first call
        except ImportError as error:
            raise DirectAccessUnavailable(f"Triton is not importable: {error}") from error
        try:
            import torch.distributed._symmetric_memory as symm_mem
        except ImportError as error:
            raise DirectAccessUnavailable(f"torch has no symmetric memory: {error}") from error
        world_size, rank = dist.get_world_size(group), dist.get_rank(group)
        try:
            _prefer_cuda_backend(symm_mem, device, group)
            buffer = symm_mem.empty(buffer_bytes, dtype=torch.uint8, device=device)
            flags = symm_mem.empty(num_flag_slots(world_size), dtype=torch.int32, device=device)
            epoch_flags = symm_mem.empty(num_flag_slots(world_size), dtype=torch.int64, device=device)
            flags.zero_()  # every slot empty before any peer can signal (the barrier below orders it)
            epoch_flags.zero_()
            torch.cuda.synchronize(device)
            buffer_handle = symm_mem.rendezvous(buffer, group)
            flag_handle = symm_mem.rendezvous(flags, group)
            epoch_flag_handle = symm_mem.rendezvous(epoch_flags, group)
        except (RuntimeError, AttributeError) as error:
            raise DirectAccessUnavailable(f"symmetric memory rendezvous failed: {error}") from error
        buffer_ptrs = torch.tensor(list(buffer_handle.buffer_ptrs), dtype=torch.int64, device=device)
        flag_ptrs = torch.tensor(list(flag_handle.buffer_ptrs), dtype=torch.int64, device=device)
        epoch_flag_ptrs = torch.tensor(list(epoch_flag_handle.buffer_ptrs), dtype=torch.int64, device=device)
        epochs = torch.zeros(MAX_BLOCKS, dtype=torch.int64, device=device)
        torch.cuda.synchronize(device)
        dist.barrier(group=group)  # no rank signals before every rank zeroed its flags
        return cls(group=group, rank=rank, world_size=world_size, buffer_bytes=buffer_bytes, buffer=buffer,
                   buffer_ptrs=buffer_ptrs, flag_ptrs=flag_ptrs, epoch_flag_ptrs=epoch_flag_ptrs, epochs=epochs,
                   handles=(buffer_handle, flag_handle, flags, epoch_flag_handle, epoch_flags),
                   max_blocks=max_blocks)

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

    def all_reduce(self, tensor: torch.Tensor, algorithm: str = "one-shot") -> None:
        """Sums `tensor` in place over the group (module docstring). "one-shot-2b" / "two-shot-2b": the first
        kernels (mesh/dda_kernels.py, a closing barrier per launch), kept to measure against."""
        if not self.supports(tensor):
            raise ValueError(f"DirectAccessGroup.all_reduce: needs a contiguous CUDA bf16/fp16/fp32 tensor of at "
                             f"most {self.message_bytes} bytes, got {tensor.dtype} {tuple(tensor.shape)} "
                             f"contiguous={tensor.is_contiguous()} on {tensor.device}")
        num_elements = tensor.numel()
        if num_elements == 0:
            return
        element_size = tensor.element_size()
        vector = max(1, _VECTOR_BYTES // element_size)
        slice_size = -(-(-(-num_elements // self.world_size)) // vector) * vector  # whole vectors per slice
        if algorithm in ("one-shot", "two-shot"):
            from mesh.dda_epoch_kernels import one_shot_kernel, two_shot_kernel

            shape = launch_shape(1, element_size, max_blocks=1)  # block size of this dtype; the grid is fixed
            grid = (self.max_blocks,)
            half_elements = self.message_bytes // element_size
            common = dict(WORLD=self.world_size, BLOCK=shape.block_elems, MAX_B=MAX_BLOCKS, num_warps=shape.num_warps)
            if algorithm == "one-shot":
                one_shot_kernel[grid](tensor, self._buffer_ptrs, self._epoch_flag_ptrs, self._epochs, num_elements,
                                      half_elements, self.rank, **common)
            else:
                two_shot_kernel[grid](tensor, self._buffer_ptrs, self._epoch_flag_ptrs, self._epochs, num_elements,
                                      slice_size, half_elements, self.rank, **common)
        elif algorithm == "one-shot-2b":
            from mesh.dda_kernels import one_shot_all_reduce_kernel

            shape = launch_shape(num_elements, element_size, max_blocks=self.max_blocks)
            one_shot_all_reduce_kernel[(shape.num_blocks,)](
                tensor, self._buffer_ptrs, self._flag_ptrs, num_elements, self.rank,
                WORLD=self.world_size, BLOCK=shape.block_elems, MAX_B=MAX_BLOCKS, num_warps=shape.num_warps)
        elif algorithm == "two-shot-2b":
            from mesh.dda_kernels import two_shot_all_reduce_kernel

            shape = launch_shape(slice_size, element_size, max_blocks=self.max_blocks)
            two_shot_all_reduce_kernel[(shape.num_blocks,)](
                tensor, self._buffer_ptrs, self._flag_ptrs, num_elements, slice_size, self.rank,
                WORLD=self.world_size, BLOCK=shape.block_elems, MAX_B=MAX_BLOCKS, num_warps=shape.num_warps)
        else:
            raise ValueError(f"DirectAccessGroup.all_reduce: algorithm {algorithm!r} is not one of {ALGORITHMS}")

    def all_reduce_torch_views(self, tensor: torch.Tensor) -> None:
        """The one-shot algorithm in torch ops on peer-buffer views with symmetric memory's own barrier (four
        launches instead of one). Kept to measure against the fused kernel (benchmarks/collectives.py)."""
        num_bytes = tensor.numel() * tensor.element_size()
        if not self.supports(tensor):
            raise ValueError(f"all_reduce_torch_views: tensor of {num_bytes} bytes does not fit the buffer")
        handle = self._buffer_handle
        views = [handle.get_buffer(peer, (tensor.numel(),), tensor.dtype) for peer in range(self.world_size)]
        views[self.rank].copy_(tensor.view(-1))
        handle.barrier(channel=0)
        total = views[0].float()
        for view in views[1:]:
            total += view.float()
        tensor.view(-1).copy_(total)
        handle.barrier(channel=1)

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
                             f"{self.slot_bytes}-byte slot of each source (buffer_bytes / world_size)")
        host = torch.tensor([*send[0], *send[1], *recv[0], *recv[1]], dtype=torch.int64)
        return tuple(host.to(input.device, non_blocking=False).view(4, self.world_size).unbind(0))

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor,
                          output_split_sizes: list[int] | None = None, input_split_sizes: list[int] | None = None,
                          *, split_tensors: tuple[torch.Tensor, ...] | None = None, algorithm: str = "direct",
                          ) -> None:
        """As torch.distributed.all_to_all_single (module docstring). `algorithm` "direct-2b": the first kernel."""
        from mesh.dda_epoch_kernels import all_to_all_kernel
        from mesh.dda_kernels import all_to_all_kernel as all_to_all_kernel_2b

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
        slot_elements = self.slot_bytes // input.element_size()
        if algorithm == "direct":
            shape = launch_shape(1, input.element_size(), max_blocks=1)  # block size of this dtype; grid fixed
            all_to_all_kernel[(self.max_blocks,)](
                input, output, self._buffer_ptrs, self._epoch_flag_ptrs, self._epochs, send_offsets, send_sizes,
                recv_offsets, recv_sizes, slot_elements, self.message_bytes // input.element_size(), self.rank,
                WORLD=self.world_size, BLOCK=shape.block_elems, MAX_B=MAX_BLOCKS, num_warps=shape.num_warps)
        elif algorithm == "direct-2b":
            # a fixed grid: with uneven splits the ranks' tensor sizes differ, and every block must meet its peer
            shape = launch_shape(1, input.element_size(), max_blocks=1)
            all_to_all_kernel_2b[(self.max_blocks,)](
                input, output, self._buffer_ptrs, self._flag_ptrs, send_offsets, send_sizes, recv_offsets,
                recv_sizes, slot_elements, self.rank, WORLD=self.world_size, BLOCK=shape.block_elems,
                MAX_B=MAX_BLOCKS, num_warps=shape.num_warps)
        else:
            raise ValueError(f"DirectAccessGroup.all_to_all_single: algorithm {algorithm!r} is not direct or "
                             f"direct-2b")


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
