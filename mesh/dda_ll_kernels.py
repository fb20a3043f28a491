"""Low-latency one-shot all-reduce for small messages: data and flag travel together, so there is no barrier.

Who calls it: `mesh.dda.DirectAccessGroup.all_reduce(tensor, "one-shot")` for messages of at most `ll_max_bytes`
whose size is a multiple of 4 bytes (the rest take mesh/dda_epoch_kernels.py's one-shot).

How: the message is read as 32-bit words (two bf16/fp16 values or one float32). Each word is sent to every peer as
one 64-bit store `epoch << 32 | word` straight into the peer's receive buffer (slot of the sender, half `epoch % 2`).
A 64-bit aligned store is seen whole or not at all, so the receiver polls its own buffer until every word of the
chunk carries the current epoch and then sums: one one-way trip over NVLink, no fence, no flag round trip (the
low-latency protocol of NCCL, done with direct stores). Half `epoch % 2` is written again two calls later, and by
then the peer has finished this call (it must have sent its data of the call in between, which it does only after
finishing this one), so no barrier guards the buffer either.

Epochs: the per-block call counters `epochs[b]` shared with the other double-buffered kernels (fixed grid, every
rank counts alike). The tag keeps the low 32 bits of the epoch: a stale word could only match after exactly 2**32
calls without being rewritten. Accumulation in float32, rank order: every rank gets bit-identical results.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _words_to_float(bits, IS_16BIT: tl.constexpr, dtype: tl.constexpr):
    """(low, high) float32 values of 32-bit words: two 16-bit values, or one float32 (high = 0)."""
    if IS_16BIT:
        low = (bits & 0xFFFF).to(tl.int16).to(dtype, bitcast=True).to(tl.float32)
        high = (bits >> 16).to(tl.int16).to(dtype, bitcast=True).to(tl.float32)
    else:
        low = bits.to(tl.float32, bitcast=True)
        high = tl.zeros_like(low)
    return low, high


@triton.jit(do_not_specialize=["num_words", "slot_words", "rank"])
def one_shot_ll_kernel(data_ptr, ll_ptrs, epochs_ptr, num_words, slot_words, rank, WORLD: tl.constexpr,
                       BLOCK: tl.constexpr, IS_16BIT: tl.constexpr):
    block = tl.program_id(0)
    stride = tl.num_programs(0) * BLOCK
    dtype = data_ptr.dtype.element_ty
    words_ptr = data_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    epoch = tl.load(epochs_ptr + block) + 1
    tag32 = epoch & 0xFFFFFFFF
    tag = tag32 << 32
    half = (epoch % 2) * (WORLD * slot_words)
    my_ll = tl.load(ll_ptrs + rank).to(tl.pointer_type(tl.int64)) + half
    for start in range(block * BLOCK, num_words, stride):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < num_words
        own = tl.load(words_ptr + offs, mask=mask, other=0)
        packed = tag | (own.to(tl.int64) & 0xFFFFFFFF)
        for peer in tl.static_range(WORLD):
            if peer != rank:
                peer_ll = tl.load(ll_ptrs + peer).to(tl.pointer_type(tl.int64)) + half + rank * slot_words
                tl.store(peer_ll + offs, packed, mask=mask)
        acc_low = tl.zeros([BLOCK], dtype=tl.float32)
        acc_high = tl.zeros([BLOCK], dtype=tl.float32)
        for peer in tl.static_range(WORLD):
            if peer == rank:
                bits = own
            else:
                src = my_ll + peer * slot_words + offs
                received = tl.load(src, mask=mask, other=0, volatile=True)
                while tl.sum(((((received >> 32) & 0xFFFFFFFF) != tag32) & mask).to(tl.int32), axis=0) > 0:
                    received = tl.load(src, mask=mask, other=0, volatile=True)
                bits = received.to(tl.int32)  # the low 32 bits: the word
            low, high = _words_to_float(bits, IS_16BIT, dtype)
            acc_low += low
            acc_high += high
        if IS_16BIT:
            low_bits = acc_low.to(dtype).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            high_bits = acc_high.to(dtype).to(tl.int16, bitcast=True).to(tl.int32) << 16
            tl.store(words_ptr + offs, low_bits | high_bits, mask=mask)
        else:
            tl.store(data_ptr + offs, acc_low, mask=mask)
    tl.store(epochs_ptr + block, epoch)
