"""Decode steps of a GpuDecoder over preallocated buffers, replayed from one CUDA graph per batch-size bucket.

Who calls it: `mesh.gpu_step_runner.GpuStepRunner` (the decode engine's entry point), benchmarks and tests.
`DecodeGraphs(decoder, kv_cache, max_num_seqs=...)`, then `capture()` once, then `step(...)` per decode step.

What it promises:
- A step of n sequences runs the graph of the smallest bucket >= n (1, 2, 4, ..., 256 by default, plus
  max_num_seqs) with the rows past n padded (slot -1: no cache write; sequence length 0: zero attention), so
  sequences join and leave the batch between any two steps without a recapture.
- Host work per step is a few numpy writes into pinned staging buffers and one 4 x max_num_seqs host-to-device
  copy; a sequence's block-table row is copied only when the row's owner changes (the decode scheduler reserves
  every block up front, so a running sequence's table never changes). The only synchronisation is the caller
  reading the returned tokens (and the next step waiting for the previous step's input copy to finish).
- With ops that are not graph safe (TorchOps, e.g. on CPU) the same step runs eagerly: that is the path the CPU
  tests check against the reference model.
- Buckets of a power of two rows up to mesh.gpu_ops.MAX_FUSED_ROWS can run the fused decode (GpuDecoder.decode
  fused=True). With `fused=None` (default) capture() tunes the fused kernels' tiles (mesh.gpu_gemv_tuning),
  captures both variants, times their replays and keeps the faster (`choices[rows]` records the times); True or
  False forces one (eagerly, None means the unfused step).
- The Triton kernels are launched with programmatic dependent launch (mesh.triton_pdl) where the GPU has it:
  `pdl=None` (default) captures every bucket with and without and keeps the faster; True / False force it. A
  variant that fails to tune or capture is skipped (its error kept in `choices[rows]["errors"]`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mesh.cuda_timing import median_replay_ms
from mesh.gpu_decoder import GpuDecoder
from mesh.gpu_ops import is_fusable
from mesh.triton_pdl import is_supported as pdl_supported
from mesh.triton_pdl import pdl_launches

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_IO_INPUT_IDS, _IO_POSITIONS, _IO_SLOTS, _IO_SEQ_LENS = range(4)


def bucket_sizes(max_num_seqs: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> list[int]:
    """The buckets up to max_num_seqs, plus max_num_seqs itself when it falls between (or beyond) them."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    sizes = sorted({b for b in buckets if 1 <= b < max_num_seqs} | {max_num_seqs})
    return sizes


def num_splits_for(batch_size: int, num_kv_heads: int, num_sms: int, max_splits: int = 16) -> int:
    """Splits of each sequence's context in the paged attention: enough programs for about two waves of the
    chip's multiprocessors (a batch of one otherwise runs on num_kv_heads of them), never more than max_splits."""
    programs = batch_size * num_kv_heads
    return max(1, min(max_splits, -(-2 * num_sms // programs)))


class DecodeGraphs:
    def __init__(self, decoder: GpuDecoder, kv_cache: Sequence[torch.Tensor], *, max_num_seqs: int,
                 max_model_len: int | None = None, buckets: Sequence[int] = DEFAULT_BUCKETS,
                 use_graphs: bool | None = None, fused: bool | None = None, pdl: bool | None = None) -> None:
        if len(kv_cache) != decoder.config.num_layers:
            raise ValueError(f"DecodeGraphs: kv_cache has {len(kv_cache)} layers, the model "
                             f"{decoder.config.num_layers}")
        self.decoder = decoder
        self.kv_cache = list(kv_cache)
        self.device = kv_cache[0].device
        self.block_size = kv_cache[0].shape[2]
        self.max_num_seqs = max_num_seqs
        self.buckets = bucket_sizes(max_num_seqs, buckets)
        max_model_len = min(max_model_len or decoder.max_positions, decoder.max_positions)
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        is_cuda = self.device.type == "cuda"
        self.use_graphs = (is_cuda and decoder.ops.is_graph_safe) if use_graphs is None else use_graphs
        if self.use_graphs and not (is_cuda and decoder.ops.is_graph_safe):
            raise ValueError(f"DecodeGraphs: CUDA graphs need a CUDA device and graph-safe ops, have "
                             f"{self.device} and {decoder.ops.name}")
        num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count if is_cuda else 1
        self.num_splits = {b: (num_splits_for(b, decoder.num_kv_heads, num_sms) if decoder.ops.is_graph_safe else 1)
                           for b in self.buckets}
        rows = self.buckets[-1]
        # Device inputs read by the graphs, and their pinned host staging copies.
        self._io = torch.zeros((4, rows), dtype=torch.long, device=self.device)
        self._host_io = torch.zeros((4, rows), dtype=torch.long, pin_memory=is_cuda)
        self._io_np = self._host_io.numpy()
        self._tables = torch.zeros((rows, self.max_blocks_per_seq), dtype=torch.int32, device=self.device)
        self._host_tables = torch.zeros((rows, self.max_blocks_per_seq), dtype=torch.int32, pin_memory=is_cuda)
        self._tables_np = self._host_tables.numpy()
        self._row_owner: list[tuple | None] = [None] * rows
        self._copied = torch.cuda.Event() if is_cuda else None
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.fused = fused
        can_fuse = hasattr(decoder.ops, "fused_linear")
        # rows -> runs the fused decode; capture() may revise the undecided (fused=None) ones by measurement.
        self.is_fused = {b: bool(fused) and can_fuse and is_fusable(b) for b in self.buckets}
        self._undecided = {b for b in self.buckets if fused is None and can_fuse and is_fusable(b)}
        self.choices: dict[int, dict] = {}  # rows -> {"fused_ms", "plain_ms", "fused", "pdl", "variants_ms", "gemv"}
        self.pdl = pdl
        self.is_pdl = {b: pdl is not False and is_cuda and pdl_supported() for b in self.buckets}
        self._pad_rows(0, rows)
        self._io.copy_(self._host_io)

    def bucket_for(self, num_seqs: int) -> int:
        for size in self.buckets:
            if size >= num_seqs:
                return size
        raise ValueError(f"DecodeGraphs: {num_seqs} sequences, at most {self.max_num_seqs} (max_num_seqs)")

    def _forward(self, rows: int, fused: bool | None = None, pdl: bool | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        io = self._io
        fused = self.is_fused[rows] if fused is None else fused
        with pdl_launches(self.is_pdl[rows] if pdl is None else pdl):
            return self.decoder.decode(io[_IO_INPUT_IDS, :rows], io[_IO_POSITIONS, :rows], io[_IO_SLOTS, :rows],
                                       io[_IO_SEQ_LENS, :rows], self._tables[:rows], self.kv_cache,
                                       self.num_splits[rows], fused=fused)

    def capture(self) -> None:
        """One graph per bucket, largest first so the smaller ones reuse its memory pool. Runs each bucket twice
        eagerly first (Triton compilation, cuBLAS handles) with every row padded: the cache is never written.
        An undecided fusable bucket is captured both ways and keeps the variant whose replay is faster."""
        if not self.use_graphs or self._graphs:
            return
        self._copied.synchronize()
        self._pad_rows(0, self.buckets[-1])
        self._io.copy_(self._host_io)
        pool = torch.cuda.graph_pool_handle()
        for rows in sorted(self.buckets, reverse=True):
            pdl_options = [True, False] if self.pdl is None and self.is_pdl[rows] else [self.is_pdl[rows]]
            if rows not in self._undecided and len(pdl_options) == 1:
                self._graphs[rows] = self._capture_one(rows, self.is_fused[rows], self.is_pdl[rows], pool)
                continue
            fused_options = [True, False] if rows in self._undecided else [self.is_fused[rows]]
            variants, errors = {}, []
            if True in fused_options:
                from mesh.gpu_gemv_tuning import tune_decode_gemv

                try:
                    with pdl_launches(pdl_options[0]):
                        gemv = tune_decode_gemv(self.decoder, rows)
                except Exception as error:  # e.g. a kernel this GPU cannot compile: the unfused step still serves
                    errors.append(f"tuning: {type(error).__name__}: {str(error)[:300]}")
                    fused_options = [False]
            for fused in fused_options:
                for pdl in pdl_options:
                    try:
                        graph = self._capture_one(rows, fused, pdl, pool)
                    except Exception as error:
                        if not fused and not pdl:
                            raise  # the plain step itself failed: nothing to fall back to
                        errors.append(f"fused={fused} pdl={pdl}: {type(error).__name__}: {str(error)[:300]}")
                        continue
                    variants[(fused, pdl)] = (graph, median_replay_ms(graph[0]))
            if not variants:
                variants[(False, False)] = (graph := self._capture_one(rows, False, False, pool), median_replay_ms(graph[0]))
            (fused, pdl), (graph, _) = min(variants.items(), key=lambda item: item[1][1])
            self.is_fused[rows], self.is_pdl[rows] = fused, pdl
            self._graphs[rows] = graph
            times = {f"{'fused' if f else 'unfused'}{'+pdl' if p else ''}": ms for (f, p), (_, ms) in variants.items()}
            self.choices[rows] = {
                "fused": fused, "pdl": pdl, "variants_ms": times, "errors": errors,
                "fused_ms": min((ms for (f, _), (_, ms) in variants.items() if f), default=None),
                "plain_ms": min((ms for (f, _), (_, ms) in variants.items() if not f), default=None),
                "gemv": gemv if True in fused_options else None}
            del variants
        torch.cuda.synchronize(self.device)

    def _capture_one(self, rows: int, fused: bool, pdl: bool,
                     pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(rows, fused, pdl)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            logits, tokens = self._forward(rows, fused, pdl)
        return graph, logits, tokens

    def step(self, request_ids: Sequence, input_ids: Sequence[int], positions: Sequence[int],
             block_tables: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence i feeds input_ids[i] at positions[i] (its cached tokens: 0..positions[i] - 1) with its blocks
        block_tables[i]. Returns (float32 logits [n, vocab], greedy tokens [n]) on the device, valid until the next
        step; read the tokens before calling step again."""
        num_seqs = len(input_ids)
        if not num_seqs == len(positions) == len(block_tables) == len(request_ids):
            raise ValueError("DecodeGraphs.step: request_ids, input_ids, positions and block_tables differ in length")
        rows = self.bucket_for(num_seqs)
        if self.use_graphs and not self._graphs:
            self.capture()
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's input copy has left the staging buffers
        io = self._io_np
        io[_IO_INPUT_IDS, :num_seqs] = input_ids
        io[_IO_POSITIONS, :num_seqs] = positions
        dirty_lo, dirty_hi = self._write_tables(request_ids, block_tables)
        position = io[_IO_POSITIONS, :num_seqs]
        table_lens = np.fromiter((len(t) for t in block_tables), dtype=np.int64, count=num_seqs)
        if (position < 0).any() or (position >= table_lens * self.block_size).any():
            bad = int(np.argmax((position < 0) | (position >= table_lens * self.block_size)))
            raise ValueError(f"DecodeGraphs.step: sequence {bad} at position {int(position[bad])} has "
                             f"{table_lens[bad]} blocks of {self.block_size} tokens")
        if (position >= self.decoder.max_positions).any():
            raise ValueError(f"DecodeGraphs.step: a position is beyond the model's {self.decoder.max_positions}")
        blocks = self._tables_np[np.arange(num_seqs), position // self.block_size].astype(np.int64)
        io[_IO_SLOTS, :num_seqs] = blocks * self.block_size + position % self.block_size
        io[_IO_SEQ_LENS, :num_seqs] = position + 1
        self._pad_rows(num_seqs, rows)
        if dirty_hi > dirty_lo:
            self._tables[dirty_lo:dirty_hi].copy_(self._host_tables[dirty_lo:dirty_hi], non_blocking=True)
        self._io.copy_(self._host_io, non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        if self.use_graphs:
            graph, logits, tokens = self._graphs[rows]
            graph.replay()
        else:
            logits, tokens = self._forward(rows)
        return logits[:num_seqs], tokens[:num_seqs]

    def replay(self, num_seqs: int) -> None:
        """Replays the graph of num_seqs' bucket on the inputs staged by the last step (benchmarks: the device time
        of a step without its host work). The inputs are unchanged, so the cache slots get the same K/V again."""
        rows = self.bucket_for(num_seqs)
        if not self.use_graphs:
            self._forward(rows)
            return
        graph, _, _ = self._graphs[rows]
        graph.replay()

    def _write_tables(self, request_ids: Sequence, block_tables: Sequence[Sequence[int]]) -> tuple[int, int]:
        """Host block-table rows of sequences whose row changed owner; returns the dirty row range."""
        dirty_lo, dirty_hi = len(self._row_owner), 0
        for i, (request_id, table) in enumerate(zip(request_ids, block_tables)):
            num_blocks = len(table)
            if num_blocks > self.max_blocks_per_seq:
                raise ValueError(f"DecodeGraphs.step: sequence {i} has {num_blocks} blocks, at most "
                                 f"{self.max_blocks_per_seq} (max_model_len / block_size)")
            # A running sequence's table never changes (blocks are reserved up front); the length and the two
            # ends also catch a table that grew or was replaced.
            owner = (request_id, num_blocks, table[0] if num_blocks else -1, table[-1] if num_blocks else -1)
            if self._row_owner[i] != owner:
                self._tables_np[i, :num_blocks] = table
                self._row_owner[i] = owner
                dirty_lo, dirty_hi = min(dirty_lo, i), max(dirty_hi, i + 1)
        return dirty_lo, dirty_hi

    def _pad_rows(self, start: int, stop: int) -> None:
        io = self._io_np
        io[_IO_INPUT_IDS, start:stop] = 0
        io[_IO_POSITIONS, start:stop] = 0
        io[_IO_SLOTS, start:stop] = -1
        io[_IO_SEQ_LENS, start:stop] = 0

