"""What every KV transport must do, run against each real one (`ucx`: ucxx over TCP / shared memory on
127.0.0.1; `nccl`: torch.distributed point-to-point, Gloo on host tensors here).

The decode side (KVReceiver on the transport's server) runs in the test process; the prefill side runs in separate
OS processes (kv_ucx_peer) so that the transfer really spans two processes and peer death is real. Transport-specific
tests (one loop holding both sides, GPUs) stay in test_kv_ucx.py and test_kv_nccl.py.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import torch

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
from kv_transfer import KVReceiver, TransferAborted, TransportOptions, get_transport
from kv_ucx_peer import Peer, job

TOKEN = "transport-test-token"
NUM_LAYERS = 4
NUM_BLOCKS = 96
BLOCK_SIZE = 4
NUM_HEADS = 2
HEAD_DIM = 64  # 4 KiB per block in float32 (ucx: single blocks go eagerly, runs of blocks by rendezvous)


@pytest.fixture(scope="module", params=["ucx", "nccl"])
def peer(request):
    peer = Peer(TOKEN, transport=request.param)
    peer.transport = request.param
    yield peer
    peer.stop()
    assert peer.process.exitcode == 0, "the peer process did not shut down cleanly"


async def _start_decode(transport: str, *, checksum: bool = False):
    server = get_transport(transport).make_server(token=TOKEN, options=TransportOptions(cancel_timeout_s=5.0))
    await server.start("127.0.0.1")
    cache = make_cache(NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, NUM_HEADS, HEAD_DIM)
    return server, cache, KVReceiver(server, cache, BLOCK_SIZE, checksum=checksum)


def _kv(seed, num_tokens):
    return make_kv(seed, NUM_LAYERS, num_tokens, NUM_HEADS, HEAD_DIM)


@pytest.mark.slow
def test_concurrent_requests_land_bitwise_in_their_blocks(peer):
    async def body():
        server, cache, receiver = await _start_decode(peer.transport, checksum=True)
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
def test_wrong_token_is_refused_and_logged(peer, caplog):
    async def body():
        server, _, _ = await _start_decode(peer.transport)
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
def test_abort_mid_transfer_then_the_same_blocks_get_only_the_new_request(peer):
    async def body():
        server, cache, receiver = await _start_decode(peer.transport)
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
def test_lease_expiry_aborts_within_the_bound(peer):
    async def body():
        server, cache, receiver = await _start_decode(peer.transport)
        # Warm the pair up first (nccl builds its process group on the first send), so the lease measures the
        # transfer only.
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
def test_sender_killed_mid_transfer_ends_by_lease_and_the_server_keeps_serving(peer):
    async def body():
        server, cache, receiver = await _start_decode(peer.transport)
        doomed = Peer(TOKEN, transport=peer.transport)
        try:
            # Process start-up (torch, ucxx imports) must not eat into the lease: wait until it is connected.
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
