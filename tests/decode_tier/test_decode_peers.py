"""The engine's side of a multi-rank decode replica: every step's plan goes to the peers before the forward, the
tokens come from whichever rank holds the logits, and a failed forward still takes part in the exchange (so the
other ranks stay in step) before the step fails with the forward's own error."""

from __future__ import annotations

import pytest

from decode_tier.engine import DecodeEngine
from mesh.model import CausalLM
from mesh.presets import make_model
from mesh.sampling import SamplingParams


class RecordingPeers:
    def __init__(self, holds_logits: bool, tokens_from_elsewhere=None):
        self.holds_logits = holds_logits
        self.plans, self.shared = [], []
        self._tokens = tokens_from_elsewhere

    def share_plan(self, plan):
        self.plans.append(plan)

    def share_tokens(self, sampled):
        self.shared.append(sampled)
        if self.holds_logits:
            if sampled is None:
                raise RuntimeError("no tokens")
            return sampled
        return self._tokens(self.plans[-1])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return CausalLM.load(make_model(tmp_path_factory.mktemp("m") / "tiny-llama", "tiny-llama", seed=5))


def _engine(model, peers):
    engine = DecodeEngine(model, num_blocks=8, block_size=4, max_num_seqs=2, peers=peers)
    engine.reserve("a", 3, SamplingParams(max_tokens=3, ignore_eos=True))
    engine.admit("a", [4, 5, 6], 7)
    return engine


def test_plan_goes_out_and_tokens_come_back(model):
    peers = RecordingPeers(holds_logits=True)
    engine = _engine(model, peers)
    outputs = engine.step()
    assert len(peers.plans) == 1 and peers.plans[0].request_ids == ("a",)
    assert peers.shared == [[outputs[0].token_id]]


def test_tokens_from_the_logits_rank_win(model):
    peers = RecordingPeers(holds_logits=False, tokens_from_elsewhere=lambda plan: [42] * len(plan))
    engine = _engine(model, peers)
    assert [o.token_id for o in engine.step()] == [42]
    assert peers.shared == [None]  # rank 0 does not sample when another rank holds the logits


def test_failed_forward_still_exchanges_then_fails(model):
    peers = RecordingPeers(holds_logits=True)
    engine = _engine(model, peers)

    def broken(plan, *, sample_tokens=True):
        raise RuntimeError("device lost")

    engine.runner.run = broken
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step()
    assert peers.shared == [None]
    assert engine.num_running == 1  # the step was cancelled, the sequence is intact
    del engine.runner.run
    assert len(engine.step()) == 1 and len(peers.plans) == 2
