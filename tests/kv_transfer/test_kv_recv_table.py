"""Receive bookkeeping shared by the transports: what may be written where, and when a cancel is safe."""

from __future__ import annotations

import asyncio

import pytest
import torch

from kv_transfer.errors import CancelIncomplete, TransferAborted
from kv_transfer.layout import pack_chunks
from kv_transfer.local_transport import LocalKVClient, LocalKVServer
from kv_transfer.recv_table import RecvTable
from kv_transfer.session import KVReceiver
from kv_transfer.transport import TransportOptions
from kv_transfer.wire import ChunkKey
from kv_test_helpers import make_cache, run_bounded


def _key(transfer_id, layer, chunk):
    return ChunkKey(transfer_id=transfer_id, layer=layer, chunk=chunk)


def test_a_transfer_completes_when_every_chunk_landed_and_then_accepts_nothing():
    async def body():
        table = RecvTable(cancel_timeout_s=1)
        dst = [[torch.zeros(4), torch.zeros(2)], [torch.zeros(4), torch.zeros(2)]]
        future = table.post(5, dst)
        for layer in range(2):
            for chunk, size in ((0, 16), (1, 8)):
                assert table.claim(_key(5, layer, chunk), size) is dst[layer][chunk]
                assert not future.done()
                table.landed(_key(5, layer, chunk), size)
        assert await future == 48
        assert table.num_live == 0
        assert table.claim(_key(5, 0, 0), 16) is None  # a late duplicate is dropped
        assert table.new_transfer_id() != 5  # recently ended ids are not handed out again

    run_bounded(body(), 5)


def test_a_failed_chunk_fails_the_transfer_at_once():
    async def body():
        table = RecvTable(cancel_timeout_s=1)
        future = table.post(1, [[torch.zeros(4), torch.zeros(4)]])
        table.claim(_key(1, 0, 0), 16)
        table.claim(_key(1, 0, 1), 16)
        table.chunk_failed(_key(1, 0, 0), "UCXXCanceledError: peer died")
        with pytest.raises(TransferAborted, match="chunk 0 of layer 0 failed: UCXXCanceledError"):
            await future
        assert table.num_live == 1  # chunk 1 is still being written: the entry stays until it finishes
        cancel = asyncio.create_task(table.cancel(1))
        await asyncio.sleep(0.01)
        assert not cancel.done()
        table.landed(_key(1, 0, 1), 16)
        await cancel
        assert table.num_live == 0

    run_bounded(body(), 5)


def test_unknown_transfers_and_out_of_range_chunks_are_not_written():
    async def body():
        table = RecvTable(cancel_timeout_s=1)
        future = table.post(2, [[torch.zeros(4)]])
        assert table.claim(_key(3, 0, 0), 16) is None
        assert table.claim(_key(2, 1, 0), 16) is None
        with pytest.raises(TransferAborted, match="layouts differ"):
            await future
        with pytest.raises(ValueError, match="not contiguous"):
            table.post(4, [[torch.zeros(4, 4).t()]])

    run_bounded(body(), 5)


def test_abort_raises_cancel_incomplete_when_writes_outlive_the_bound():
    async def body():
        server = LocalKVServer(token="t", options=TransportOptions(cancel_timeout_s=0.05), delivery_delay_s=0.5)
        await server.start()
        cache = make_cache(1, 8, 4)
        receiver = KVReceiver(server, cache, 4)
        info = receiver.reserve("r", [0, 1], 8, lease_s=5)
        chunks = pack_chunks(torch.ones(8, 2, 4), torch.ones(8, 2, 4), info.chunks(), 4)
        send = asyncio.create_task(LocalKVClient(token="t").send(info.address, info.transfer_id, 0, chunks))
        await asyncio.sleep(0.05)
        with pytest.raises(CancelIncomplete, match="do not reuse its blocks"):
            await receiver.abort("r")
        assert not receiver.is_pending("r")
        await send
        await server.close()

    run_bounded(body(), 5)
