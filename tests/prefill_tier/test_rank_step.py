"""One prefill step on a one-rank mesh, through the same code every rank of a multi-rank replica runs: the forward,
the layer hook shipping each request's rows into a decode replica's reservation (local transport), the first token.
Then the decode engine continues from the shipped KV: the whole stream equals greedy decoding without any cache."""

from __future__ import annotations

import asyncio

import pytest
import torch

from decode_tier.engine import DecodeEngine
from kv_transfer.local_transport import LocalTransport
from kv_transfer.mesh_layout import DecodeLayout, PrefillLayout
from kv_transfer.mesh_session import MeshReservation, RankKVReceiver, RankKVSender
from mesh.model import AttentionBatch, CausalLM
from mesh.presets import make_model
from mesh.sampling import SamplingParams
from prefill_tier.rank_step import PrefillRankCore, PrefillStep

TOKEN = "t"
BLOCK_SIZE = 4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return CausalLM.load(make_model(tmp_path_factory.mktemp("m") / "tiny-llama", "tiny-llama", seed=3))


def _greedy(model: CausalLM, prompt: list[int], num_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(num_tokens):
        batch = AttentionBatch([len(tokens)], [0], None, torch.tensor([len(tokens) - 1]))
        tokens.append(int(model(torch.tensor(tokens), torch.arange(len(tokens)), batch).argmax(-1)))
    return tokens[len(prompt):]


@pytest.mark.parametrize("layerwise", [True, False])
def test_prefill_step_ships_kv_and_decode_continues_exactly(model, loop, layerwise):
    config = model.config
    src = PrefillLayout(num_layers=config.num_layers, num_kv_heads=config.num_kv_heads)
    dst = DecodeLayout(num_layers=config.num_layers, num_kv_heads=config.num_kv_heads, block_size=BLOCK_SIZE)
    engine = DecodeEngine(model, num_blocks=32, block_size=BLOCK_SIZE, max_num_seqs=4)
    prompts = [[5, 9, 200, 31, 7, 7, 64], [100, 3, 18]]
    params = SamplingParams(max_tokens=6, ignore_eos=True)

    async def decode_side():
        server = LocalTransport.make_server(token=TOKEN)
        await server.start()
        receiver = RankKVReceiver(server, engine.kv_cache, dst, 0)
        infos = []
        for i, prompt in enumerate(prompts):
            block_ids = engine.reserve(f"r{i}", len(prompt), params)
            target = receiver.post(f"r{i}", src, block_ids, len(prompt), lease_s=30)
            infos.append(MeshReservation(request_id=f"r{i}", num_tokens=len(prompt), block_ids=tuple(block_ids),
                                         src=src, dst=dst, head_dim=config.head_dim, dtype="float32",
                                         targets=(target,)))
        return receiver, infos

    receiver, infos = asyncio.run_coroutine_threadsafe(decode_side(), loop).result(10)
    sender = RankKVSender(LocalTransport.make_client(token=TOKEN), src, 0)
    core = PrefillRankCore(model, sender, loop, layerwise=layerwise)
    # The second request ships nothing (as with max_tokens == 1): it still gets its first token.
    step = PrefillStep(request_ids=("r0", "r1", "x"), prompts=tuple(map(tuple, prompts + [[1, 2]])),
                       params=(params,) * 3, reservations=(infos[0], infos[1], None))
    outcome = core.run(step)
    assert outcome.failure is None and not outcome.errors, outcome
    assert outcome.first_tokens == [_greedy(model, p, 1)[0] for p in prompts + [[1, 2]]]
    assert outcome.kv_bytes["r0"] > 0 and outcome.kv_bytes["r1"] > 0 and "x" not in outcome.kv_bytes
    for i in range(2):
        asyncio.run_coroutine_threadsafe(receiver.wait_complete(f"r{i}"), loop).result(10)
        assert engine.admit(f"r{i}", prompts[i], outcome.first_tokens[i]) is None
    streams = {f"r{i}": [outcome.first_tokens[i]] for i in range(2)}
    while engine.has_work():
        for output in engine.step():
            streams[output.request_id].append(output.token_id)
    for i, prompt in enumerate(prompts):
        assert streams[f"r{i}"] == _greedy(model, prompt, params.max_tokens)


def test_kv_sends_wait_no_longer_than_the_decode_lease():
    from types import SimpleNamespace

    from prefill_tier.rank_step import FINISH_TIMEOUT_S, finish_timeout_s

    assert finish_timeout_s(SimpleNamespace(lease_s=5.0)) == 5.0
    assert finish_timeout_s(SimpleNamespace(lease_s=10 * FINISH_TIMEOUT_S)) == FINISH_TIMEOUT_S
    assert finish_timeout_s(SimpleNamespace(lease_s=None)) == finish_timeout_s(SimpleNamespace()) == FINISH_TIMEOUT_S
