"""The real UCX transport (ucxx over TCP / shared memory on 127.0.0.1).

Here: one loop holding both sides, and CUDA memory on a GPU. The cross-process behaviour every transport shares
(concurrency, token, abort and reuse, lease, peer death) is in test_kv_transports.py.
"""

from __future__ import annotations

import pytest
import torch

from kv_test_helpers import assert_kv_landed, assert_untouched, make_cache, make_kv, run_bounded
from kv_transfer import KVReceiver, KVSender, get_transport

TOKEN = "ucx-test-token"
NUM_LAYERS = 4
NUM_BLOCKS = 96
BLOCK_SIZE = 4
NUM_HEADS = 2
HEAD_DIM = 64  # 4 KiB per block: single blocks go eagerly, runs of blocks by rendezvous (UCX_RNDV_THRESH=8192)


def test_ucx_in_one_process_carries_bfloat16():
    async def body():
        transport = get_transport("ucx")
        server = transport.make_server(token=TOKEN)
        address = await server.start("127.0.0.1")
        cache = make_cache(2, 16, BLOCK_SIZE, NUM_HEADS, HEAD_DIM, dtype=torch.bfloat16)
        receiver = KVReceiver(server, cache, BLOCK_SIZE, checksum=True)
        sender = KVSender(transport.make_client(token=TOKEN))
        info = receiver.reserve("bf16", [9, 10, 3], 10, lease_s=10)
        kv = make_kv(11, 2, 10, NUM_HEADS, HEAD_DIM, dtype=torch.bfloat16)
        for layer, (k, v) in enumerate(kv):
            await sender.push_layer(info, layer, k, v)
        sent = await sender.finish(info, timeout_s=10)
        landed = await receiver.wait_complete("bf16")
        assert address.startswith("ucx://127.0.0.1:")
        assert landed.num_bytes == sent.num_bytes
        assert_kv_landed(cache, [9, 10, 3], 10, kv)
        assert_untouched(cache, [b for b in range(16) if b not in (9, 10, 3)])
        await sender._client.close()
        await server.close()

    run_bounded(body(), 120)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_ucx_cuda_cache_receives_bfloat16_straight_into_device_blocks():
    async def body():
        transport = get_transport("ucx")
        server = transport.make_server(token=TOKEN)
        await server.start("127.0.0.1")
        cache = [t.cuda() for t in make_cache(3, 32, BLOCK_SIZE, NUM_HEADS, HEAD_DIM, dtype=torch.bfloat16)]
        receiver = KVReceiver(server, cache, BLOCK_SIZE, checksum=True)
        client = transport.make_client(token=TOKEN)
        sender = KVSender(client)
        blocks, num_tokens = [20, 21, 22, 4, 9], 19
        info = receiver.reserve("gpu", blocks, num_tokens, lease_s=90)
        kv = [(k.cuda(), v.cuda()) for k, v in make_kv(12, 3, num_tokens, NUM_HEADS, HEAD_DIM, dtype=torch.bfloat16)]
        for layer, (k, v) in enumerate(kv):
            await sender.push_layer(info, layer, k, v)
        await sender.finish(info)
        await receiver.wait_complete("gpu")
        assert_kv_landed(cache, blocks, num_tokens, kv)
        assert_untouched(cache, [b for b in range(32) if b not in blocks])
        await client.close()
        await server.close()

    run_bounded(body(), 150)
