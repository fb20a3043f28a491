"""Pipeline parallelism: the stage-to-stage hand-off and a micro-batch schedule that keeps stages busy.

A stage passes the next exactly one tensor per micro-batch: the hidden states [rows, hidden] after its last layer
(the residual stream is the hidden state in these pre-norm models, so nothing else is needed), from each rank to
the rank with the same (cp, tp) coordinates in the next stage, over their pp group. Rows are the step's packed
tokens, or the rank's CP shard on a cp-sharded step; every rank derives the shape from the step inputs it already
has, so no shape message travels.

Schedule (inference is forward only, so fill-and-drain is the whole of it): a stage posts the receives of every
micro-batch up front, then for m = 0, 1, ...: waits for m's hidden states, runs its layers, posts the send of m
(non-blocking) and goes straight on to m + 1. Stage s computes micro-batch m while stage s + 1 computes m - 1.

Who calls it: `CausalLM.forward` (one micro-batch) and the tier engines, on every rank of the replica with the same
micro-batches: `run_pipeline(model, micro_batches, kv_cache)`, or `forward_micro_batched` to split one batch's
sequences and get its logits back in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mesh import comm
from mesh.attention import AttentionBatch

if TYPE_CHECKING:
    from mesh.decoder import LayerHook
    from mesh.model import CausalLM
    from mesh.round_robin_kv import RoundRobinKVStore


@dataclass
class MicroBatch:
    """One forward's inputs (the same on every rank). A micro-batch holds whole sequences."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    batch: AttentionBatch
    layer_hook: LayerHook | None = None


def run_pipeline(model: CausalLM, micro_batches: list[MicroBatch], kv_cache: list[torch.Tensor] | None = None, *,
                 cp_mode: str = "auto", cp_store: RoundRobinKVStore | None = None) -> list[torch.Tensor | None]:
    """Runs every micro-batch through this rank's stage; returns one entry per micro-batch: its logits on the last
    stage, None elsewhere. Micro-batches must not share a sequence (they share kv_cache and cp_store)."""
    if not micro_batches:
        raise ValueError("run_pipeline: no micro-batches")
    dims = model.dims
    steps = [model.prepare_step(mb.input_ids, mb.positions, mb.batch, kv_cache, mb.layer_hook, cp_mode=cp_mode,
                                cp_store=cp_store) for mb in micro_batches]
    hidden_size = model.config.hidden_size
    received = []
    if not dims.is_first_stage:
        for index, step in enumerate(steps):
            buffer = torch.empty((step.num_rows, hidden_size), dtype=model.dtype, device=model.device)
            work = comm.irecv(buffer, group=dims.pp_group, group_src=dims.pp_rank - 1, tag=index)
            received.append((buffer, work))
    outputs: list[torch.Tensor | None] = []
    sends = []
    for index, step in enumerate(steps):
        if dims.is_first_stage:
            h = model.embed(step)
        else:
            h, work = received[index]
            work.wait()
        h = model.run_layers(h, step)
        if dims.is_last_stage:
            outputs.append(model.compute_logits(h, step))
        else:
            h = h.contiguous()
            sends.append((h, comm.isend(h, group=dims.pp_group, group_dst=dims.pp_rank + 1, tag=index, kind="pp_send")))
            outputs.append(None)
    for _, work in sends:
        work.wait()
    return outputs


def split_micro_batches(input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                        num_micro_batches: int) -> tuple[list[MicroBatch], torch.Tensor]:
    """Splits a batch's sequences into up to `num_micro_batches` contiguous groups of about equal token counts.
    Returns the micro-batches and `order`: torch.cat of their logits, indexed by `order`, gives the logits of
    batch.logits_indices in the batch's order."""
    if num_micro_batches < 1:
        raise ValueError(f"split_micro_batches: num_micro_batches must be >= 1, got {num_micro_batches}")
    num_seqs = len(batch.query_lens)
    groups = _balanced_groups(batch.query_lens, min(num_micro_batches, num_seqs))
    seq_starts = [0]
    for n in batch.query_lens:
        seq_starts.append(seq_starts[-1] + n)
    logits_rows = batch.logits_indices.cpu().tolist()
    micro_batches, placed = [], []  # placed[i] = (micro-batch, index among its logits) of logits row i
    for index, (first, stop) in enumerate(groups):
        row_start, row_stop = seq_starts[first], seq_starts[stop]
        mine = [(i, row - row_start) for i, row in enumerate(logits_rows) if row_start <= row < row_stop]
        placed += [(index, j, i) for j, (i, _) in enumerate(mine)]
        sub = AttentionBatch(
            query_lens=batch.query_lens[first:stop], context_lens=batch.context_lens[first:stop],
            block_tables=None if batch.block_tables is None else batch.block_tables[first:stop],
            logits_indices=torch.tensor([local for _, local in mine], dtype=torch.long,
                                        device=batch.logits_indices.device),
            seq_keys=None if batch.seq_keys is None else batch.seq_keys[first:stop])
        micro_batches.append(MicroBatch(input_ids[row_start:row_stop], positions[row_start:row_stop], sub))
    offsets = [0]
    for mb in micro_batches:
        offsets.append(offsets[-1] + mb.batch.logits_indices.numel())
    order = torch.empty(len(logits_rows), dtype=torch.long)
    for index, j, i in placed:
        order[i] = offsets[index] + j
    return micro_batches, order


def forward_micro_batched(model: CausalLM, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                          kv_cache: list[torch.Tensor] | None = None, *, num_micro_batches: int,
                          cp_mode: str = "auto", cp_store: RoundRobinKVStore | None = None) -> torch.Tensor | None:
    """`model(...)` with the batch's sequences pipelined as micro-batches (no layer hook: use run_pipeline with
    per-micro-batch hooks for that). Last stage: the logits in batch.logits_indices order; other stages: None."""
    micro_batches, order = split_micro_batches(input_ids, positions, batch, num_micro_batches)
    outputs = run_pipeline(model, micro_batches, kv_cache, cp_mode=cp_mode, cp_store=cp_store)
    if outputs[0] is None:
        return None
    return torch.cat(outputs)[order.to(outputs[0].device)]


def broadcast_logits(model: CausalLM, logits: torch.Tensor | None, num_rows: int) -> torch.Tensor:
    """Collective over the pp group: the last stage's logits [num_rows, vocab] on every stage (rank 0, which drives
    the replica, sits on the first stage). With pp == 1 returns `logits` as is."""
    dims = model.dims
    if dims.pp_size == 1:
        return logits
    if dims.is_last_stage:
        buffer = logits.contiguous()
    else:
        buffer = torch.empty((num_rows, model.config.vocab_size), dtype=torch.float32, device=model.device)
    # Counted with the stage hand-offs; the tier steps do not call this (they sample on the last stage).
    comm.broadcast(buffer, group=dims.pp_group, group_src=dims.pp_size - 1, kind="pp_send")
    return buffer


def _balanced_groups(lengths: list[int], num_groups: int) -> list[tuple[int, int]]:
    """Contiguous (first, stop) sequence ranges, each non-empty, cutting where the running token count crosses
    k * total / num_groups."""
    total = sum(lengths)
    cuts, running, group = [0], 0, 1
    for i, n in enumerate(lengths[:-1]):
        running += n
        remaining_seqs = len(lengths) - (i + 1)
        remaining_groups = num_groups - group
        if remaining_groups > 0 and (running >= group * total / num_groups or remaining_seqs == remaining_groups):
            cuts.append(i + 1)
            group += 1
    cuts.append(len(lengths))
    return list(zip(cuts[:-1], cuts[1:]))
