"""Ranks 1..world-1 of a decode replica: each owns its shard of the model and of the paged KV cache (its layers for
PP, its KV heads for TP) and a KV server that receives its share of every prompt's KV.

Who calls it: orchestrator/deploy.py places one `DecodeRankWorker` actor per bundle 1..world-1 of the replica's
placement group and hands the handles to rank 0 (`DecodeReplica`, decode_tier/replica.py), which calls
`start(rendezvous)` on each while it joins the world itself. Then rank 0 calls, per request, `post_kv` (reserve:
post this rank's receives into the blocks rank 0's scheduler chose), `wait_kv` (every message of this rank landed)
and `abort_kv` (no late write lands once it returns); and each engine step reaches the worker's step thread over
the control channel: the `DecodePlan` rank 0 broadcast, run on this rank's shards in lockstep with the others.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from decode_tier.engine import DecodePlan, StepRunner
from decode_tier.kv_sizing import KVCacheSize, agree_on_size, size_kv_cache
from kv_transfer.mesh_layout import DecodeLayout, PrefillLayout
from kv_transfer.mesh_session import RankKVReceiver, RankTarget
from kv_transfer.transport import TransferStats, get_transport
from mesh.kv_cache import allocate_kv_cache
from mesh.model import CausalLM
from mesh.parallel import MeshShape
from mesh.rank_device import DTYPES, actor_device, bind_thread, node_host
from mesh.collectives import install_for_mesh
from mesh.collectives_config import CollectivesConfig
from mesh.rank_group import RankGroup, Rendezvous, join_mesh

log = logging.getLogger("pdcluster.decode")

def logits_rank(shape: MeshShape) -> int:
    """The decode rank that samples: the first rank of the last pipeline stage."""
    return shape.rank_of(pp=shape.pp - 1, cp=0, tp=0)


@dataclass(frozen=True, kw_only=True)
class CacheSettings:
    """What decides the size of a rank's KV cache (decode_tier/kv_sizing.py): picklable, the same on every rank."""

    num_kv_blocks: int | None  # set in cluster.yaml: wins; None: sized from the device
    gpu_memory_fraction: float
    block_size: int
    max_num_seqs: int
    max_step_tokens: int | None = None  # tokens per engine step (None: the engine's default for the device)

    def step_tokens_on(self, device: torch.device) -> int:
        """The step token budget this replica runs with on `device` (the activation reserve is sized for it)."""
        if self.max_step_tokens is not None:
            return self.max_step_tokens
        from decode_tier.engine import default_max_step_tokens

        return default_max_step_tokens(device, self.max_num_seqs)


def join_and_load(model_path: str, dtype: str, shape: MeshShape, rank: int, rendezvous: Rendezvous | None,
                  cache: CacheSettings, store=None, *, device: torch.device | None = None,
                  collectives: CollectivesConfig | None = None,
                  ) -> tuple[RankGroup | None, CausalLM, DecodeLayout, KVCacheSize]:
    """Blocking (run it off the event loop, on the rank's compute thread): join the replica's world (NCCL for the
    model's collectives on GPU), load this rank's shard straight onto `device` in `dtype`, describe its KV, and
    agree with the other ranks on the number of KV blocks (collective; no cache is allocated yet)."""
    if shape.cp != 1:
        raise ValueError(f"decode replicas run without context parallelism (mesh {shape}); use cp: 1")
    device = torch.device("cpu") if device is None else device
    bind_thread(device)
    group, dims = join_mesh(rendezvous, rank, shape, store=store, device=device if device.type == "cuda" else None)
    model = CausalLM.load(model_path, dims, dtype=DTYPES[dtype], device=device)
    install_for_mesh(dims, collectives)  # direct-access all-reduce / all-to-all on GPU; Gloo on CPU unchanged
    config = model.config
    layout = DecodeLayout(num_layers=config.num_layers, num_kv_heads=config.num_kv_heads, pp=shape.pp, tp=shape.tp,
                          block_size=cache.block_size)
    mine = size_kv_cache(model, num_kv_blocks=cache.num_kv_blocks, gpu_memory_fraction=cache.gpu_memory_fraction,
                         block_size=cache.block_size, max_num_seqs=cache.max_num_seqs,
                         max_step_tokens=cache.step_tokens_on(device))
    return group, model, layout, agree_on_size(group, mine)


class MeshStepPeers:
    """Rank 0's side of the step channel (`decode_tier.engine.StepPeers`): the plan goes to every rank, the sampled
    tokens come back from the logits rank."""

    def __init__(self, group: RankGroup, shape: MeshShape):
        self._group = group
        self._logits_rank = logits_rank(shape)
        self.holds_logits = self._logits_rank == 0

    def share_plan(self, plan: DecodePlan) -> None:
        self._group.broadcast(plan)

    def share_tokens(self, sampled_token_ids: list[int] | None) -> list[int]:
        if not self.holds_logits:
            sampled_token_ids = self._group.broadcast(None, src=self._logits_rank)
        if sampled_token_ids is None:
            raise RuntimeError(f"the decode step failed on rank {self._logits_rank} (it sampled nothing)")
        return sampled_token_ids

    def stop(self) -> None:
        """Let the other ranks' step threads end (replica shutting down)."""
        self._group.broadcast(None)


class DecodeRankWorker:
    """Ray actor class (plain; resources and placement come from orchestrator/deploy.py)."""

    def __init__(self, *, replica_id: str, rank: int, model_path: str, dtype: str, mesh: MeshShape,
                 num_kv_blocks: int | None, block_size: int, max_num_seqs: int, kv_backend: str, kv_token: str,
                 num_threads: int = 1, checksum: bool = False, use_gpu: bool = False,
                 gpu_memory_fraction: float = 0.9, max_step_tokens: int | None = None,
                 collectives: CollectivesConfig | None = None):
        """use_gpu: the tier asks for num_gpus: this rank computes on the GPU Ray assigned it. num_kv_blocks None:
        sized at start-up (decode_tier/kv_sizing.py). collectives: the tier's `collectives` section."""
        self._collectives = collectives
        torch.set_num_threads(max(1, num_threads))
        self.replica_id = replica_id
        self.rank = rank
        self._model_path = model_path
        self._dtype = dtype
        self._shape = mesh
        self._cache_settings = CacheSettings(num_kv_blocks=num_kv_blocks, gpu_memory_fraction=gpu_memory_fraction,
                                             block_size=block_size, max_num_seqs=max_num_seqs,
                                             max_step_tokens=max_step_tokens)
        self._block_size = block_size
        self._max_num_seqs = max_num_seqs
        self._kv_backend = kv_backend
        self._kv_token = kv_token
        self._checksum = checksum
        self._use_gpu = use_gpu
        self._device = torch.device("cpu")
        self._cache_size: KVCacheSize | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode-rank")
        self._thread: threading.Thread | None = None
        self._num_steps = 0

    async def start(self, rendezvous: Rendezvous) -> dict:
        """Join the world rank 0 opened (blocks until every rank joined), load the shard, allocate this rank's
        cache (on its GPU when the tier has num_gpus), start its KV server and serve steps. Returns {"rank",
        "kv_address", "node_ip", "device", "num_kv_blocks"}."""
        if self._thread is not None:
            raise RuntimeError(f"{self.replica_id} rank {self.rank} already belongs to a world; restart the actor")
        loop = asyncio.get_running_loop()
        self._device = actor_device(self._use_gpu)
        bind_thread(self._device)  # the event loop packs, scatters and records events for the transport
        group, model, layout, self._cache_size = await loop.run_in_executor(
            self._executor, functools.partial(join_and_load, self._model_path, self._dtype, self._shape, self.rank,
                                              rendezvous, self._cache_settings, device=self._device,
                                              collectives=self._collectives))
        log.info("%s rank %d on %s: %s", self.replica_id, self.rank, self._device, self._cache_size.description)
        kv_cache = allocate_kv_cache(model, num_blocks=self._cache_size.num_blocks, block_size=self._block_size)
        runner = StepRunner(model, kv_cache, self._max_num_seqs)
        self._comm_tally = runner.comm_tally
        self._server = get_transport(self._kv_backend).make_server(token=self._kv_token)
        address = await self._server.start(node_host())
        self._receiver = RankKVReceiver(self._server, kv_cache, layout, self.rank, checksum=self._checksum)
        self._thread = threading.Thread(target=self._serve_steps, args=(group, runner), daemon=True,
                                        name=f"decode-rank{self.rank}-steps")
        self._thread.start()
        return {"rank": self.rank, "kv_address": address, "node_ip": node_host(), "device": str(self._device),
                "num_kv_blocks": self._cache_size.num_blocks}

    async def post_kv(self, request_id: str, src: PrefillLayout, block_ids: Sequence[int], num_tokens: int,
                      lease_s: float) -> RankTarget:
        return self._receiver.post(request_id, src, block_ids, num_tokens, lease_s)

    async def wait_kv(self, request_id: str) -> TransferStats:
        return await self._receiver.wait_complete(request_id)

    async def abort_kv(self, request_id: str) -> bool:
        return await self._receiver.abort(request_id)

    def _serve_steps(self, group: RankGroup, runner: StepRunner) -> None:
        bind_thread(self._device)
        source = logits_rank(self._shape)
        holds_logits = source == self.rank
        while True:
            try:
                plan = group.broadcast()
            except Exception:
                log.exception("%s rank %d: control channel failed; no more steps", self.replica_id, self.rank)
                return
            if plan is None:  # rank 0 is shutting the replica down
                return
            sampled = None
            try:
                sampled = runner.run(plan, sample_tokens=holds_logits)
            except Exception:  # rank 0 learns it from the missing tokens (or its own collectives failing)
                log.exception("%s rank %d: decode step failed", self.replica_id, self.rank)
            self._num_steps += 1
            if source != 0:
                try:
                    group.broadcast(sampled, src=source)
                except Exception:
                    log.exception("%s rank %d: control channel failed; no more steps", self.replica_id, self.rank)
                    return

    async def take_comm_bytes(self, request_id: str, num_steps: int, timeout_s: float = 10.0) -> dict[str, int]:
        """This rank's collective bytes of a finished request, once it has run `num_steps` steps (rank 0's count
        when the request finished: this rank may still be closing that step). Called by rank 0."""
        deadline = time.monotonic() + timeout_s
        while self._comm_tally.num_steps < num_steps:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.replica_id} rank {self.rank} ran {self._comm_tally.num_steps} of "
                                   f"{num_steps} steps")
            await asyncio.sleep(0.001)
        return self._comm_tally.take(request_id)

    async def ping(self) -> bool:
        """True while the rank still serves steps."""
        return self._thread is not None and self._thread.is_alive()

    async def get_stats(self) -> dict:
        return {"rank": self.rank, "num_steps": self._num_steps, "num_waiting_kv": self._receiver.num_pending,
                "device": str(self._device), "num_kv_blocks": self._cache_size.num_blocks}
