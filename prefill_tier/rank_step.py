"""One prefill step on one rank of a prefill replica: the forward of its model shard, its own KV shard pushed to the
decode ranks that need it while later layers compute, and (on the rank holding the logits) the first tokens.

Who calls it: every rank of a prefill replica runs the same `PrefillStep` at the same time (their collectives pair
up): rank 0 (prefill_tier/replica.py) builds it from its batch and broadcasts it; the other ranks
(prefill_tier/rank_worker.py) receive it. Each rank returns a `RankOutcome`; rank 0 gathers them and answers the
requests. `PrefillRankCore.run` runs on the rank's compute thread; KV sends go through the rank's event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import dataclass, field

import torch

from kv_transfer.mesh_layout import PrefillLayout
from kv_transfer.mesh_session import MeshReservation, RankKVSender
from mesh import comm
from mesh.model import AttentionBatch, CausalLM
from mesh.pipeline import run_pipeline, split_micro_batches
from mesh.sampling import SamplingParams, sample
from prefill_tier.prefix_cache import PrefixStepPlan
from prefill_tier.prefix_store import PrefixKVStore

log = logging.getLogger("pdcluster.prefill")

FINISH_TIMEOUT_S = 60.0  # a rank's KV sends of one step must complete within this


def finish_timeout_s(info) -> float:
    """How long a rank waits for one request's KV sends: never past the decode side's lease (by then the decode
    replica freed the reservation, so a peer that vanished without closing its connection holds nobody longer)."""
    lease_s = getattr(info, "lease_s", None)  # stand-ins of a reservation (tests) may have no lease at all
    return min(FINISH_TIMEOUT_S, lease_s) if lease_s else FINISH_TIMEOUT_S
EVENT_POLL_S = 0.0001  # how often the loop checks whether a layer's K/V kernels are done (GPU)


@dataclass(frozen=True, kw_only=True)
class PrefillStep:
    """One batch, as rank 0 broadcasts it (picklable). `reservations[i]` is None when request i ships no KV."""

    request_ids: tuple[str, ...]
    prompts: tuple[tuple[int, ...], ...]
    params: tuple[SamplingParams, ...]
    reservations: tuple[MeshReservation | None, ...]
    # The prefix cache's decisions for this step (prefill_tier/prefix_cache.py); None: the replica has no cache.
    prefix: PrefixStepPlan | None = None

    def __post_init__(self) -> None:
        if not (len(self.request_ids) == len(self.prompts) == len(self.params) == len(self.reservations)):
            raise ValueError("PrefillStep: request_ids, prompts, params and reservations differ in length")
        if not self.request_ids or any(len(p) == 0 for p in self.prompts):
            raise ValueError("PrefillStep: needs at least one request, each with at least one prompt token")
        if self.prefix is not None:
            if len(self.prefix.store_keys) != len(self.prompts):
                raise ValueError("PrefillStep: the prefix plan does not have one entry per request")
            if any(c >= len(p) for c, p in zip(self.prefix.num_cached_tokens, self.prompts)):
                raise ValueError("PrefillStep: a request's cached prefix must leave at least one token to compute")

    def num_cached(self, index: int) -> int:
        """Prompt tokens of request `index` that come from the prefix cache (not computed in this step)."""
        return 0 if self.prefix is None else self.prefix.num_cached_tokens[index]


@dataclass(kw_only=True)
class RankOutcome:
    """What one rank reports for a step (picklable)."""

    rank: int
    first_tokens: list[int] | None = None  # the rank holding the logits only
    kv_bytes: dict[str, int] = field(default_factory=dict)  # by request id: bytes this rank sent
    errors: dict[str, str] = field(default_factory=dict)  # by request id: why its KV did not (fully) leave this rank
    failure: str | None = None  # the whole step failed on this rank
    forward_s: float = 0.0
    kv_s: float = 0.0  # end of the forward -> this rank's last send completed
    # By request id: payload bytes of this rank's collectives by kind (mesh/comm.py), the step's split by rows.
    comm_bytes: dict[str, dict[str, int]] = field(default_factory=dict)


def logits_rank(layout: PrefillLayout) -> int:
    """The rank that samples: the first rank of the last pipeline stage (every rank of that stage has the same
    logits: TP all-gathers the vocabulary and CP gathers the rows)."""
    return layout.rank_of(pp=layout.pp - 1, cp=0, tp=0)


def is_fast_path_model(model: CausalLM) -> bool:
    """Whether a rank's model runs on mesh.gpu_decoder's fast path by default: the whole model on one CUDA rank
    (tp = pp = cp = 1) and dense (the fused weights cover no experts)."""
    return model.device.type == "cuda" and model.dims.world_size == 1 and not model.config.is_moe


class PrefillRankCore:
    """One rank's model shard and KV sender. `loop` is the event loop the sender lives on (the actor's)."""

    def __init__(self, model: CausalLM, sender: RankKVSender, loop: asyncio.AbstractEventLoop, *,
                 layerwise: bool = True, fast_path: bool | None = None):
        """fast_path: run the forward through mesh.gpu_decoder.GpuDecoder (fused weights shared with the model,
        varlen flash attention) instead of CausalLM; None = wherever it applies (is_fast_path_model)."""
        self.model = model
        self.sender = sender
        self.rank = sender.rank
        self.layout = sender.layout
        self.holds_logits = self.rank == logits_rank(self.layout)
        self._loop = loop
        self._layerwise = layerwise
        self._prefix_store: PrefixKVStore | None = None  # made at the first step that carries a prefix plan
        self.fast_path = None
        if fast_path or (fast_path is None and is_fast_path_model(model)):
            from mesh.gpu_decoder import GpuDecoder

            self.fast_path = GpuDecoder.from_model(model)  # the model's q/k/v, gate/up become views: held once

    @property
    def prefix_store(self) -> PrefixKVStore | None:
        return self._prefix_store

    def run(self, step: PrefillStep) -> RankOutcome:
        """The step on this rank; never raises for one request's KV failure (reported in `errors`)."""
        started = time.perf_counter()
        outcome = RankOutcome(rank=self.rank)
        pushes: list[tuple[str, concurrent.futures.Future]] = []
        held: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []

        def ship(index: int, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            info = step.reservations[index]
            if self._layerwise:
                pushes.append((info.request_id, self._submit_push(info, layer, k, v)))
            else:
                held.append((index, layer, k, v))

        if step.prefix is not None:
            if self._prefix_store is None:
                self._prefix_store = PrefixKVStore.for_model(self.model)
            self._prefix_store.before_step(step.prefix)
        forward_ledger, gather_ledger = comm.CommLedger(), comm.CommLedger()
        try:
            with comm.ledger_scope(forward_ledger):
                logits = self._forward(step, ship)
            if step.prefix is not None and self.layout.cp > 1:
                with comm.ledger_scope(gather_ledger):
                    self._ship_cached_cp(step, ship)
        except BaseException:
            if step.prefix is not None:
                self._prefix_store.discard_step(step.prefix)
            raise
        if step.prefix is not None:
            self._prefix_store.after_step(step.prefix)
        outcome.comm_bytes = self._comm_by_request(step, forward_ledger, gather_ledger)
        if self.holds_logits:
            outcome.first_tokens = sample(logits, list(step.params), [0] * len(step.params)).tolist()
        outcome.forward_s = time.perf_counter() - started
        for index, layer, k, v in held:  # layerwise off: everything goes after the forward
            info = step.reservations[index]
            pushes.append((info.request_id, self._submit_push(info, layer, k, v)))
        kv_started = time.perf_counter()
        for request_id, future in pushes:
            try:
                future.result()
            except Exception as error:
                outcome.errors.setdefault(request_id, f"{type(error).__name__}: {error}")
        finishes = [(info, asyncio.run_coroutine_threadsafe(self.sender.finish(info, finish_timeout_s(info)),
                                                            self._loop))
                    for info in step.reservations if info is not None]
        for info, future in finishes:
            try:
                outcome.kv_bytes[info.request_id] = future.result().num_bytes
            except Exception as error:
                outcome.errors.setdefault(info.request_id, f"{type(error).__name__}: {error}")
        outcome.kv_s = time.perf_counter() - kv_started
        return outcome

    def _comm_by_request(self, step: PrefillStep, forward: comm.CommLedger,
                         gather: comm.CommLedger) -> dict[str, dict[str, int]]:
        """This rank's collective bytes of the step, by request: the forward's split by each request's rows (exact
        per request: docs/planner.md), the prefix gathers of _ship_cached_cp by the rows each gathered per rank."""
        cached = [step.num_cached(i) for i in range(len(step.prompts))]
        shares = comm.attribute_step(forward.nonzero(), query_lens=[len(p) - c for p, c in zip(step.prompts, cached)],
                                     context_lens=cached, cp_size=self.layout.cp,
                                     cp_rank=self.model.dims.cp_rank,
                                     is_sharded=self.layout.cp > 1 or step.prefix is not None)
        if gather.total:
            gathered = [-(-len(p) // self.layout.cp) if c and r is not None else 0
                        for p, c, r in zip(step.prompts, cached, step.reservations)]
            for share, part in zip(shares, comm.attribute(gather.nonzero(), rows=gathered)):
                comm.add_into(share, part)
        return {request_id: share for request_id, share in zip(step.request_ids, shares) if share}

    def _submit_push(self, info: MeshReservation, layer: int, k: torch.Tensor, v: torch.Tensor,
                     ) -> concurrent.futures.Future:
        """Hand one layer to the sender on the event loop (compute thread). On a GPU the kernels producing k and v
        are only queued when the hook runs, while the sender packs on the loop thread's stream: an event recorded
        here, on the compute thread's current stream, is waited for before packing (kv_transfer's contract: the
        producing work must be complete before push_layer). The compute thread never blocks on it."""
        computed = None
        if k.is_cuda:
            computed = torch.cuda.Event()
            computed.record(torch.cuda.current_stream(k.device))
        return asyncio.run_coroutine_threadsafe(self._push_when_computed(computed, info, layer, k, v), self._loop)

    async def _push_when_computed(self, computed, info: MeshReservation, layer: int, k: torch.Tensor,
                                  v: torch.Tensor) -> None:
        while computed is not None and not computed.query():
            await asyncio.sleep(EVENT_POLL_S)
        await self.sender.push_layer(info, layer, k, v)

    @torch.inference_mode()
    def _forward(self, step: PrefillStep, ship) -> torch.Tensor | None:
        if self.fast_path is not None and step.prefix is None:
            return self._forward_fast(step, ship)
        # With a prefix cache, each request computes only the tokens after its cached prefix, against the store.
        cached = [step.num_cached(i) for i in range(len(step.prompts))]
        lengths = [len(p) - c for p, c in zip(step.prompts, cached)]
        input_ids = torch.tensor([t for p, c in zip(step.prompts, cached) for t in p[c:]], dtype=torch.long,
                                 device=self.model.device)
        positions = torch.cat([torch.arange(c, len(p), dtype=torch.long)
                               for p, c in zip(step.prompts, cached)]).to(self.model.device)
        seq_keys = list(step.prefix.store_keys) if step.prefix is not None else None
        batch = AttentionBatch(query_lens=lengths, context_lens=cached, block_tables=None,
                               logits_indices=AttentionBatch.last_token_indices(lengths, self.model.device),
                               seq_keys=seq_keys)
        num_micro_batches = min(self.layout.pp, len(lengths))
        # Micro-batches keep the pipeline stages busy; each holds whole sequences, each gets its own hook.
        micro_batches, order = split_micro_batches(input_ids, positions, batch, num_micro_batches)
        first_seq = 0
        for micro_batch in micro_batches:
            num_seqs = len(micro_batch.batch.query_lens)
            micro_batch.layer_hook = self._hook(step, first_seq, micro_batch.batch.query_lens, ship)
            first_seq += num_seqs
        outputs = run_pipeline(self.model, micro_batches, None, cp_store=self._prefix_store if seq_keys else None)
        if outputs[0] is None:
            return None
        return torch.cat(outputs)[order.to(outputs[0].device)]

    def _forward_fast(self, step: PrefillStep, ship) -> torch.Tensor:
        """The whole step as one packed GpuDecoder.prefill: the same logits and per-layer post-rotary K/V as the
        CausalLM path (within the dtype's rounding), through the same hook. Steps with a prefix plan keep the
        CausalLM path: they read and fill the model's persistent prefix store."""
        lengths = [len(p) for p in step.prompts]
        device = self.fast_path.device
        input_ids = torch.tensor([t for p in step.prompts for t in p], dtype=torch.long, device=device)
        positions = torch.cat([torch.arange(n, dtype=torch.long) for n in lengths]).to(device)
        return self.fast_path.prefill(input_ids, positions, lengths, layer_hook=self._hook(step, 0, lengths, ship))

    def _hook(self, step: PrefillStep, first_seq: int, query_lens: list[int], ship):
        """The layer hook of one micro-batch: cut each shipping sequence's rows out of the layer's K/V."""
        offsets = [sum(query_lens[:i]) for i in range(len(query_lens))]
        shipping = [i for i in range(len(query_lens)) if step.reservations[first_seq + i] is not None]

        def hook(layer: int, k: torch.Tensor, v: torch.Tensor, rows=None) -> None:
            for local in shipping:
                index = first_seq + local
                num_cached = step.num_cached(index)
                if num_cached and self.layout.cp > 1:
                    continue  # its whole prompt leaves from the store after the forward (_ship_cached_cp)
                if rows is None:  # every token of the step, packed in order
                    span = slice(offsets[local], offsets[local] + query_lens[local])
                else:  # CP shard: this rank's real rows, sequence by sequence, in shard order
                    mine = (rows.seq_ids == local).nonzero().flatten()
                    if mine.numel() == 0:
                        span = slice(0, 0)
                    else:
                        span = slice(int(mine[0]), int(mine[-1]) + 1)
                        positions = rows.positions[span].cpu()
                        if num_cached:  # cp == 1: the cached prefix goes first, positions 0..num_cached-1
                            positions = torch.cat([torch.arange(num_cached, dtype=positions.dtype), positions])
                        if not self._cp_rows_match(positions, len(step.prompts[index]), layer):
                            continue  # not shipped: finish() fails this request, never the whole step
                if num_cached:  # the decode side gets the whole prompt, as if all of it had been computed here
                    cached_k, cached_v = self._prefix_store.rows(step.prefix.store_keys[index],
                                                                 layer - self.model.layer_range.start)
                    ship(index, layer, torch.cat([cached_k, k[span]]), torch.cat([cached_v, v[span]]))
                    continue
                ship(index, layer, k[span], v[span])

        return hook

    @torch.inference_mode()
    def _ship_cached_cp(self, step: PrefillStep, ship) -> None:
        """cp > 1: a request that reused a cached prefix holds its prompt in the store's round-robin layout, not in
        the load-balanced shard the transfer plan expects; rebuild the whole prompt on every cp rank (collective,
        same order on every rank) and ship this rank's shard rows of it. Not layer-by-layer, but exact."""
        for index, key in enumerate(step.prefix.store_keys):
            if not step.num_cached(index) or step.reservations[index] is None:
                continue
            whole = self._prefix_store.gather(key, self.model.dims.cp_group)
            wanted = self.layout.token_positions(self.rank, len(step.prompts[index]))
            wanted = wanted[wanted >= 0].to(self.model.device)
            for local_layer, (k, v) in enumerate(whole):
                ship(index, self.model.layer_range[local_layer], k[wanted], v[wanted])

    def _cp_rows_match(self, positions: torch.Tensor, num_tokens: int, layer: int) -> bool:
        # The planner assumes the model's CP shard order; a disagreement would scatter KV to the wrong slots.
        expected = self.layout.token_positions(self.rank, num_tokens)
        expected = expected[expected >= 0]
        if torch.equal(positions.cpu(), expected):
            return True
        log.error("prefill rank %d layer %d: the model's CP rows %s differ from the transfer layout's %s; "
                  "not shipping them", self.rank, layer, positions.tolist(), expected.tolist())
        return False
