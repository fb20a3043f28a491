"""The per-request protocol (KVReceiver / KVSender) over the in-process transport."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import threading
import time

import pytest
import torch

from kv_transfer import KVReceiver, KVSender, TransferAborted, get_transport
from kv_transfer.checksum import checksum_tensor, layer_checksum
from kv_transfer.errors import AuthenticationError
from kv_transfer.layout import pack_chunks
from kv_transfer.local_transport import LocalKVClient, LocalKVServer
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

TOKEN = "cluster-token"
NUM_LAYERS = 4
NUM_BLOCKS = 48
BLOCK_SIZE = 4


async def _pair(*, delivery_delay_s: float = 0.0, checksum: bool = False):
    server = LocalKVServer(token=TOKEN, delivery_delay_s=delivery_delay_s)
    await server.start()
    cache = make_cache(NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE)
    receiver = KVReceiver(server, cache, BLOCK_SIZE, checksum=checksum)
    sender = KVSender(LocalKVClient(token=TOKEN))
    return server, cache, receiver, sender


@pytest.mark.parametrize("checksum", [False, True])
def test_concurrent_requests_land_exactly_in_their_blocks(checksum):
    async def body():
        server, cache, receiver, sender = await _pair(checksum=checksum)
        num_tokens = [17, 9, 30]
        tables = shuffled_block_sets(7, NUM_BLOCKS, [blocks_needed(n, BLOCK_SIZE) + 1 for n in num_tokens])
        infos = [receiver.reserve(f"req-{i}", t, n, lease_s=10) for i, (t, n) in enumerate(zip(tables, num_tokens))]
        kvs = [make_kv(100 + i, NUM_LAYERS, n) for i, n in enumerate(num_tokens)]
        # Interleave layers of the three requests in a random order: tags must keep them apart.
        pushes = [(i, layer) for i in range(3) for layer in range(NUM_LAYERS)]
        random.Random(3).shuffle(pushes)
        for i, layer in pushes:
            await sender.push_layer(infos[i], layer, *kvs[i][layer])
        sent = await asyncio.gather(*(sender.finish(info) for info in infos))
        landed = await asyncio.gather(*(receiver.wait_complete(info.request_id) for info in infos))
        for i in range(3):
            assert_kv_landed(cache, tables[i], num_tokens[i], kvs[i])
            assert landed[i].num_bytes == sent[i].num_bytes > 0
        assert_untouched(cache, sorted(set(range(NUM_BLOCKS)) - {b for t in tables for b in t[:-1]}))
        assert receiver.num_pending == 0 and sender.num_pending == 0
        await server.close()

    run_bounded(body(), 20)


def test_reservation_info_is_picklable_and_describes_the_cache():
    import pickle

    async def body():
        server, cache, receiver, _ = await _pair()
        info = receiver.reserve("r", [3, 4, 9], 10, lease_s=5)
        assert pickle.loads(pickle.dumps(info)) == info
        assert (info.num_layers, info.num_kv_heads, info.head_dim, info.dtype) == (NUM_LAYERS, 2, 4, "float32")
        assert info.address == server.address and info.block_ids == (3, 4, 9)
        await receiver.abort("r")
        await server.close()

    run_bounded(body(), 10)


def test_wrong_token_is_refused_and_logged(caplog):
    async def body():
        server, _, receiver, _ = await _pair()
        info = receiver.reserve("r", [0, 1], 5, lease_s=5)
        intruder = KVSender(LocalKVClient(token="not-the-token"))
        with pytest.raises(AuthenticationError, match="wrong cluster token"):
            await intruder.connect(server.address)
        for layer, (k, v) in enumerate(make_kv(1, NUM_LAYERS, 5)):
            await intruder.push_layer(info, layer, k, v)
        with pytest.raises(TransferAborted, match="wrong cluster token"):
            await intruder.finish(info)
        assert receiver.is_pending("r")  # nothing landed
        await receiver.abort("r")
        await server.close()

    with caplog.at_level(logging.WARNING, logger="kv_transfer"):
        run_bounded(body(), 10)
    assert any("refused peer" in r.getMessage() for r in caplog.records)


def test_abort_waits_for_writes_under_way_then_blocks_are_reusable_at_once():
    async def body():
        server, cache, receiver, sender = await _pair(delivery_delay_s=0.2)
        blocks = [10, 11, 3, 4, 5]
        num_tokens = 18
        old_kv = make_kv(1, NUM_LAYERS, num_tokens)
        old = receiver.reserve("old", blocks, num_tokens, lease_s=10)
        waiter = asyncio.create_task(receiver.wait_complete("old"))
        await sender.push_layer(old, 0, *old_kv[0])
        # Wait until layer 0's first chunk is claimed and "on the wire" (0.2 s) (test peeks at the table).
        while old.transfer_id not in server._table._transfers or not server._table._transfers[old.transfer_id].num_inflight:
            await asyncio.sleep(0.001)

        assert await receiver.abort("old") is True
        with pytest.raises(TransferAborted, match="aborted by the decode replica"):
            await waiter
        # The write under way finished before abort returned, and nothing lands afterwards.
        assert not torch.all(cache[0][blocks[0]] == SENTINEL)
        snapshot = [t.clone() for t in cache]
        await asyncio.sleep(0.3)
        assert all(torch.equal(a, b) for a, b in zip(cache, snapshot))

        # Late layers of the aborted request: dropped, nothing lands.
        for layer in range(1, NUM_LAYERS):
            await sender.push_layer(old, layer, *old_kv[layer])
        await sender.finish(old)
        assert all(torch.equal(a, b) for a, b in zip(cache, snapshot))

        # The same blocks, reserved again right away, get exactly the new request's data.
        new_kv = make_kv(2, NUM_LAYERS, num_tokens)
        new = receiver.reserve("new", blocks, num_tokens, lease_s=10)
        assert new.transfer_id != old.transfer_id
        for layer in range(NUM_LAYERS):
            await sender.push_layer(new, layer, *new_kv[layer])
        await sender.finish(new)
        await receiver.wait_complete("new")
        assert_kv_landed(cache, blocks, num_tokens, new_kv)
        assert await receiver.abort("new") is False  # already complete: nothing to abort
        await server.close()

    run_bounded(body(), 20)


def test_lease_expiry_aborts_within_the_bound():
    async def body():
        server, cache, receiver, sender = await _pair()
        kv = make_kv(5, NUM_LAYERS, 6)
        started = time.monotonic()
        info = receiver.reserve("slow", [1, 2], 6, lease_s=0.3)
        await sender.push_layer(info, 0, *kv[0])  # only one layer ever comes
        with pytest.raises(TransferAborted, match="lease of 0.3s expired"):
            await receiver.wait_complete("slow")
        assert 0.3 <= time.monotonic() - started < 0.3 + 0.5
        assert not receiver.is_pending("slow")
        # The rest arriving late lands nowhere.
        snapshot = [t.clone() for t in cache]
        for layer in range(1, NUM_LAYERS):
            await sender.push_layer(info, layer, *kv[layer])
        await sender.finish(info)
        assert all(torch.equal(a, b) for a, b in zip(cache, snapshot))
        await server.close()

    run_bounded(body(), 10)


def test_layout_mismatch_fails_the_transfer():
    async def body():
        server, cache, receiver, sender = await _pair()
        info = receiver.reserve("r", [0, 1, 2], 12, lease_s=5)
        wrong = dataclasses.replace(info, block_ids=(0, 1, 3))  # a sender with another block table
        for layer, (k, v) in enumerate(make_kv(3, NUM_LAYERS, 12)):
            await sender.push_layer(wrong, layer, k, v)
        await sender.finish(wrong)
        with pytest.raises(TransferAborted, match="disagree on layout"):
            await receiver.wait_complete("r")
        await server.close()

    run_bounded(body(), 10)


def test_checksum_detects_a_corrupted_layer():
    async def body():
        server, cache, receiver, sender = await _pair(checksum=True)
        info = receiver.reserve("r", [4, 5, 7], 10, lease_s=5)
        kv = make_kv(4, NUM_LAYERS, 10)
        client = LocalKVClient(token=TOKEN)
        for layer in range(NUM_LAYERS):  # what KVSender does, plus a bit flip in layer 2 after the checksum
            chunks = pack_chunks(*kv[layer], info.chunks(), BLOCK_SIZE)
            checksum = layer_checksum(chunks)
            if layer == 2:
                chunks[1].view(-1)[3] += 1.0
            await client.send(info.address, info.transfer_id, layer, chunks + [checksum_tensor(checksum)])
        with pytest.raises(TransferAborted, match="checksum mismatch in layer 2"):
            await receiver.wait_complete("r")
        await server.close()

    run_bounded(body(), 10)


def test_a_chunk_sent_twice_fails_the_transfer():
    async def body():
        server, cache, receiver, sender = await _pair()
        info = receiver.reserve("r", [0, 1], 8, lease_s=5)
        kv = make_kv(6, NUM_LAYERS, 8)
        client = LocalKVClient(token=TOKEN)
        chunks = pack_chunks(*kv[0], info.chunks(), BLOCK_SIZE)
        await client.send(info.address, info.transfer_id, 0, chunks)
        await client.send(info.address, info.transfer_id, 0, chunks)
        with pytest.raises(TransferAborted, match="arrived twice"):
            await receiver.wait_complete("r")
        await server.close()

    run_bounded(body(), 10)


def test_finish_reports_layers_never_pushed_and_sender_validates_inputs():
    async def body():
        server, cache, receiver, sender = await _pair()
        info = receiver.reserve("r", [0, 1], 8, lease_s=5)
        kv = make_kv(7, NUM_LAYERS, 8)
        with pytest.raises(ValueError, match="shape"):
            await sender.push_layer(info, 0, kv[0][0][:7], kv[0][1][:7])
        with pytest.raises(ValueError, match="float64"):
            await sender.push_layer(info, 0, kv[0][0].double(), kv[0][1].double())
        with pytest.raises(ValueError, match="outside"):
            await sender.push_layer(info, NUM_LAYERS, *kv[0])
        await sender.push_layer(info, 0, *kv[0])
        with pytest.raises(ValueError, match="already pushed"):
            await sender.push_layer(info, 0, *kv[0])
        with pytest.raises(TransferAborted, match=r"layers \[1, 2, 3\] were never pushed"):
            await sender.finish(info)
        await receiver.abort("r")
        await server.close()

    run_bounded(body(), 10)


def test_reserve_validates_its_arguments():
    async def body():
        server, cache, receiver, _ = await _pair()
        receiver.reserve("r", [0, 1], 8, lease_s=5)
        with pytest.raises(ValueError, match="already has a pending reservation"):
            receiver.reserve("r", [2, 3], 8, lease_s=5)
        with pytest.raises(ValueError, match=r"block ids must be in \[0, 48\)"):
            receiver.reserve("x", [0, NUM_BLOCKS], 8, lease_s=5)
        with pytest.raises(ValueError, match="lease_s"):
            receiver.reserve("y", [4, 5], 8, lease_s=0)
        with pytest.raises(ValueError, match="need 2 blocks"):
            receiver.reserve("z", [6], 8, lease_s=5)
        await receiver.close()
        assert receiver.num_pending == 0
        await server.close()

    run_bounded(body(), 10)


def test_layers_pushed_from_a_compute_thread_while_the_server_lives_on_another_loop():
    """The prefill's layer hook runs on a compute thread and hands each layer to the sender's loop; the
    decode side runs its own loop in another thread."""
    server_loop = asyncio.new_event_loop()
    server_thread = threading.Thread(target=server_loop.run_forever, daemon=True)
    server_thread.start()
    try:
        server = get_transport("local").make_server(token=TOKEN)
        cache = make_cache(NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE)

        async def decode_setup():
            await server.start()
            receiver = KVReceiver(server, cache, BLOCK_SIZE)
            return receiver, receiver.reserve("r", [8, 9, 2, 30], 13, lease_s=10)

        receiver, info = asyncio.run_coroutine_threadsafe(decode_setup(), server_loop).result(5)
        kv = make_kv(8, NUM_LAYERS, 13)

        async def prefill():
            sender = KVSender(get_transport("local").make_client(token=TOKEN))
            loop = asyncio.get_running_loop()

            def compute():  # the model's forward: hand each layer over without waiting for the network
                for layer, (k, v) in enumerate(kv):
                    asyncio.run_coroutine_threadsafe(sender.push_layer(info, layer, k, v), loop)

            await asyncio.to_thread(compute)
            await asyncio.sleep(0)  # let the last handed-over push start before finish
            return await sender.finish(info)

        sent = run_bounded(prefill(), 10)
        landed = asyncio.run_coroutine_threadsafe(receiver.wait_complete("r"), server_loop).result(5)
        assert landed.num_bytes == sent.num_bytes
        assert_kv_landed(cache, [8, 9, 2, 30], 13, kv)
        asyncio.run_coroutine_threadsafe(server.close(), server_loop).result(5)
    finally:
        server_loop.call_soon_threadsafe(server_loop.stop)
        server_thread.join(5)
