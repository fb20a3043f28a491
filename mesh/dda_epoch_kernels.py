"""Triton kernels of the direct-access collectives with one barrier fewer per launch: double-buffered, epoch flags.

Who calls it: `mesh.dda.DirectAccessGroup` (algorithms "one-shot-barrier", "two-shot", and the all-to-all). The first
versions closed every launch with a second barrier ("*-2b" in benchmarks/results/collectives_h200x2_run1.json,
code at commit f13938a); these measured the same or faster, so they replaced them.

Why a launch can skip its closing barrier: every launch of a group runs the same fixed grid, and block b keeps
a call counter `epochs[b]` in ordinary device memory (read at the start, written back at the end; both ranks count
alike because every rank runs the same launches). Call k uses buffer half `k % 2`. Before a rank writes half h
again (call k + 2) its block b has passed the first barrier of call k + 1, which needs the peer's block b to have
started call k + 1, i.e. the peer's whole launch k (every read of half h) is finished: stream order does the rest.

The barrier: flag slot `(phase, block, src)` on rank `dst` holds the last epoch `src` reached there (int64, never
reset, never wraps). `src` publishes its epoch with a posted atomic exchange (release, system scope); `dst` polls
its local slot (acquire, system scope) until it holds at least its own epoch. A peer can be at most one call ahead
(it cannot pass the next barrier without us), and a larger epoch also means the smaller one was reached.
`tl.debug_barrier()` around it: the block's stores are all issued before thread 0 releases them, and the acquired
data is visible to every thread after.

Pairing, as in mesh/dda_kernels.py: block b only reads data the peers' block b wrote.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _epoch_barrier(flag_ptrs, phase, epoch, rank, WORLD: tl.constexpr, MAX_B: tl.constexpr):
    slot = (phase * MAX_B + tl.program_id(0)) * WORLD
    tl.debug_barrier()
    for peer in tl.static_range(WORLD):
        if peer != rank:
            peer_flags = tl.load(flag_ptrs + peer).to(tl.pointer_type(tl.int64))
            tl.atomic_xchg(peer_flags + slot + rank, epoch, sem="release", scope="sys")
    my_flags = tl.load(flag_ptrs + rank).to(tl.pointer_type(tl.int64))
    for peer in tl.static_range(WORLD):
        if peer != rank:
            while tl.atomic_add(my_flags + slot + peer, 0, sem="acquire", scope="sys") < epoch:
                pass
    tl.debug_barrier()


@triton.jit(do_not_specialize=["num_elements", "half_elements", "rank"])
def one_shot_kernel(data_ptr, buffer_ptrs, flag_ptrs, epochs_ptr, num_elements, half_elements, rank,
                    WORLD: tl.constexpr, BLOCK: tl.constexpr, MAX_B: tl.constexpr):
    """data (in place) <- sum over ranks, float32 accumulation in rank order (identical on every rank)."""
    block = tl.program_id(0)
    stride = tl.num_programs(0) * BLOCK
    dtype = data_ptr.dtype.element_ty
    epoch = tl.load(epochs_ptr + block) + 1
    half = (epoch % 2) * half_elements
    my_buffer = tl.load(buffer_ptrs + rank).to(tl.pointer_type(dtype)) + half
    for start in range(block * BLOCK, num_elements, stride):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < num_elements
        tl.store(my_buffer + offs, tl.load(data_ptr + offs, mask=mask), mask=mask)
    _epoch_barrier(flag_ptrs, 0, epoch, rank, WORLD, MAX_B)
    for start in range(block * BLOCK, num_elements, stride):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < num_elements
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for peer in tl.static_range(WORLD):
            peer_buffer = tl.load(buffer_ptrs + peer).to(tl.pointer_type(dtype)) + half
            acc += tl.load(peer_buffer + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(data_ptr + offs, acc.to(dtype), mask=mask)
    tl.store(epochs_ptr + block, epoch)


@triton.jit(do_not_specialize=["num_elements", "slice_size", "half_elements", "rank"])
def two_shot_kernel(data_ptr, buffer_ptrs, flag_ptrs, epochs_ptr, num_elements, slice_size, half_elements, rank,
                    WORLD: tl.constexpr, BLOCK: tl.constexpr, MAX_B: tl.constexpr):
    """Reduce-scatter (rank r sums slice r into its buffer) then all-gather (every rank copies each slice from its
    owner); block b handles offsets b*BLOCK + i*stride of every slice."""
    block = tl.program_id(0)
    stride = tl.num_programs(0) * BLOCK
    dtype = data_ptr.dtype.element_ty
    epoch = tl.load(epochs_ptr + block) + 1
    half = (epoch % 2) * half_elements
    my_buffer = tl.load(buffer_ptrs + rank).to(tl.pointer_type(dtype)) + half
    for part in tl.static_range(WORLD):
        for start in range(block * BLOCK, slice_size, stride):
            within = start + tl.arange(0, BLOCK)
            offs = part * slice_size + within
            mask = (offs < num_elements) & (within < slice_size)
            tl.store(my_buffer + offs, tl.load(data_ptr + offs, mask=mask), mask=mask)
    _epoch_barrier(flag_ptrs, 0, epoch, rank, WORLD, MAX_B)
    for start in range(block * BLOCK, slice_size, stride):
        within = start + tl.arange(0, BLOCK)
        offs = rank * slice_size + within
        mask = (offs < num_elements) & (within < slice_size)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for peer in tl.static_range(WORLD):
            peer_buffer = tl.load(buffer_ptrs + peer).to(tl.pointer_type(dtype)) + half
            acc += tl.load(peer_buffer + offs, mask=mask, other=0.0).to(tl.float32)
        reduced = acc.to(dtype)
        tl.store(my_buffer + offs, reduced, mask=mask)  # only this rank reads its own slice before the barrier
        tl.store(data_ptr + offs, reduced, mask=mask)
    _epoch_barrier(flag_ptrs, 1, epoch, rank, WORLD, MAX_B)
    for part in tl.static_range(WORLD):
        if part != rank:
            owner_buffer = tl.load(buffer_ptrs + part).to(tl.pointer_type(dtype)) + half
            for start in range(block * BLOCK, slice_size, stride):
                within = start + tl.arange(0, BLOCK)
                offs = part * slice_size + within
                mask = (offs < num_elements) & (within < slice_size)
                tl.store(data_ptr + offs, tl.load(owner_buffer + offs, mask=mask), mask=mask)
    tl.store(epochs_ptr + block, epoch)


@triton.jit(do_not_specialize=["slot_size", "half_elements", "rank"])
def all_to_all_kernel(in_ptr, out_ptr, recv_ptrs, flag_ptrs, epochs_ptr, send_offsets, send_sizes, recv_offsets,
                      recv_sizes, slot_size, half_elements, rank, WORLD: tl.constexpr, BLOCK: tl.constexpr,
                      MAX_B: tl.constexpr):
    """Rank r writes in[send_offsets[p]:][:send_sizes[p]] into slot r of rank p's receive half, barrier, then copies
    slot p [:recv_sizes[p]] of its own half to out[recv_offsets[p]:] (int64 element offsets/sizes on the device)."""
    block = tl.program_id(0)
    stride = tl.num_programs(0) * BLOCK
    dtype = out_ptr.dtype.element_ty
    epoch = tl.load(epochs_ptr + block) + 1
    half = (epoch % 2) * half_elements
    for peer in tl.static_range(WORLD):
        peer_recv = tl.load(recv_ptrs + peer).to(tl.pointer_type(dtype)) + half + rank * slot_size
        src = in_ptr + tl.load(send_offsets + peer)
        size = tl.load(send_sizes + peer)
        for start in range(block * BLOCK, size, stride):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < size
            tl.store(peer_recv + offs, tl.load(src + offs, mask=mask), mask=mask)
    _epoch_barrier(flag_ptrs, 0, epoch, rank, WORLD, MAX_B)
    my_recv = tl.load(recv_ptrs + rank).to(tl.pointer_type(dtype)) + half
    for peer in tl.static_range(WORLD):
        src = my_recv + peer * slot_size
        dst = out_ptr + tl.load(recv_offsets + peer)
        size = tl.load(recv_sizes + peer)
        for start in range(block * BLOCK, size, stride):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < size
            tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)
    tl.store(epochs_ptr + block, epoch)
