"""Free-list allocator for the decode tier's paged KV cache blocks.

The DecodeEngine owns one BlockPool; a block id indexes dimension 0 of every per-layer KV tensor. The pool knows
nothing about tensors or sequences: it only hands out and takes back integer ids, in O(1) per block.
"""

from __future__ import annotations


class OutOfBlocks(RuntimeError):
    """Raised by BlockPool.allocate when fewer blocks are free than were requested.

    The router treats it as "this replica is full": it tries another decode replica or applies backpressure.
    """

    def __init__(self, num_requested: int, num_free: int, num_total: int) -> None:
        self.num_requested = num_requested
        self.num_free = num_free
        self.num_total = num_total
        super().__init__(
            f"out of KV cache blocks: requested {num_requested}, free {num_free} of {num_total}"
        )


class BlockPool:
    """Block ids 0..num_blocks-1, handed out from a free list.

    allocate() is all-or-nothing: on OutOfBlocks the pool is unchanged. free() rejects ids that are out of range
    or not currently allocated (a double free), so a bookkeeping bug shows up at once instead of two sequences
    silently sharing a block. Not thread-safe on its own: the engine calls it under its lock.
    """

    def __init__(self, num_blocks: int) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        self._num_total = num_blocks
        # Popping from the end of a list is O(1); reversed so that the first allocation gets ids 0, 1, 2, ...
        self._free_ids: list[int] = list(range(num_blocks - 1, -1, -1))
        self._is_allocated: list[bool] = [False] * num_blocks

    @property
    def num_total(self) -> int:
        return self._num_total

    @property
    def num_free(self) -> int:
        return len(self._free_ids)

    @property
    def num_used(self) -> int:
        return self._num_total - len(self._free_ids)

    def allocate(self, num_blocks: int) -> list[int]:
        """Return num_blocks distinct free ids (0 gives []), or raise OutOfBlocks leaving the pool unchanged."""
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
            raise ValueError(f"number of blocks to allocate must be a non-negative int, got {num_blocks!r}")
        if num_blocks > len(self._free_ids):
            raise OutOfBlocks(num_blocks, len(self._free_ids), self._num_total)
        if num_blocks == 0:
            return []
        block_ids = self._free_ids[-num_blocks:]
        del self._free_ids[-num_blocks:]
        block_ids.reverse()
        for block_id in block_ids:
            self._is_allocated[block_id] = True
        return block_ids

    def free(self, block_ids: list[int]) -> None:
        """Give blocks back. Unknown or not-allocated ids (or duplicates in one call) raise ValueError and free
        nothing, so a failed call never leaves the pool half-updated."""
        seen: set[int] = set()
        for block_id in block_ids:
            if isinstance(block_id, bool) or not isinstance(block_id, int):
                raise ValueError(f"block id must be an int, got {block_id!r}")
            if not 0 <= block_id < self._num_total:
                raise ValueError(f"unknown block id {block_id}: this pool has ids 0..{self._num_total - 1}")
            if not self._is_allocated[block_id] or block_id in seen:
                raise ValueError(f"double free of block {block_id}: it is not allocated")
            seen.add(block_id)
        for block_id in block_ids:
            self._is_allocated[block_id] = False
            self._free_ids.append(block_id)

    def is_allocated(self, block_id: int) -> bool:
        return 0 <= block_id < self._num_total and self._is_allocated[block_id]

    def __repr__(self) -> str:
        return f"BlockPool(num_free={self.num_free}, num_total={self.num_total})"
