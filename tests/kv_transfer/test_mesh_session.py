"""Multi-rank KV sessions over the in-process transport: every prefill rank pushes only its own shard (its layers,
heads and CP token rows), every decode rank receives into its own paged cache, and the result is bitwise the KV a
decode replica would hold had it computed the prompt itself. Also: abort and lease expiry leave no write behind."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from kv_transfer.errors import TransferAborted
from kv_transfer.layout import gather_kv
from kv_transfer.local_transport import LocalTransport
from kv_transfer.mesh_layout import DecodeLayout, PrefillLayout
from kv_transfer.mesh_session import MeshReservation, RankKVReceiver, RankKVSender, message_groups

TOKEN = "test-token"
HEAD_DIM = 4
NUM_BLOCKS = 40
SENTINEL = 7.5


def _full_kv(seed: int, num_layers: int, num_tokens: int, num_heads: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(num_tokens, num_heads, HEAD_DIM, generator=generator),
             torch.randn(num_tokens, num_heads, HEAD_DIM, generator=generator)) for _ in range(num_layers)]


def _local_rows(layout: PrefillLayout, rank: int, full: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """What prefill rank `rank` computes for one layer: its heads, its CP rows (padding rows zero)."""
    positions = layout.token_positions(rank, num_tokens)
    heads = layout.head_range(rank)
    out = torch.zeros(len(positions), len(heads), HEAD_DIM)
    real = positions >= 0
    out[real] = full[positions[real]][:, heads.start:heads.stop]
    return out


class _Mesh:
    """A decode replica's ranks (servers, caches, receivers) and a prefill replica's ranks (clients, senders)."""

    def __init__(self, src: PrefillLayout, dst: DecodeLayout, *, checksum: bool = False, delay_s: float = 0.0):
        self.src, self.dst = src, dst
        self.servers = [LocalTransport.make_server(token=TOKEN) for _ in range(dst.world_size)]
        for server in self.servers:
            server._delivery_delay_s = delay_s
        self.caches = []
        for rank in range(dst.world_size):
            heads = len(dst.head_range(rank))
            self.caches.append([torch.full((NUM_BLOCKS, 2, dst.block_size, heads, HEAD_DIM), SENTINEL)
                                for _ in dst.layer_range(rank)])
        self.checksum = checksum
        self.senders = [RankKVSender(LocalTransport.make_client(token=TOKEN), src, rank)
                        for rank in range(src.world_size)]

    async def start(self) -> None:
        for server in self.servers:
            await server.start()
        self.receivers = [RankKVReceiver(server, cache, self.dst, rank, checksum=self.checksum)
                          for rank, (server, cache) in enumerate(zip(self.servers, self.caches))]

    def reserve(self, request_id: str, block_ids: list[int], num_tokens: int, lease_s: float = 30.0):
        targets = tuple(r.post(request_id, self.src, block_ids, num_tokens, lease_s) for r in self.receivers)
        return MeshReservation(request_id=request_id, num_tokens=num_tokens, block_ids=tuple(block_ids),
                               src=self.src, dst=self.dst, head_dim=HEAD_DIM, dtype="float32", targets=targets,
                               has_checksum=self.checksum)

    async def push_all(self, info, kv) -> list:
        for rank, sender in enumerate(self.senders):
            for layer in self.src.layer_range(rank):
                k, v = (_local_rows(self.src, rank, t, info.num_tokens) for t in kv[layer])
                await sender.push_layer(info, layer, k, v)
        return await asyncio.gather(*(s.finish(info) for s in self.senders))

    def assert_landed(self, block_ids, num_tokens, kv) -> None:
        for rank in range(self.dst.world_size):
            heads = self.dst.head_range(rank)
            for cache, layer in zip(self.caches[rank], self.dst.layer_range(rank)):
                k, v = gather_kv(cache, block_ids, num_tokens)
                assert torch.equal(k, kv[layer][0][:, heads.start:heads.stop]), (rank, layer, "K")
                assert torch.equal(v, kv[layer][1][:, heads.start:heads.stop]), (rank, layer, "V")

    def untouched(self, block_ids) -> bool:
        index = torch.tensor(block_ids)
        return all(bool((c.index_select(0, index) == SENTINEL).all()) for caches in self.caches for c in caches)


LAYOUT_PAIRS = [
    # (prefill pp, cp, tp), (decode pp, tp), num_kv_heads
    ((1, 1, 1), (1, 1), 2),
    ((1, 1, 2), (1, 1), 2),  # prefill TP2 -> decode TP1: every decode layer gathers two head halves (staged)
    ((1, 1, 1), (1, 2), 2),  # prefill TP1 -> decode TP2: each decode rank gets a head subset of the one sender
    ((1, 1, 1), (1, 4), 2),  # decode replicates heads
    ((1, 1, 4), (1, 2), 2),  # prefill replicates heads
    ((2, 1, 1), (1, 2), 2),  # prefill PP2 -> decode TP2
    ((1, 2, 1), (1, 1), 2),  # prefill CP2 -> decode TP1: token runs start mid-block
    ((1, 2, 2), (1, 4), 2),
    ((2, 3, 2), (2, 1), 4),
]


@pytest.mark.parametrize("src_shape,dst_shape,num_heads", LAYOUT_PAIRS)
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_every_decode_rank_gets_exactly_its_shard(src_shape, dst_shape, num_heads, block_size):
    num_layers, num_tokens = 4, 23
    src = PrefillLayout(num_layers=num_layers, num_kv_heads=num_heads, pp=src_shape[0], cp=src_shape[1],
                        tp=src_shape[2])
    dst = DecodeLayout(num_layers=num_layers, num_kv_heads=num_heads, pp=dst_shape[0], tp=dst_shape[1],
                       block_size=block_size)
    rng = random.Random(hash((src_shape, dst_shape, block_size)) & 0xFFFF)
    block_ids = rng.sample(range(NUM_BLOCKS), -(-num_tokens // block_size) + 1)
    kv = _full_kv(3, num_layers, num_tokens, num_heads)

    async def scenario():
        mesh = _Mesh(src, dst, checksum=block_size == 4)
        await mesh.start()
        info = mesh.reserve("r1", block_ids, num_tokens)
        sent = await mesh.push_all(info, kv)
        stats = await asyncio.gather(*(r.wait_complete("r1") for r in mesh.receivers))
        assert sum(s.num_bytes for s in stats) == sum(s.num_bytes for s in sent) > 0
        mesh.assert_landed(block_ids, num_tokens, kv)
        assert all(r.num_pending == 0 for r in mesh.receivers)
        assert all(s.num_pending == 0 for s in mesh.senders)

    asyncio.run(scenario())


def test_direct_copies_need_no_staging():
    # Equal meshes, and a finer prefill head split that still carries whole decode rows: straight into blocks.
    for src_tp, dst_tp in ((1, 1), (2, 2), (1, 2)):
        src = PrefillLayout(num_layers=2, num_kv_heads=2, tp=src_tp)
        dst = DecodeLayout(num_layers=2, num_kv_heads=2, tp=dst_tp, block_size=4)
        plan = MeshReservation(request_id="r", num_tokens=9, block_ids=(3, 4, 9), src=src, dst=dst, head_dim=4,
                               dtype="float32", targets=tuple(_fake_targets(dst.world_size))).plan()
        for rank in range(dst.world_size):
            assert all(g.block_chunks is not None for g in message_groups(plan, rank)), (src_tp, dst_tp)


def test_a_fragmented_block_table_is_staged_in_one_message_per_layer():
    """Past MAX_IN_PLACE_RUNS runs of consecutive blocks, a direct copy no longer sends one message per run: it is
    staged like any other copy (one message per layer), and the KV still lands in the right blocks."""
    from kv_transfer.mesh_session import MAX_IN_PLACE_RUNS

    src = PrefillLayout(num_layers=2, num_kv_heads=2)
    dst = DecodeLayout(num_layers=2, num_kv_heads=2, block_size=4)
    runs = MAX_IN_PLACE_RUNS + 1
    scattered = tuple(range(0, 2 * runs, 2))  # every other block: `runs` runs of one block
    compact = (7, 8, 9, 1, 2)  # two runs
    for block_ids, is_in_place in ((scattered, False), (compact, True)):
        plan = MeshReservation(request_id="r", num_tokens=4 * len(block_ids) - 1, block_ids=block_ids, src=src,
                               dst=dst, head_dim=4, dtype="float32", targets=tuple(_fake_targets(1))).plan()
        groups = message_groups(plan, 0)
        assert len(groups) == 2
        assert all((g.block_chunks is not None) == is_in_place for g in groups), block_ids


def _fake_targets(n):
    from kv_transfer.mesh_session import RankTarget

    return [RankTarget(address=f"local://x{i}", transfer_id=i) for i in range(n)]


def test_abort_mid_transfer_writes_nothing_and_blocks_are_reusable():
    src = PrefillLayout(num_layers=3, num_kv_heads=2, tp=2)
    dst = DecodeLayout(num_layers=3, num_kv_heads=2, tp=1, block_size=4)
    kv = _full_kv(5, 3, 10, 2)
    block_ids = [5, 6, 2]

    async def scenario():
        mesh = _Mesh(src, dst, delay_s=0.02)
        await mesh.start()
        info = mesh.reserve("r1", block_ids, 10)
        pushing = asyncio.create_task(mesh.push_all(info, kv))
        await asyncio.sleep(0.03)  # some messages under way, not all
        waiter = asyncio.create_task(mesh.receivers[0].wait_complete("r1"))
        assert await mesh.receivers[0].abort("r1")
        with pytest.raises(TransferAborted):
            await waiter
        await asyncio.gather(pushing, return_exceptions=True)
        # Staged messages are never scattered after an abort: the blocks still hold the sentinel.
        assert mesh.untouched(block_ids)
        # Reuse the same blocks for another request at once: it lands intact.
        other = _full_kv(6, 3, 10, 2)
        info2 = mesh.reserve("r2", block_ids, 10)
        await mesh.push_all(info2, other)
        await mesh.receivers[0].wait_complete("r2")
        mesh.assert_landed(block_ids, 10, other)

    asyncio.run(scenario())


def test_lease_expiry_on_one_rank_aborts_it():
    src = PrefillLayout(num_layers=2, num_kv_heads=2, tp=1)
    dst = DecodeLayout(num_layers=2, num_kv_heads=2, tp=2, block_size=4)

    async def scenario():
        mesh = _Mesh(src, dst)
        await mesh.start()
        mesh.reserve("r1", [1, 2], 6, lease_s=0.05)
        with pytest.raises(TransferAborted, match="lease"):
            await mesh.receivers[1].wait_complete("r1")
        assert mesh.receivers[1].num_pending == 0
        assert await mesh.receivers[0].abort("r1")
        assert mesh.untouched([1, 2])

    asyncio.run(scenario())


def test_sender_refuses_a_reservation_planned_for_another_mesh():
    dst = DecodeLayout(num_layers=2, num_kv_heads=2, tp=1, block_size=4)
    planned_for = PrefillLayout(num_layers=2, num_kv_heads=2, tp=2)
    sender = RankKVSender(LocalTransport.make_client(token=TOKEN), PrefillLayout(num_layers=2, num_kv_heads=2), 0)
    info = MeshReservation(request_id="r", num_tokens=3, block_ids=(0,), src=planned_for, dst=dst, head_dim=4,
                           dtype="float32", targets=tuple(_fake_targets(1)))

    async def scenario():
        with pytest.raises(ValueError, match="planned its receives for a prefill mesh pp=1 cp=1 tp=2"):
            await sender.push_layer(info, 0, torch.zeros(3, 2, 4), torch.zeros(3, 2, 4))

    asyncio.run(scenario())


def test_missing_layer_fails_finish():
    src = PrefillLayout(num_layers=2, num_kv_heads=2)
    dst = DecodeLayout(num_layers=2, num_kv_heads=2, block_size=4)

    async def scenario():
        mesh = _Mesh(src, dst)
        await mesh.start()
        info = mesh.reserve("r1", [0, 1], 5)
        k = torch.zeros(5, 2, HEAD_DIM)
        await mesh.senders[0].push_layer(info, 0, k, k)
        with pytest.raises(TransferAborted, match=r"never pushed layers \[1\]"):
            await mesh.senders[0].finish(info)
        await mesh.receivers[0].abort("r1")

    asyncio.run(scenario())
