"""The `nccl` transport: torch.distributed point-to-point (Gloo on host tensors here, NCCL in the gpu test).

The decode side (KVReceiver on an NcclKVServer) runs in the test process; the prefill side runs in another OS
process (kv_ucx_peer with transport "nccl") so that the process group really spans two processes and peer death
is real. One in-process test covers both sides on one loop, and both message kinds (in place and bundled).
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import torch

import kv_transfer.nccl_wire as nccl_wire
from kv_test_helpers import (
    SENTINEL,
    assert_kv_landed,
    assert_untouched,
    blocks_needed,
    make_cache,
    make_kv,
    run_bounded,
    shuffled_block_sets,
)
from kv_transfer import KVReceiver, KVSender, TransferAborted, TransportOptions, get_transport
from kv_ucx_peer import Peer, job

TOKEN = "nccl-test-token"
NUM_LAYERS = 4
NUM_BLOCKS = 96
BLOCK_SIZE = 4
NUM_HEADS = 2
HEAD_DIM = 64  # 4 KiB per block in float32


@pytest.fixture(scope="module")
def peer():
    peer = Peer(TOKEN, transport="nccl")
    yield peer
    peer.stop()
    assert peer.process.exitcode == 0, "the peer process did not shut down cleanly"


async def _start_decode(*, checksum: bool = False):
    server = get_transport("nccl").make_server(token=TOKEN, options=TransportOptions(cancel_timeout_s=5.0))
    await server.start("127.0.0.1")
    cache = make_cache(NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, NUM_HEADS, HEAD_DIM)
    return server, cache, KVReceiver(server, cache, BLOCK_SIZE, checksum=checksum)


def _kv(seed, num_tokens):
    return make_kv(seed, NUM_LAYERS, num_tokens, NUM_HEADS, HEAD_DIM)


def test_nccl_in_one_process_lands_bfloat16_in_place_and_bundled(monkeypatch):
    # bf16 blocks are 2 KiB: runs of >= 4 blocks travel alone into their blocks, shorter runs are bundled.
    monkeypatch.setattr(nccl_wire, "DIRECT_MIN_BYTES", 8 << 10)

    async def body():
        transport = get_transport("nccl")
        server = transport.make_server(token=TOKEN)
        address = await server.start("127.0.0.1")
        cache = make_cache(2, 32, BLOCK_SIZE, NUM_HEADS, HEAD_DIM, dtype=torch.bfloat16)
        receiver = KVReceiver(server, cache, BLOCK_SIZE, checksum=True)
        client = transport.make_client(token=TOKEN)
        sender = KVSender(client)
        blocks, num_tokens = [20, 21, 22, 23, 24, 3, 9, 10, 30], 35
        info = receiver.reserve("bf16", blocks, num_tokens, lease_s=90)
        kv = make_kv(11, 2, num_tokens, NUM_HEADS, HEAD_DIM, dtype=torch.bfloat16)
        for layer, (k, v) in enumerate(kv):
            await sender.push_layer(info, layer, k, v)
        sent = await sender.finish(info, timeout_s=10)
        landed = await receiver.wait_complete("bf16")
        assert address.startswith("nccl://127.0.0.1:")
        assert landed.num_bytes == sent.num_bytes
        assert_kv_landed(cache, blocks, num_tokens, kv)
        assert_untouched(cache, [b for b in range(32) if b not in blocks])
        await client.close()
        await server.close()

    run_bounded(body(), 120)


@pytest.mark.slow
def test_nccl_concurrent_requests_land_bitwise_in_their_blocks(peer):
    async def body():
        server, cache, receiver = await _start_decode(checksum=True)
        num_tokens = [37, 5, 61]
        tables = shuffled_block_sets(21, NUM_BLOCKS, [blocks_needed(n, BLOCK_SIZE) + 2 for n in num_tokens])
        infos = [receiver.reserve(f"req-{i}", t, n, lease_s=90) for i, (t, n) in enumerate(zip(tables, num_tokens))]
        waits = [asyncio.create_task(receiver.wait_complete(info.request_id)) for info in infos]
        replies = await peer.call(("push", [job(info, 200 + i) for i, info in enumerate(infos)]))
        assert [r[0] for r in replies] == ["ok"] * 3, replies
        landed = await asyncio.gather(*waits)
        for i, info in enumerate(infos):
            assert landed[i].num_bytes == replies[i][1]
            assert_kv_landed(cache, tables[i], num_tokens[i], _kv(200 + i, num_tokens[i]))
        used = {b for table, n in zip(tables, num_tokens) for b in table[: blocks_needed(n, BLOCK_SIZE)]}
        assert_untouched(cache, sorted(set(range(NUM_BLOCKS)) - used))
        await server.close()

    run_bounded(body(), 150)


@pytest.mark.slow
def test_nccl_wrong_token_is_refused_and_logged(peer, caplog):
    async def body():
        server, _, _ = await _start_decode()
        refused = await peer.call(("connect", server.address, "wrong-token"))
        accepted = await peer.call(("connect", server.address, TOKEN))
        await server.close()
        return refused, accepted

    with caplog.at_level(logging.WARNING, logger="kv_transfer"):
        refused, accepted = run_bounded(body(), 120)
    assert refused[:2] == ("error", "AuthenticationError") and "wrong cluster token" in refused[2]
    assert accepted == ("ok", None)
    assert any("refused peer 'test-prefill'" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_nccl_abort_mid_transfer_then_the_same_blocks_get_only_the_new_request(peer):
    async def body():
        server, cache, receiver = await _start_decode()
        num_tokens = 90
        blocks = shuffled_block_sets(5, NUM_BLOCKS, [blocks_needed(num_tokens, BLOCK_SIZE)])[0]
        old = receiver.reserve("old", blocks, num_tokens, lease_s=90)
        assert (await peer.call(("push_async", [job(old, 1, [0, 1], finish=False)])))[0] == "started"
        deadline = time.monotonic() + 10
        while torch.all(cache[0][blocks] == SENTINEL) and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        assert not torch.all(cache[0][blocks] == SENTINEL), "no KV of the first request arrived"
        assert await receiver.abort("old") is True
        snapshot = [t.clone() for t in cache]

        new = receiver.reserve("new", blocks, num_tokens, lease_s=90)
        waiter = asyncio.create_task(receiver.wait_complete("new"))
        # The rest of the aborted request is announced late, together with the new one: it must not land.
        replies = await peer.call(("push", [job(old, 1, [2, 3]), job(new, 2)]))
        assert [r[0] for r in replies] == ["ok", "ok"], replies
        await waiter
        assert_kv_landed(cache, blocks, num_tokens, _kv(2, num_tokens))
        others = [b for b in range(NUM_BLOCKS) if b not in blocks]
        for layer in range(NUM_LAYERS):
            assert torch.equal(cache[layer][others], snapshot[layer][others])
        assert_untouched(cache, others)
        await server.close()

    run_bounded(body(), 150)


@pytest.mark.slow
def test_nccl_lease_expiry_aborts_within_the_bound(peer):
    async def body():
        server, cache, receiver = await _start_decode()
        # Warm the pair up first: the process group is built on the first send, which must not eat the lease.
        warm = receiver.reserve("warm", [1, 2], 6, lease_s=90)
        assert (await peer.call(("push", [job(warm, 6)])))[0][0] == "ok"
        await receiver.wait_complete("warm")
        started = time.monotonic()
        info = receiver.reserve("late", [7, 8, 40], 12, lease_s=0.5)
        replies = await peer.call(("push", [job(info, 3, [0], finish=False)]))
        assert replies == [("ok", None)]
        with pytest.raises(TransferAborted, match="lease of 0.5s expired"):
            await receiver.wait_complete("late")
        assert 0.5 <= time.monotonic() - started < 0.5 + 1.0
        await server.close()

    run_bounded(body(), 120)


@pytest.mark.slow
def test_nccl_sender_killed_mid_transfer_ends_by_lease_and_the_server_keeps_serving(peer):
    async def body():
        server, cache, receiver = await _start_decode()
        doomed = Peer(TOKEN, transport="nccl")
        try:
            # Process start-up (torch imports) must not eat into the lease: wait until it is connected.
            assert await doomed.call(("connect", server.address, TOKEN), timeout_s=60) == ("ok", None)
            num_tokens = 70
            blocks = shuffled_block_sets(9, NUM_BLOCKS, [blocks_needed(num_tokens, BLOCK_SIZE)])[0]
            lease_s = 3.0
            info = receiver.reserve("doomed", blocks, num_tokens, lease_s=lease_s)
            started = time.monotonic()
            await doomed.call(("push_async", [job(info, 4, delay_s=0.3)]))
            while torch.all(cache[0][blocks] == SENTINEL) and time.monotonic() - started < lease_s:
                await asyncio.sleep(0.01)
            doomed.kill()  # between layers or in the middle of one
            with pytest.raises(TransferAborted):
                await receiver.wait_complete("doomed")
            assert time.monotonic() - started < lease_s + 2.0
        finally:
            doomed.kill()

        # The server survived its peer's death: a new request from another process completes.
        fresh = receiver.reserve("fresh", blocks, num_tokens, lease_s=90)
        replies = await peer.call(("push", [job(fresh, 5)]))
        assert replies[0][0] == "ok", replies
        await receiver.wait_complete("fresh")
        assert_kv_landed(cache, blocks, num_tokens, _kv(5, num_tokens))
        assert server.num_peers == 1, "the dead peer's connection and process group were not dropped"
        await server.close()

    run_bounded(body(), 90)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (one per NCCL rank)")
def test_nccl_moves_bfloat16_between_two_gpus_in_place_and_bundled():
    async def body():
        server = get_transport("nccl").make_server(token=TOKEN)
        await server.start("127.0.0.1")
        heads, head_dim, block_size = 8, 128, 16  # Llama-3-8B blocks: 64 KiB in bf16
        cache = [t.to("cuda:1") for t in make_cache(3, 160, block_size, heads, head_dim, dtype=torch.bfloat16)]
        receiver = KVReceiver(server, cache, block_size, checksum=True)
        # A run of 70 blocks (4.4 MiB: sent alone, in place) and single blocks (bundled, scattered on GPU 1).
        blocks = list(range(10, 80)) + [150, 3, 97, 120]
        num_tokens = len(blocks) * block_size - 5
        info = receiver.reserve("gpu", blocks, num_tokens, lease_s=60)
        peer = Peer(TOKEN, transport="nccl", device="cuda:0")
        try:
            replies = await peer.call(("push", [job(info, 12)]), timeout_s=120)
            assert replies[0][0] == "ok", replies
            await receiver.wait_complete("gpu")
        finally:
            peer.stop()
        kv = make_kv(12, 3, num_tokens, heads, head_dim, dtype=torch.bfloat16)
        assert_kv_landed([t.cpu() for t in cache], blocks, num_tokens, kv)
        assert_untouched([t.cpu() for t in cache], [b for b in range(160) if b not in blocks])
        await server.close()

    run_bounded(body(), 180)
