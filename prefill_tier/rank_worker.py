"""Ranks 1..world-1 of a prefill replica: each loads its shard of the model and runs the steps rank 0 broadcasts.

Who calls it: orchestrator/deploy.py places one `PrefillRankWorker` actor per bundle 1..world-1 of the replica's
placement group and hands the handles to rank 0 (`PrefillReplica`, prefill_tier/replica.py), which calls
`start(rendezvous)` on each while it joins the world itself. After that the worker only listens on the control
channel: a `PrefillStep` arrives, the rank runs it (`PrefillRankCore`: forward, its own KV shard out to the decode
ranks, layer by layer) and reports a `RankOutcome` back to rank 0.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading

import torch

from kv_transfer.mesh_layout import PrefillLayout
from kv_transfer.mesh_session import RankKVSender
from kv_transfer.transport import get_transport
from mesh.model import CausalLM
from mesh.parallel import MeshShape
from mesh.rank_device import DTYPES, actor_device, bind_thread, node_host
from mesh.collectives import install_for_mesh
from mesh.collectives_config import CollectivesConfig
from mesh.rank_group import RankGroup, Rendezvous, join_mesh
from prefill_tier.rank_step import PrefillRankCore, RankOutcome

log = logging.getLogger("pdcluster.prefill")

def join_and_load(model_path: str, dtype: str, shape: MeshShape, rank: int, rendezvous: Rendezvous | None,
                  store=None, *, device: torch.device | None = None, collectives: CollectivesConfig | None = None,
                  ) -> tuple[RankGroup | None, CausalLM, PrefillLayout]:
    """Blocking (run it off the event loop, on the rank's compute thread): join the replica's world (NCCL for the
    model's collectives on GPU), load this rank's shard straight onto `device` in `dtype`, describe its KV."""
    device = torch.device("cpu") if device is None else device
    bind_thread(device)
    group, dims = join_mesh(rendezvous, rank, shape, store=store, device=device if device.type == "cuda" else None)
    model = CausalLM.load(model_path, dims, dtype=DTYPES[dtype], device=device)
    install_for_mesh(dims, collectives)  # direct-access all-reduce / all-to-all on GPU; Gloo on CPU unchanged
    config = model.config
    layout = PrefillLayout(num_layers=config.num_layers, num_kv_heads=config.num_kv_heads, pp=shape.pp, cp=shape.cp,
                           tp=shape.tp)
    return group, model, layout


class PrefillRankWorker:
    """Ray actor class (plain; resources and placement come from orchestrator/deploy.py)."""

    def __init__(self, *, replica_id: str, rank: int, model_path: str, dtype: str, mesh: MeshShape, kv_backend: str,
                 kv_token: str, layerwise: bool = True, num_threads: int = 1, use_gpu: bool = False,
                 collectives: CollectivesConfig | None = None):
        """use_gpu: the tier asks for num_gpus: this rank computes on the GPU Ray assigned it. collectives: the
        tier's `collectives` section (mesh/collectives.py)."""
        self._collectives = collectives
        torch.set_num_threads(max(1, num_threads))
        self.replica_id = replica_id
        self.rank = rank
        self._model_path = model_path
        self._dtype = dtype
        self._shape = mesh
        self._kv_backend = kv_backend
        self._kv_token = kv_token
        self._layerwise = layerwise
        self._use_gpu = use_gpu
        self._device = torch.device("cpu")
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefill-rank")
        self._thread: threading.Thread | None = None
        self._num_steps = 0

    async def start(self, rendezvous: Rendezvous) -> dict:
        """Join the world rank 0 opened (blocks until every rank joined), load the shard, serve steps."""
        if self._thread is not None:
            raise RuntimeError(f"{self.replica_id} rank {self.rank} already belongs to a world; restart the actor")
        loop = asyncio.get_running_loop()
        self._device = actor_device(self._use_gpu)
        bind_thread(self._device)  # the event loop packs each layer's KV and records events for the transport
        group, model, layout = await loop.run_in_executor(
            self._executor, functools.partial(join_and_load, self._model_path, self._dtype, self._shape, self.rank,
                                              rendezvous, device=self._device, collectives=self._collectives))
        sender = RankKVSender(get_transport(self._kv_backend).make_client(token=self._kv_token), layout, self.rank)
        core = PrefillRankCore(model, sender, loop, layerwise=self._layerwise)
        self._thread = threading.Thread(target=self._serve_steps, args=(group, core), daemon=True,
                                        name=f"prefill-rank{self.rank}-steps")
        self._thread.start()
        return {"rank": self.rank, "node_ip": node_host(), "device": str(self._device)}

    def _serve_steps(self, group: RankGroup, core: PrefillRankCore) -> None:
        bind_thread(self._device)
        while True:
            try:
                step = group.broadcast()
            except Exception:
                log.exception("%s rank %d: control channel failed; no more steps", self.replica_id, self.rank)
                return
            if step is None:  # rank 0 is shutting the replica down
                return
            try:
                outcome = core.run(step)
            except Exception as error:  # reported to rank 0, which fails the batch
                log.exception("%s rank %d: prefill step failed", self.replica_id, self.rank)
                outcome = RankOutcome(rank=self.rank, failure=f"{type(error).__name__}: {error}")
            self._num_steps += 1
            try:
                group.gather(outcome)
            except Exception:
                log.exception("%s rank %d: control channel failed; no more steps", self.replica_id, self.rank)
                return

    async def ping(self) -> bool:
        """True while the rank still serves steps."""
        return self._thread is not None and self._thread.is_alive()

    async def get_stats(self) -> dict:
        return {"rank": self.rank, "num_steps": self._num_steps, "device": str(self._device)}
