"""Local prefill on the one-GPU decode fast path: runs `DecodePlan`s that mix decode rows with prompt chunks.

Who calls it: DecodeEngine (decode_tier/engine.py) on a one-rank CUDA replica, once per step, in place of the
plain `mesh.gpu_step_runner.GpuStepRunner` it wraps. A plain decode plan goes straight to the wrapped runner (CUDA
graph per batch bucket). A mixed plan is split in two forwards over disjoint sequences (they write different
blocks, so the order does not matter):
  - its decode rows (one fed token, sampled): the wrapped runner's graph step, as in any other step;
  - its prompt chunks: `GpuDecoder.prefill`, fresh prompts (nothing cached yet) in one varlen FlashAttention call,
    continuing chunks (an earlier chunk of the prompt is in the cache) in another, attending to their cached blocks.
What it promises: the tokens decode_tier.engine.StepRunner returns for the same plan (up to bf16 rounding on GPU):
one per sequence, -1 where the plan samples nothing; seeded rows go through mesh.sampling.sample, so the first
token of a locally prefilled request is the same draw the prefill tier would make.
"""

from __future__ import annotations

from typing import Any

import torch

from decode_tier.engine import sample_rows
from decode_tier.scheduler import DecodePlan


class GpuChunkedStepRunner:
    def __init__(self, runner: Any, kv_cache: list[torch.Tensor]) -> None:
        """runner: a mesh.gpu_step_runner.GpuStepRunner over the same `kv_cache`."""
        self.runner = runner
        self.decoder = runner.decoder
        self.kv_cache = kv_cache

    @torch.inference_mode()
    def run(self, plan: DecodePlan, *, sample_tokens: bool = True) -> list[int] | None:
        if plan.is_decode_only:
            return self.runner.run(plan, sample_tokens=sample_tokens)
        decode_rows = [i for i in range(len(plan)) if plan.query_lens[i] == 1 and plan.is_sampled[i]
                       and plan.context_lens[i] > 0]
        is_decode = set(decode_rows)
        chunk_rows = [i for i in range(len(plan)) if i not in is_decode]
        fresh_rows = [i for i in chunk_rows if plan.context_lens[i] == 0]
        continuing_rows = [i for i in chunk_rows if plan.context_lens[i] > 0]
        tokens = [-1] * len(plan)
        for rows, forward in ((decode_rows, self._decode), (fresh_rows, self._prefill),
                              (continuing_rows, self._prefill)):
            if not rows:
                continue
            part = sub_plan(plan, rows)
            part_tokens = forward(part, sample_tokens)
            if part_tokens is not None:
                for i, token in zip(rows, part_tokens):
                    tokens[i] = token
        return tokens if sample_tokens else None

    def _decode(self, plan: DecodePlan, sample_tokens: bool) -> list[int] | None:
        return self.runner.run(plan, sample_tokens=sample_tokens)

    def _prefill(self, plan: DecodePlan, sample_tokens: bool) -> list[int] | None:
        device = self.decoder.device
        logits = self.decoder.prefill(
            torch.tensor(plan.input_token_ids, dtype=torch.long, device=device),
            torch.tensor(plan.positions, dtype=torch.long, device=device),
            list(plan.query_lens), list(plan.context_lens), [list(t) for t in plan.block_tables], self.kv_cache)
        return sample_rows(logits, plan) if sample_tokens else None


def sub_plan(plan: DecodePlan, rows: list[int]) -> DecodePlan:
    """The plan restricted to sequences `rows` (in that order), with their packed tokens and positions."""
    starts = [0]
    for n in plan.query_lens:
        starts.append(starts[-1] + n)
    token_ids, positions = [], []
    for i in rows:
        token_ids.extend(plan.input_token_ids[starts[i]:starts[i + 1]])
        positions.extend(plan.positions[starts[i]:starts[i + 1]])

    def pick(values: tuple) -> tuple:
        return tuple(values[i] for i in rows)

    return DecodePlan(request_ids=pick(plan.request_ids), input_token_ids=tuple(token_ids),
                      positions=tuple(positions), context_lens=pick(plan.context_lens),
                      block_tables=pick(plan.block_tables), params=pick(plan.params),
                      output_indices=pick(plan.output_indices), query_lens=pick(plan.query_lens),
                      is_sampled=pick(plan.is_sampled))
