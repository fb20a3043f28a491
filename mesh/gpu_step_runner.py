"""The decode engine's entry point to the GPU fast path: a drop-in for decode_tier.engine.StepRunner on a
one-rank replica (tp = pp = cp = 1, dense model) whose model and KV cache are on a CUDA device.

Who calls it: the decode engine, once per step, from its step thread:
    runner = GpuStepRunner(model, kv_cache, max_num_seqs)      # fuses weights, captures the CUDA graphs
    tokens = runner.run(plan)                                   # list[int], one per sequence of the plan
`plan` is any object with the fields of decode_tier.scheduler.DecodePlan (request_ids, input_token_ids,
positions, context_lens, block_tables, params, output_indices); mesh does not import decode_tier.

What it promises: the tokens StepRunner would return for the same plan, up to bf16 rounding (greedy rows are the
argmax of the same logits; other rows go through mesh.sampling.sample on the GPU logits, so seeded draws stay
device independent). The model's q/k/v and gate/up parameters become views of the fused weights (held once); the
model itself still computes the reference path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mesh.gpu_decoder import GpuDecoder
from mesh.gpu_graphs import DEFAULT_BUCKETS, DecodeGraphs
from mesh.sampling import sample


class GpuStepRunner:
    def __init__(self, model: Any, kv_cache: Sequence[torch.Tensor], max_num_seqs: int, *,
                 buckets: Sequence[int] = DEFAULT_BUCKETS, use_graphs: bool | None = None,
                 max_model_len: int | None = None, fused: bool | None = None, pdl: bool | None = None) -> None:
        """fused / pdl: mesh.gpu_graphs.DecodeGraphs' switches (None: each bucket keeps the variant measured
        fastest at capture; the tuning and the extra captures add seconds to start-up, False skips them)."""
        self.decoder = GpuDecoder.from_model(model)
        self.graphs = DecodeGraphs(self.decoder, kv_cache, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                   buckets=buckets, use_graphs=use_graphs, fused=fused, pdl=pdl)
        self.graphs.capture()

    @torch.inference_mode()
    def run(self, plan: Any, *, sample_tokens: bool = True) -> list[int] | None:
        """One decode step of `plan` (query length 1 per sequence; the new K/V land in their blocks); the sampled
        token of each sequence, or None when `sample_tokens` is False."""
        logits, greedy = self.graphs.step(plan.request_ids, plan.input_token_ids, plan.positions, plan.block_tables)
        if not sample_tokens:
            return None
        if all(params.is_greedy for params in plan.params):
            return greedy.tolist()
        return sample(logits, list(plan.params), list(plan.output_indices)).tolist()
