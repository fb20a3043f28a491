"""UCX transfer between two Ray async actors, the way the tiers use it: the decode actor owns the cache and the
server, the prefill actor pushes layers from a compute thread into its actor loop."""

from __future__ import annotations

import asyncio
import os

import pytest
import ray

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
SHAPE = dict(num_layers=3, num_blocks=32, block_size=4, num_heads=2, head_dim=16)


@ray.remote(num_cpus=0.5)
class DecodeSide:
    def __init__(self):
        from kv_test_helpers import make_cache

        self.cache = make_cache(SHAPE["num_layers"], SHAPE["num_blocks"], SHAPE["block_size"], SHAPE["num_heads"],
                                SHAPE["head_dim"])

    async def start(self) -> str:  # ucxx must first be used on the actor's event loop, not in __init__
        from kv_transfer import KVReceiver, get_transport

        self.server = get_transport("ucx").make_server(token="ray-test")
        address = await self.server.start("127.0.0.1")
        self.receiver = KVReceiver(self.server, self.cache, SHAPE["block_size"])
        return address

    async def reserve(self, request_id, block_ids, num_tokens):
        return self.receiver.reserve(request_id, block_ids, num_tokens, lease_s=20)

    async def wait_complete(self, request_id):
        return await self.receiver.wait_complete(request_id)

    def landed_exactly(self, block_ids, num_tokens, seed) -> bool:
        from kv_test_helpers import assert_kv_landed, make_kv

        kv = make_kv(seed, SHAPE["num_layers"], num_tokens, SHAPE["num_heads"], SHAPE["head_dim"])
        assert_kv_landed(self.cache, block_ids, num_tokens, kv)
        return True

    async def close(self):
        await self.server.close()


@ray.remote(num_cpus=0.5)
class PrefillSide:
    async def prefill(self, info, seed):
        from kv_test_helpers import make_kv
        from kv_transfer import KVSender, get_transport

        self.client = get_transport("ucx").make_client(token="ray-test")
        sender = KVSender(self.client)
        kv = make_kv(seed, info.num_layers, info.num_tokens, info.num_kv_heads, info.head_dim)
        loop = asyncio.get_running_loop()

        def forward():  # stands in for the model's layer hook on the compute thread
            for layer, (k, v) in enumerate(kv):
                asyncio.run_coroutine_threadsafe(sender.push_layer(info, layer, k, v), loop).result()

        await asyncio.to_thread(forward)
        stats = await sender.finish(info, timeout_s=20)
        await self.client.close()
        return stats


@pytest.mark.slow
def test_ucx_between_two_ray_async_actors(ray_local):
    # The session shares one local Ray (tests/conftest.py); these actors also import this test folder's helpers.
    pythonpath = os.pathsep.join([REPO_ROOT, HERE, os.environ.get("PYTHONPATH", "")])
    env = {"env_vars": {"PYTHONPATH": pythonpath}}
    decode = DecodeSide.options(runtime_env=env).remote()
    prefill = PrefillSide.options(runtime_env=env).remote()
    try:
        ray.get(decode.start.remote(), timeout=60)
        blocks, num_tokens = [5, 6, 1, 20, 21], 18
        info = ray.get(decode.reserve.remote("r1", blocks, num_tokens), timeout=30)
        landed = decode.wait_complete.remote("r1")
        sent = ray.get(prefill.prefill.remote(info, 3), timeout=60)
        assert ray.get(landed, timeout=30).num_bytes == sent.num_bytes > 0
        assert ray.get(decode.landed_exactly.remote(blocks, num_tokens, 3), timeout=30)
        ray.get(decode.close.remote(), timeout=30)
    finally:
        ray.kill(decode)
        ray.kill(prefill)
