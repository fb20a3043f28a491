"""The `nccl` transport: torch.distributed point-to-point (Gloo on host tensors here, NCCL in the gpu test).

Here: both sides on one loop with both message kinds (in place and bundled), and two GPUs. The cross-process
behaviour every transport shares (concurrency, token, abort and reuse, lease, peer death) is in
test_kv_transports.py.
"""

from __future__ import annotations

import pytest
import torch

import kv_transfer.nccl_wire as nccl_wire
from kv_test_helpers import assert_kv_landed, assert_untouched, make_cache, make_kv, run_bounded
from kv_transfer import KVReceiver, KVSender, get_transport
from kv_ucx_peer import Peer, job

TOKEN = "nccl-test-token"
NUM_LAYERS = 4
NUM_BLOCKS = 96
BLOCK_SIZE = 4
NUM_HEADS = 2
HEAD_DIM = 64  # 4 KiB per block in float32


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
