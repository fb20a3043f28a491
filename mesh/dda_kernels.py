"""Triton kernels of the direct-access (DDA) collectives: every rank reads or writes its peers' buffers itself over
NVLink (peer pointers from PyTorch symmetric memory), and blocks of the same index on different ranks meet at
flag barriers. No multicast, no NCCL, one launch per collective.

Who calls it: `mesh.dda.DirectAccessGroup` only (it owns the buffers, the flags and the launch geometry).

The barrier: every rank holds an int32 flag array its peers can write. Flag slot `(phase, block, src)` on rank
`dst` is a mailbox: `src` signals with a posted atomic add of 1 into it (release, system scope; no round trip is
waited for), `dst` waits by swapping it 1 -> 0 (acquire, system scope, local memory). A slot never holds two
signals: before `src` can signal the same slot again it must pass a later barrier (every kernel has at least two)
or start a later launch, and both need a signal `dst` sends only after consuming the first. So a barrier needs no
epoch counters and no reset, works inside CUDA graphs (nothing read from the host) and is reusable forever,
provided all ranks run the same sequence of launches (they do: collectives are called in the same order
everywhere). A rank does not signal itself. A `tl.debug_barrier()` (bar.sync) before the signal makes the whole block's stores
part of what the release publishes, and one after the wait makes the acquired data visible to every thread.

Pairing: block b of a launch only ever reads data that block b of the peer wrote (each kernel assigns elements to
blocks by the same rule on every rank), so the barrier of block b with its peers' block b is all the ordering a
block needs: there is no grid-wide barrier. Every kernel ends with a second barrier so that the next launch cannot
overwrite a buffer a peer is still reading.

All blocks of a launch must be resident at once on each GPU (a waiting block spins): the caller keeps the grid at
most `mesh.dda.MAX_BLOCKS` (the flag slots are laid out for that many: `MAX_B`), far under what an H100/H200 holds.
"""

from __future__ import annotations

import triton
import triton.language as tl

@triton.jit
def _barrier(flag_ptrs, phase, rank, WORLD: tl.constexpr, MAX_B: tl.constexpr):
    """Block `program_id` of this rank meets the same block of every other rank (see the module docstring)."""
    block = tl.program_id(0)
    slot = (phase * MAX_B + block) * WORLD
    tl.debug_barrier()  # every thread's stores are issued before thread 0 releases them
    for peer in tl.static_range(WORLD):
        if peer != rank:  # posted: the result is unused, so nothing waits for the round trip over NVLink
            peer_flags = tl.load(flag_ptrs + peer).to(tl.pointer_type(tl.int32))
            tl.atomic_add(peer_flags + slot + rank, 1, sem="release", scope="sys")
    my_flags = tl.load(flag_ptrs + rank).to(tl.pointer_type(tl.int32))
    for peer in tl.static_range(WORLD):
        if peer != rank:  # local polling; a slot never holds more than one signal (module docstring)
            while tl.atomic_cas(my_flags + slot + peer, 1, 0, sem="acquire", scope="sys") != 1:
                pass
    tl.debug_barrier()  # the acquired data is visible to the whole block from here


@triton.jit(do_not_specialize=["num_elements", "rank"])
def one_shot_all_reduce_kernel(data_ptr, buffer_ptrs, flag_ptrs, num_elements, rank,
                               WORLD: tl.constexpr, BLOCK: tl.constexpr, MAX_B: tl.constexpr):
    """data (in place) <- sum over ranks of data. Each rank publishes its input in its buffer, then every rank
    reads all buffers and sums in float32 (rank order, so every rank computes bit-identical results)."""
    block = tl.program_id(0)
    stride = tl.num_programs(0) * BLOCK
    dtype = data_ptr.dtype.element_ty
    my_buffer = tl.load(buffer_ptrs + rank).to(tl.pointer_type(dtype))
    for start in range(block * BLOCK, num_elements, stride):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < num_elements
        tl.store(my_buffer + offs, tl.load(data_ptr + offs, mask=mask), mask=mask)
    _barrier(flag_ptrs, 0, rank, WORLD, MAX_B)
    for start in range(block * BLOCK, num_elements, stride):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < num_elements
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for peer in tl.static_range(WORLD):
            peer_buffer = tl.load(buffer_ptrs + peer).to(tl.pointer_type(dtype))
            acc += tl.load(peer_buffer + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(data_ptr + offs, acc.to(dtype), mask=mask)
    _barrier(flag_ptrs, 1, rank, WORLD, MAX_B)


@triton.jit(do_not_specialize=["num_elements", "slice_size", "rank"])
def two_shot_all_reduce_kernel(data_ptr, buffer_ptrs, flag_ptrs, num_elements, slice_size, rank,
                               WORLD: tl.constexpr, BLOCK: tl.constexpr, MAX_B: tl.constexpr):
    """Reduce-scatter then all-gather through the same buffers. The tensor is cut into WORLD slices of
    `slice_size`; rank r sums slice r over all ranks (float32) into its own buffer, then every rank copies each
    slice from its owner. Block b handles offsets b*BLOCK, b*BLOCK + stride, ... of every slice (the pairing)."""
    block = tl.program_id(0)
    stride = tl.num_programs(0) * BLOCK
    dtype = data_ptr.dtype.element_ty
    my_buffer = tl.load(buffer_ptrs + rank).to(tl.pointer_type(dtype))
    for part in tl.static_range(WORLD):
        for start in range(block * BLOCK, slice_size, stride):
            offs = part * slice_size + start + tl.arange(0, BLOCK)
            mask = (offs < num_elements) & (start + tl.arange(0, BLOCK) < slice_size)
            tl.store(my_buffer + offs, tl.load(data_ptr + offs, mask=mask), mask=mask)
    _barrier(flag_ptrs, 0, rank, WORLD, MAX_B)
    for start in range(block * BLOCK, slice_size, stride):
        offs = rank * slice_size + start + tl.arange(0, BLOCK)
        mask = (offs < num_elements) & (start + tl.arange(0, BLOCK) < slice_size)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for peer in tl.static_range(WORLD):
            peer_buffer = tl.load(buffer_ptrs + peer).to(tl.pointer_type(dtype))
            acc += tl.load(peer_buffer + offs, mask=mask, other=0.0).to(tl.float32)
        reduced = acc.to(dtype)
        tl.store(my_buffer + offs, reduced, mask=mask)  # only this rank reads its own slice before the barrier
        tl.store(data_ptr + offs, reduced, mask=mask)
    _barrier(flag_ptrs, 1, rank, WORLD, MAX_B)
    for part in tl.static_range(WORLD):
        if part != rank:
            owner_buffer = tl.load(buffer_ptrs + part).to(tl.pointer_type(dtype))
            for start in range(block * BLOCK, slice_size, stride):
                offs = part * slice_size + start + tl.arange(0, BLOCK)
                mask = (offs < num_elements) & (start + tl.arange(0, BLOCK) < slice_size)
                tl.store(data_ptr + offs, tl.load(owner_buffer + offs, mask=mask), mask=mask)
    _barrier(flag_ptrs, 2, rank, WORLD, MAX_B)


@triton.jit(do_not_specialize=["slot_size", "rank"])
def all_to_all_kernel(in_ptr, out_ptr, recv_ptrs, flag_ptrs, send_offsets, send_sizes, recv_offsets, recv_sizes,
                      slot_size, rank, WORLD: tl.constexpr, BLOCK: tl.constexpr, MAX_B: tl.constexpr):
    """Rank r writes in[send_offsets[p] : + send_sizes[p]] straight into slot r of rank p's receive buffer (slots
    of `slot_size` elements, one per source), barrier, then copies slot p [: recv_sizes[p]] of its own buffer to
    out[recv_offsets[p]:]. Offsets and sizes are int64 device arrays in elements, so a graph replays any split."""
    block = tl.program_id(0)
    stride = tl.num_programs(0) * BLOCK
    dtype = out_ptr.dtype.element_ty
    for peer in tl.static_range(WORLD):
        peer_recv = tl.load(recv_ptrs + peer).to(tl.pointer_type(dtype)) + rank * slot_size
        src = in_ptr + tl.load(send_offsets + peer)
        size = tl.load(send_sizes + peer)
        for start in range(block * BLOCK, size, stride):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < size
            tl.store(peer_recv + offs, tl.load(src + offs, mask=mask), mask=mask)
    _barrier(flag_ptrs, 0, rank, WORLD, MAX_B)
    my_recv = tl.load(recv_ptrs + rank).to(tl.pointer_type(dtype))
    for peer in tl.static_range(WORLD):
        src = my_recv + peer * slot_size
        dst = out_ptr + tl.load(recv_offsets + peer)
        size = tl.load(recv_sizes + peer)
        for start in range(block * BLOCK, size, stride):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < size
            tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)
    _barrier(flag_ptrs, 1, rank, WORLD, MAX_B)
