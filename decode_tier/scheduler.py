"""Decode scheduling: which sequences step next, and what a finished step means for each of them.

Pure Python, no torch: DecodeEngine (engine.py) owns one DecodeScheduler and calls it under its lock; the
scheduler itself is not thread-safe. One engine step is
    plan = scheduler.schedule()            # pick sequences, describe the forward as plain data
    tokens = <forward + sample on plan>    # engine.run, no lock held
    outputs = scheduler.postprocess(plan, tokens)
A DecodePlan is plain picklable data, so rank 0 of a multi-rank replica can broadcast it to the other ranks.

Sequence life, two ways in:
  disaggregated: reserve() -> WAITING_KV (blocks held, KV being written by the transport) -> admit() -> RUNNING
  local prefill: add_prompt() -> PREFILLING (blocks held; engine steps feed the prompt in chunks) -> RUNNING once
                 the last chunk's logits gave the first token
and then finished or aborted (blocks freed, sequence forgotten).

Chunked prefill (the colocated systems' default): every step has a budget of max_step_tokens fed tokens. Running
sequences' decode tokens go first (one each, up to max_num_seqs); what is left of the budget takes the next chunk of
the oldest PREFILLING prompts, FCFS. A long prompt thus spreads over several steps while the running streams keep
getting one token per step, instead of stalling them for a whole prompt's forward.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING

from decode_tier.block_pool import BlockPool

if TYPE_CHECKING:  # the scheduler only reads max_tokens, stop_token_ids and ignore_eos
    from mesh.sampling import SamplingParams


class FinishReason(enum.StrEnum):
    STOP = "stop"  # a stop token or eos was sampled (it is reported as the last token)
    LENGTH = "length"  # max_tokens reached, or no room for another token in the context


class SequenceStatus(enum.Enum):
    WAITING_KV = "waiting_kv"
    PREFILLING = "prefilling"  # prompt held here; its chunks are fed by engine steps (local prefill)
    RUNNING = "running"


@dataclass(frozen=True, slots=True)
class StepOutput:
    """One token produced for one request; finish_reason is None while the request goes on."""

    request_id: str
    token_id: int
    finish_reason: FinishReason | None


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    num_blocks: int
    block_size: int
    max_num_seqs: int  # sequences in one decode forward
    max_model_len: int  # positions the model supports (max_position_embeddings)
    eos_token_ids: tuple[int, ...] = ()
    # Tokens fed to one forward: decode tokens first, prompt chunks take the rest (cluster.yaml
    # decode.max_step_tokens). Larger than max_num_seqs, so a step full of decodes still leaves room for a chunk.
    max_step_tokens: int = 512

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "max_num_seqs", "max_model_len", "max_step_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.max_step_tokens <= self.max_num_seqs:
            raise ValueError(f"max_step_tokens ({self.max_step_tokens}) must be larger than max_num_seqs "
                             f"({self.max_num_seqs}): decode tokens go first, so a smaller budget could leave no "
                             "room for any prompt chunk")
        if not isinstance(self.eos_token_ids, tuple):
            raise ValueError(f"eos_token_ids must be a tuple of ints, got {self.eos_token_ids!r}")


@dataclass(frozen=True, kw_only=True)
class DecodePlan:
    """One engine forward over a packed batch. Sequence i feeds query_lens[i] tokens (1 for a decode, more for a
    prompt chunk) against context_lens[i] tokens already cached in block_tables[i]; input_token_ids and positions
    are packed, one entry per fed token, sequence after sequence. Where is_sampled[i], the logits of sequence i's
    last fed token are sampled with params[i] at output_indices[i] (a chunk that does not end its prompt samples
    nothing). query_lens and is_sampled default to all 1 / all True: a plain decode step, the only kind the
    disaggregated path makes."""

    request_ids: tuple[str, ...]
    input_token_ids: tuple[int, ...]
    positions: tuple[int, ...]
    context_lens: tuple[int, ...]
    block_tables: tuple[tuple[int, ...], ...]
    params: tuple["SamplingParams", ...]
    output_indices: tuple[int, ...]
    query_lens: tuple[int, ...] = ()
    is_sampled: tuple[bool, ...] = ()

    def __post_init__(self) -> None:
        num_seqs = len(self.request_ids)
        if not self.query_lens:
            object.__setattr__(self, "query_lens", (1,) * num_seqs)
        if not self.is_sampled:
            object.__setattr__(self, "is_sampled", (True,) * num_seqs)
        if len(self.query_lens) != num_seqs or len(self.is_sampled) != num_seqs:
            raise ValueError(f"DecodePlan: {num_seqs} sequences but {len(self.query_lens)} query_lens and "
                             f"{len(self.is_sampled)} is_sampled")
        if len(self.input_token_ids) != sum(self.query_lens) or len(self.positions) != len(self.input_token_ids):
            raise ValueError(f"DecodePlan: query_lens sum to {sum(self.query_lens)} but there are "
                             f"{len(self.input_token_ids)} input tokens and {len(self.positions)} positions")

    def __len__(self) -> int:
        return len(self.request_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.input_token_ids)

    @property
    def is_decode_only(self) -> bool:
        """Every sequence feeds one token and samples: the shape the CUDA-graph decode path runs."""
        return all(n == 1 for n in self.query_lens) and all(self.is_sampled)


@dataclass(kw_only=True, eq=False)
class _Sequence:
    request_id: str
    params: "SamplingParams"
    block_ids: list[int]
    num_prompt_tokens: int
    status: SequenceStatus = SequenceStatus.WAITING_KV
    # Local prefill only: the prompt the engine feeds chunk by chunk (None when the KV arrives by transfer).
    prompt_token_ids: tuple[int, ...] | None = None
    # Tokens whose K/V are in the cache; the next fed token goes at this position.
    num_cached_tokens: int = 0
    # Tokens generated so far, the prefill's first token included; also the next output_index.
    num_output_tokens: int = 0
    last_token_id: int = -1
    is_in_step: bool = False
    is_aborted: bool = False
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)


class DecodeScheduler:
    """Owns the block pool and every sequence of one decode replica.

    Memory policy: reserve() takes every block the request can ever need (prompt + max_tokens, capped at the
    model's context) up front. That is simple and means a running sequence is never preempted or swapped, at the
    price of holding blocks for tokens that an early stop never produces: fewer sequences fit than with on-demand
    growth. The router sees the cost directly as num_free_blocks.

    Batch policy: FCFS by admission. Each step runs the oldest max_num_seqs running sequences; later ones wait
    (their KV stays put) until earlier ones finish. Prompts held for local prefill fill the rest of the step's token
    budget, oldest first (see the module docstring).
    """

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.block_size = config.block_size
        self.pool = BlockPool(config.num_blocks)
        self._eos_token_ids = frozenset(config.eos_token_ids)
        self._sequences: dict[str, _Sequence] = {}
        # RUNNING sequences in admission order (dict: ordered, O(1) removal).
        self._running: dict[str, _Sequence] = {}
        # PREFILLING sequences in arrival order: prompt chunks are taken FCFS.
        self._prefilling: dict[str, _Sequence] = {}
        self._in_step: list[_Sequence] | None = None

    # ----- called by the engine on behalf of the router / transport -----

    def num_blocks_for(self, num_prompt_tokens: int, max_tokens: int) -> int:
        """Blocks reserve() takes: room for prompt + max_tokens, capped at the model's context length."""
        num_slots = min(num_prompt_tokens + max_tokens, self.config.max_model_len)
        return math.ceil(num_slots / self.block_size)

    def add_prompt(self, request_id: str, prompt_token_ids: SequenceOf[int], params: "SamplingParams") -> list[int]:
        """Local prefill: take the request's blocks (as reserve() does) and queue its prompt; the following steps
        feed it in chunks, and the step that feeds its last chunk samples its first token (output index 0), which
        comes out of postprocess() like any other token. Raises as reserve() does."""
        block_ids = self.reserve(request_id, len(prompt_token_ids), params)
        sequence = self._sequences[request_id]
        sequence.prompt_token_ids = tuple(int(t) for t in prompt_token_ids)
        sequence.status = SequenceStatus.PREFILLING
        self._prefilling[request_id] = sequence
        return block_ids

    def reserve(self, request_id: str, num_prompt_tokens: int, params: "SamplingParams") -> list[int]:
        """Take the request's blocks and record it as WAITING_KV; returns the block table the KV goes into.

        Raises OutOfBlocks (pool unchanged) when they do not fit, ValueError for a known request_id or a prompt
        that does not fit the model's context.
        """
        if request_id in self._sequences:
            raise ValueError(f"request {request_id!r} already has a reservation on this decode replica")
        if isinstance(num_prompt_tokens, bool) or not isinstance(num_prompt_tokens, int) or num_prompt_tokens < 1:
            raise ValueError(f"request {request_id!r}: num_prompt_tokens must be a positive int, got {num_prompt_tokens!r}")
        if num_prompt_tokens > self.config.max_model_len:
            raise ValueError(
                f"request {request_id!r}: prompt of {num_prompt_tokens} tokens exceeds the model's context of "
                f"{self.config.max_model_len}"
            )
        if params.max_tokens < 1:
            raise ValueError(f"request {request_id!r}: max_tokens must be >= 1, got {params.max_tokens}")
        block_ids = self.pool.allocate(self.num_blocks_for(num_prompt_tokens, params.max_tokens))
        self._sequences[request_id] = _Sequence(
            request_id=request_id,
            params=params,
            block_ids=block_ids,
            num_prompt_tokens=num_prompt_tokens,
            stop_token_ids=frozenset(params.stop_token_ids),
        )
        return list(block_ids)

    def admit(self, request_id: str, prompt_token_ids: SequenceOf[int], first_token: int) -> StepOutput | None:
        """The prompt's KV has landed in the reserved blocks; the sequence joins the running batch and its next
        step feeds first_token at position len(prompt).

        first_token (sampled by the prefill tier, output index 0) counts as one generated token. If it already
        finishes the request (stop/eos token, max_tokens == 1, no room left in the context), nothing joins the
        batch: the blocks are freed and a finishing StepOutput carrying first_token is returned, which the caller
        turns into the final message (it has streamed the token itself already). Otherwise returns None.
        Raises KeyError for an unknown (or aborted) request, ValueError if it is not WAITING_KV or the prompt
        length differs from the reservation.
        """
        sequence = self._sequences.get(request_id)
        if sequence is None:
            raise KeyError(f"request {request_id!r} has no reservation on this decode replica (aborted or expired?)")
        if sequence.status is not SequenceStatus.WAITING_KV:
            raise ValueError(f"request {request_id!r} was already admitted")
        if len(prompt_token_ids) != sequence.num_prompt_tokens:
            raise ValueError(
                f"request {request_id!r}: admitted with {len(prompt_token_ids)} prompt tokens but reserved for "
                f"{sequence.num_prompt_tokens}"
            )
        sequence.num_cached_tokens = sequence.num_prompt_tokens
        sequence.num_output_tokens = 1
        sequence.last_token_id = int(first_token)
        finish_reason = self._finish_reason(sequence)
        if finish_reason is not None:
            self._forget(sequence)
            return StepOutput(request_id, sequence.last_token_id, finish_reason)
        sequence.status = SequenceStatus.RUNNING
        self._running[request_id] = sequence
        return None

    def abort(self, request_id: str) -> bool:
        """Forget the request and free its blocks, whatever its state. Returns False if it is unknown (never
        reserved, finished, or aborted before), so repeating it is harmless. A sequence inside the step now
        running keeps its blocks until that step's postprocess (the forward is still writing into them), and its
        output from that step is dropped."""
        sequence = self._sequences.get(request_id)
        if sequence is None:
            return False
        if sequence.is_in_step:
            sequence.is_aborted = True
            del self._sequences[request_id]
            self._running.pop(request_id, None)
            self._prefilling.pop(request_id, None)
        else:
            self._forget(sequence)
        return True

    # ----- the engine step -----

    def schedule(self) -> DecodePlan | None:
        """Pick the step: up to max_num_seqs running sequences (oldest admitted first), one decode token each; then,
        in the token budget they leave (max_step_tokens) and the sequence slots they leave (max_num_seqs), the next
        chunk of each PREFILLING prompt in arrival order (the last one taken may get a partial chunk). None when
        nothing runs. The caller must hand the plan back to postprocess() or cancel_step() before scheduling again."""
        if self._in_step is not None:
            raise RuntimeError("schedule() called while the previous step has not been postprocessed")
        config = self.config
        decodes = list(islice(self._running.values(), config.max_num_seqs))
        num_free_tokens = config.max_step_tokens - len(decodes)
        num_free_seqs = config.max_num_seqs - len(decodes)
        chunks: list[tuple[_Sequence, int]] = []
        for sequence in self._prefilling.values():
            if num_free_tokens <= 0 or num_free_seqs <= 0:
                break
            chunk_size = min(sequence.num_prompt_tokens - sequence.num_cached_tokens, num_free_tokens)
            chunks.append((sequence, chunk_size))
            num_free_tokens -= chunk_size
            num_free_seqs -= 1
        if not decodes and not chunks:
            return None
        batch = decodes + [sequence for sequence, _ in chunks]
        for sequence in batch:
            sequence.is_in_step = True
        self._in_step = batch
        block_size = self.block_size
        input_token_ids = [s.last_token_id for s in decodes]
        positions = [s.num_cached_tokens for s in decodes]
        # Only the blocks holding the context and the new tokens: shorter tables, less padding in attention.
        block_tables = [tuple(s.block_ids[: s.num_cached_tokens // block_size + 1]) for s in decodes]
        for sequence, chunk_size in chunks:
            start, stop = sequence.num_cached_tokens, sequence.num_cached_tokens + chunk_size
            input_token_ids.extend(sequence.prompt_token_ids[start:stop])
            positions.extend(range(start, stop))
            block_tables.append(tuple(sequence.block_ids[: math.ceil(stop / block_size)]))
        return DecodePlan(
            request_ids=tuple(s.request_id for s in batch),
            input_token_ids=tuple(input_token_ids),
            positions=tuple(positions),
            context_lens=tuple(s.num_cached_tokens for s in batch),
            block_tables=tuple(block_tables),
            params=tuple(s.params for s in batch),
            output_indices=tuple(s.num_output_tokens for s in batch),
            query_lens=(1,) * len(decodes) + tuple(n for _, n in chunks),
            # A chunk samples only when it ends its prompt: that token is the request's first (output index 0).
            is_sampled=(True,) * len(decodes) + tuple(s.num_cached_tokens + n == s.num_prompt_tokens
                                                        for s, n in chunks),
        )

    def postprocess(self, plan: DecodePlan, sampled_token_ids: SequenceOf[int]) -> list[StepOutput]:
        """Record each sequence's new token, finish the ones that are done (freeing their blocks), and return one
        StepOutput per sampled sequence that was not aborted during the step. `sampled_token_ids` has one entry per
        scheduled sequence (any value where the plan samples nothing: a chunk in the middle of its prompt). A prompt
        whose last chunk ran yields its first token and joins the running batch (unless that token finishes it)."""
        if len(sampled_token_ids) != len(plan):
            raise ValueError(f"step sampled {len(sampled_token_ids)} tokens for {len(plan)} sequences")
        batch = self._take_step(plan)
        outputs: list[StepOutput] = []
        for sequence, token_id, query_len, is_sampled in zip(batch, sampled_token_ids, plan.query_lens,
                                                             plan.is_sampled):
            if sequence.is_aborted:
                self.pool.free(sequence.block_ids)
                continue
            if sequence.status is SequenceStatus.PREFILLING:
                sequence.num_cached_tokens += query_len
                if not is_sampled:
                    continue  # more of the prompt to feed in later steps
                del self._prefilling[sequence.request_id]
            else:
                sequence.num_cached_tokens += 1
            sequence.num_output_tokens += 1
            sequence.last_token_id = int(token_id)
            finish_reason = self._finish_reason(sequence)
            if finish_reason is not None:
                self._forget(sequence)
            elif sequence.status is SequenceStatus.PREFILLING:
                sequence.status = SequenceStatus.RUNNING
                self._running[sequence.request_id] = sequence
            outputs.append(StepOutput(sequence.request_id, sequence.last_token_id, finish_reason))
        return outputs

    def cancel_step(self, plan: DecodePlan) -> None:
        """The forward failed: leave every sequence as it was before schedule() (the half-written K/V slot is
        overwritten by the retry) and free the ones aborted meanwhile."""
        for sequence in self._take_step(plan):
            if sequence.is_aborted:
                self.pool.free(sequence.block_ids)

    # ----- state for the router and the actor -----

    def has_work(self) -> bool:
        return bool(self._running) or bool(self._prefilling)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_prefilling(self) -> int:
        """Prompts held for local prefill whose last chunk has not run yet."""
        return len(self._prefilling)

    @property
    def num_queued_prompt_tokens(self) -> int:
        """Prompt tokens of local prefills still to be fed (a load signal for the router)."""
        return sum(s.num_prompt_tokens - s.num_cached_tokens for s in self._prefilling.values())

    @property
    def num_waiting_kv(self) -> int:
        return len(self._sequences) - len(self._running) - len(self._prefilling)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def request_ids(self) -> list[str]:
        """Every request this replica holds (waiting for KV or running), in reservation order."""
        return list(self._sequences)

    # ----- internals -----

    def _take_step(self, plan: DecodePlan) -> list[_Sequence]:
        batch = self._in_step
        if batch is None or tuple(s.request_id for s in batch) != plan.request_ids:
            raise RuntimeError("this plan is not the step in flight")
        self._in_step = None
        for sequence in batch:
            sequence.is_in_step = False
        return batch

    def _finish_reason(self, sequence: _Sequence) -> FinishReason | None:
        """Called once last_token_id is the newest token and num_cached_tokens excludes it."""
        token_id = sequence.last_token_id
        if token_id in sequence.stop_token_ids:
            return FinishReason.STOP
        if not sequence.params.ignore_eos and token_id in self._eos_token_ids:
            return FinishReason.STOP
        if sequence.num_output_tokens >= sequence.params.max_tokens:
            return FinishReason.LENGTH
        # Feeding last_token_id needs a slot at position num_cached_tokens.
        num_slots = min(len(sequence.block_ids) * self.block_size, self.config.max_model_len)
        if sequence.num_cached_tokens >= num_slots:
            return FinishReason.LENGTH
        return None

    def _forget(self, sequence: _Sequence) -> None:
        del self._sequences[sequence.request_id]
        self._running.pop(sequence.request_id, None)
        self._prefilling.pop(sequence.request_id, None)
        self.pool.free(sequence.block_ids)
