"""DecodeEngine: continuous batching of decode steps over a paged KV cache, for one decode replica rank.

Who calls it: the decode replica actor (decode_tier/replica.py). From its event loop thread it calls reserve()
(router asks for KV space), admit() (every layer of the prompt's KV has landed in the blocks), add_prompt() (local
prefill: the replica prefills the prompt itself, in chunks mixed into its decode steps), abort() (cancel,
deadline, lease expiry) and reads the counters; from one worker thread it calls step() in a loop while
has_work(). The transport writes each request's prompt KV straight into `kv_cache` at the block ids reserve()
returned.

One step is schedule() -> run() -> postprocess(). The lock guards the scheduler's state around schedule and
postprocess only, never around the forward, so reserve/admit/abort stay responsive while a step computes; a
sequence aborted mid-step keeps its blocks until that step's postprocess (the forward still writes its new K/V)
and its output is dropped.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence as SequenceOf
from typing import Protocol

import torch

from decode_tier.block_pool import OutOfBlocks
from decode_tier.scheduler import (
    DecodePlan,
    DecodeScheduler,
    FinishReason,
    SchedulerConfig,
    StepOutput,
)
from mesh import comm
from mesh.kv_cache import allocate_kv_cache
from mesh.model import AttentionBatch, CausalLM
from mesh.pipeline import forward_micro_batched
from mesh.sampling import SamplingParams, sample

__all__ = ["DecodeEngine", "FinishReason", "OutOfBlocks", "StepOutput", "StepPeers", "StepRunner",
           "default_max_step_tokens"]

# Tokens one engine step feeds when cluster.yaml leaves decode.max_step_tokens unset: large enough that a prompt
# chunk amortises the weight reads, small enough that a step with a chunk stays short next to a decode-only step.
CPU_MAX_STEP_TOKENS = 512
GPU_MAX_STEP_TOKENS = 2048


def default_max_step_tokens(device: torch.device | str, max_num_seqs: int) -> int:
    """The step token budget for a device type, at least 2 x max_num_seqs (decode rows go first)."""
    base = GPU_MAX_STEP_TOKENS if torch.device(device).type == "cuda" else CPU_MAX_STEP_TOKENS
    return max(base, 2 * max_num_seqs)


class StepPeers(Protocol):
    """The other ranks of a multi-rank decode replica, as rank 0's engine sees them (decode_tier/rank_worker.py).
    Called from the step thread, once each per step, in this order."""

    holds_logits: bool  # whether rank 0 itself samples (False with pipeline stages: the last stage does)

    def share_plan(self, plan: DecodePlan) -> None:
        """Hand the step to every other rank (they run the same forward on their shards)."""

    def share_tokens(self, sampled_token_ids: list[int] | None) -> list[int]:
        """The step's sampled tokens, from whichever rank holds the logits."""


class StepRunner:
    """Runs one `DecodePlan`'s forward on one rank's model shard and KV cache shard, and samples.

    Who calls it: the engine on rank 0, and every other rank of the replica with the plans rank 0 broadcasts
    (decode_tier/rank_worker.py), so all ranks run the same step in lockstep (their collectives pair up)."""

    def __init__(self, model: CausalLM, kv_cache: list[torch.Tensor], max_num_seqs: int) -> None:
        self.model = model
        self.kv_cache = kv_cache
        device = kv_cache[0].device
        # Step inputs live in fixed buffers; a step only fills a prefix of them.
        self._input_ids = torch.zeros(max_num_seqs, dtype=torch.long, device=device)
        self._positions = torch.zeros(max_num_seqs, dtype=torch.long, device=device)
        self._logits_indices = torch.arange(max_num_seqs, dtype=torch.long, device=device)
        self._query_lens = [1] * max_num_seqs
        # This rank's collective bytes per request over its steps (mesh/comm.py); the replica takes them at finish.
        self.comm_tally = comm.RequestTally()

    def run(self, plan: DecodePlan, *, sample_tokens: bool = True) -> list[int] | None:
        """The batched forward (the model writes each fed token's K/V into its block before attention reads it),
        then the sampling when `sample_tokens` and this rank holds the logits (None otherwise): one token per
        sequence of the plan, -1 where the plan samples nothing (a prompt chunk that does not end its prompt).
        Its collectives' bytes go to `comm_tally`, split over the plan's sequences by the rows each fed."""
        with comm.ledger_scope() as ledger:
            try:
                return self._run(plan, sample_tokens=sample_tokens)
            finally:
                self.comm_tally.add_step(plan.request_ids, plan.query_lens, ledger)

    @torch.inference_mode()
    def _run(self, plan: DecodePlan, *, sample_tokens: bool) -> list[int] | None:
        if not plan.is_decode_only:
            return self._run_mixed(plan, sample_tokens=sample_tokens)
        num_seqs = len(plan)
        input_ids = self._input_ids[:num_seqs]
        positions = self._positions[:num_seqs]
        input_ids.copy_(torch.tensor(plan.input_token_ids, dtype=torch.long), non_blocking=True)
        positions.copy_(torch.tensor(plan.positions, dtype=torch.long), non_blocking=True)
        batch = AttentionBatch(
            query_lens=self._query_lens[:num_seqs],
            context_lens=list(plan.context_lens),
            block_tables=[list(table) for table in plan.block_tables],
            logits_indices=self._logits_indices[:num_seqs],
        )
        if self.model.dims.pp_size > 1:
            # Micro-batches keep the pipeline stages busy; logits arrive on the last stage only.
            logits = forward_micro_batched(self.model, input_ids, positions, batch, self.kv_cache,
                                           num_micro_batches=min(self.model.dims.pp_size, num_seqs))
        else:
            logits = self.model(input_ids, positions, batch, self.kv_cache)
        if not sample_tokens or logits is None:
            return None
        return sample(logits, list(plan.params), list(plan.output_indices)).tolist()

    def _run_mixed(self, plan: DecodePlan, *, sample_tokens: bool) -> list[int] | None:
        """A step with prompt chunks (local prefill): one packed forward over decode rows and chunks alike; each
        sequence's last fed token gives logits, and only the rows the plan samples are sampled."""
        device = self.kv_cache[0].device
        input_ids = torch.tensor(plan.input_token_ids, dtype=torch.long, device=device)
        positions = torch.tensor(plan.positions, dtype=torch.long, device=device)
        batch = AttentionBatch(
            query_lens=list(plan.query_lens),
            context_lens=list(plan.context_lens),
            block_tables=[list(table) for table in plan.block_tables],
            # Every sequence's last row (not only the sampled ones): no micro-batch is left without logits.
            logits_indices=AttentionBatch.last_token_indices(list(plan.query_lens), device),
        )
        if self.model.dims.pp_size > 1:
            logits = forward_micro_batched(self.model, input_ids, positions, batch, self.kv_cache,
                                           num_micro_batches=min(self.model.dims.pp_size, len(plan)))
        else:
            logits = self.model(input_ids, positions, batch, self.kv_cache)
        if not sample_tokens or logits is None:
            return None
        return sample_rows(logits, plan)


def sample_rows(logits: torch.Tensor, plan: DecodePlan) -> list[int]:
    """Sample the rows of `logits` (one per sequence of `plan`, in order) that the plan samples; -1 elsewhere."""
    rows = [i for i, is_sampled in enumerate(plan.is_sampled) if is_sampled]
    tokens = [-1] * len(plan)
    if rows:
        picked = logits[torch.tensor(rows, device=logits.device)]
        sampled = sample(picked, [plan.params[i] for i in rows], [plan.output_indices[i] for i in rows]).tolist()
        for i, token in zip(rows, sampled):
            tokens[i] = token
    return tokens


class DecodeEngine:
    """Owns one rank's KV cache (allocated once), the block pool and the running batch.

    Memory: reserve() takes ceil((prompt + max_tokens) / block_size) blocks up front (capped at the model's
    context), so a running sequence never runs out of room and nothing is ever preempted; the cost is that blocks
    for tokens an early stop never produces sit idle, so fewer sequences fit than with on-demand growth.
    Batching: FCFS by admission; a step runs the oldest max_num_seqs running sequences and the rest wait.
    """

    def __init__(self, model: CausalLM, *, num_blocks: int, block_size: int, max_num_seqs: int,
                 peers: StepPeers | None = None, max_step_tokens: int | None = None) -> None:
        """peers: the other ranks of a multi-rank replica (None: this rank is the whole replica). max_step_tokens:
        tokens fed per step, decode rows first and prompt chunks of local prefills in the rest (None:
        default_max_step_tokens for the model's device)."""
        self.model = model
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        if max_step_tokens is None:
            max_step_tokens = default_max_step_tokens(model.device, max_num_seqs)
        self.max_step_tokens = max_step_tokens
        self.scheduler = DecodeScheduler(
            SchedulerConfig(
                num_blocks=num_blocks,
                block_size=block_size,
                max_num_seqs=max_num_seqs,
                max_model_len=model.config.max_position_embeddings,
                eos_token_ids=tuple(model.config.eos_token_ids),
                max_step_tokens=max_step_tokens,
            )
        )
        # One tensor per layer: [num_blocks, 2, block_size, num_kv_heads_local, head_dim].
        self.kv_cache: list[torch.Tensor] = allocate_kv_cache(model, num_blocks=num_blocks, block_size=block_size)
        self.device = self.kv_cache[0].device
        if peers is None and self.device.type == "cuda" and model.dims.world_size == 1 and not model.config.is_moe:
            # One GPU: fused weights, Triton paged-attention decode, one CUDA graph per batch-size bucket; steps with
            # prompt chunks (local prefill) add GpuDecoder.prefill's varlen FlashAttention for the chunks.
            from decode_tier.gpu_chunked_runner import GpuChunkedStepRunner
            from mesh.gpu_step_runner import GpuStepRunner

            self.runner = GpuChunkedStepRunner(GpuStepRunner(model, self.kv_cache, max_num_seqs,
                                                             max_model_len=model.config.max_position_embeddings),
                                               self.kv_cache)
        else:
            self.runner = StepRunner(model, self.kv_cache, max_num_seqs)
        self._peers = peers
        self._lock = threading.Lock()
        self._step_lock = threading.Lock()  # one step at a time, whoever calls it

    # ----- event loop side: router and transport -----

    def reserve(self, request_id: str, num_prompt_tokens: int, params: SamplingParams) -> list[int]:
        """Take the blocks for the prompt plus max_tokens; returns the block table the prompt KV must be written
        into (token p -> block table[p // block_size], row p % block_size). The request is WAITING_KV until
        admit(). Raises OutOfBlocks (nothing taken; the message gives requested vs free) or ValueError (request_id
        already held, prompt longer than the model's context, max_tokens < 1)."""
        with self._lock:
            return self.scheduler.reserve(request_id, num_prompt_tokens, params)

    def admit(self, request_id: str, prompt_token_ids: SequenceOf[int], first_token: int) -> StepOutput | None:
        """Every layer of the prompt's KV is in the reserved blocks; the request joins the running batch and its
        next step feeds first_token (the prefill tier's sample, output index 0) at position len(prompt).

        Returns None normally. If first_token already finishes the request (stop or eos token, max_tokens == 1,
        context full), the request never joins: its blocks are freed and a StepOutput(request_id, first_token,
        finish_reason) is returned for the caller's final message (first_token itself was streamed by the
        prefill path already). KeyError if the request is not held (aborted, expired), ValueError if admitted
        twice or the prompt length differs from the reservation."""
        with self._lock:
            return self.scheduler.admit(request_id, prompt_token_ids, first_token)

    def add_prompt(self, request_id: str, prompt_token_ids: SequenceOf[int], params: SamplingParams) -> list[int]:
        """Local prefill: take the blocks (as reserve() does) and queue the prompt; the next steps feed it in chunks
        within the step token budget, and the step feeding its last chunk samples its first token (output index 0,
        params.output_offset honoured), which step() returns as a StepOutput like any other token (finishing it at
        once if that token ends the request). Raises as reserve() does."""
        with self._lock:
            return self.scheduler.add_prompt(request_id, prompt_token_ids, params)

    def abort(self, request_id: str) -> bool:
        """Free the request's blocks whatever its state; False if it is not held (idempotent). Safe while a step
        runs: a sequence inside that step has its output dropped and its blocks freed when the step ends."""
        with self._lock:
            return self.scheduler.abort(request_id)

    def has_work(self) -> bool:
        with self._lock:
            return self.scheduler.has_work()

    @property
    def num_free_blocks(self) -> int:
        with self._lock:
            return self.scheduler.num_free_blocks

    @property
    def num_total_blocks(self) -> int:
        return self.scheduler.pool.num_total

    @property
    def num_running(self) -> int:
        with self._lock:
            return self.scheduler.num_running

    @property
    def num_waiting_kv(self) -> int:
        with self._lock:
            return self.scheduler.num_waiting_kv

    @property
    def num_prefilling(self) -> int:
        with self._lock:
            return self.scheduler.num_prefilling

    @property
    def num_queued_prompt_tokens(self) -> int:
        with self._lock:
            return self.scheduler.num_queued_prompt_tokens

    def request_ids(self) -> list[str]:
        with self._lock:
            return self.scheduler.request_ids()

    # ----- worker thread side: the step -----

    def step(self) -> list[StepOutput]:
        """One step: a decode token for up to max_num_seqs running sequences, and prompt chunks of local prefills
        in the rest of the token budget; one StepOutput per sampled sequence not aborted meanwhile (a chunk that
        does not end its prompt yields none; [] when nothing runs). Finished sequences have freed their blocks."""
        with self._step_lock:
            plan = self.schedule()
            if plan is None:
                return []
            try:
                sampled_token_ids = self.run(plan)
            except BaseException:
                with self._lock:
                    self.scheduler.cancel_step(plan)
                raise
            return self.postprocess(plan, sampled_token_ids)

    def schedule(self) -> DecodePlan | None:
        with self._lock:
            return self.scheduler.schedule()

    def run(self, plan: DecodePlan) -> list[int]:
        """The batched forward (the model writes each fed token's K/V into its block) and the sampling. Reads only the plan and the cache, so it runs without the lock. On a multi-rank
        replica the plan goes to the other ranks first (they run the same forward on their shards) and the
        sampled tokens come from the rank that holds the logits."""
        if self._peers is None:
            return self.runner.run(plan)
        self._peers.share_plan(plan)
        try:
            sampled = self.runner.run(plan, sample_tokens=self._peers.holds_logits)
        except BaseException:
            try:  # still take part, so the channel stays in step; then fail the step with the forward's error
                self._peers.share_tokens(None)
            except Exception:
                pass
            raise
        return self._peers.share_tokens(sampled)

    def postprocess(self, plan: DecodePlan, sampled_token_ids: SequenceOf[int]) -> list[StepOutput]:
        with self._lock:
            return self.scheduler.postprocess(plan, sampled_token_ids)
