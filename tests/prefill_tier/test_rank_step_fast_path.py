"""The prefill rank step on mesh.gpu_decoder's fast path (GpuDecoder.prefill) against the CausalLM path: the same
first tokens and the same per-layer K/V handed to the KV sender, request by request. On the CPU the fast path runs
with the plain-torch ops in float32 (forced: by default it applies on one CUDA rank only); the `gpu` test runs the
default choice in bf16 on CUDA (Triton ops, varlen flash attention)."""

from __future__ import annotations

import types

import pytest
import torch

from kv_transfer.mesh_layout import PrefillLayout
from mesh.model import CausalLM
from mesh.presets import make_model
from mesh.sampling import SamplingParams
from prefill_tier.rank_step import PrefillRankCore, PrefillStep, is_fast_path_model


class _RecordingSender:
    """Stands in for RankKVSender: keeps every pushed layer (copied when it is pushed) and reports its bytes."""

    def __init__(self, layout: PrefillLayout) -> None:
        self.rank, self.layout = 0, layout
        self.pushed: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    async def push_layer(self, info, layer, k, v) -> None:
        assert (info.request_id, layer) not in self.pushed, "a layer was pushed twice"
        self.pushed[(info.request_id, layer)] = (k.float().cpu().clone(), v.float().cpu().clone())

    async def finish(self, info, timeout_s):
        num_bytes = sum(k.numel() + v.numel() for (rid, _), (k, v) in self.pushed.items() if rid == info.request_id)
        return types.SimpleNamespace(num_bytes=num_bytes)


def _step(model: CausalLM, prompts: list[list[int]], shipping: list[bool]) -> PrefillStep:
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    infos = tuple(types.SimpleNamespace(request_id=f"r{i}") if ships else None for i, ships in enumerate(shipping))
    return PrefillStep(request_ids=tuple(f"r{i}" for i in range(len(prompts))), prompts=tuple(map(tuple, prompts)),
                       params=(params,) * len(prompts), reservations=infos)


def _run_both(model: CausalLM, loop, prompts, shipping):
    layout = PrefillLayout(num_layers=model.config.num_layers, num_kv_heads=model.config.num_kv_heads)
    outcomes, senders, cores = [], [], []
    for fast in (False, True):
        sender = _RecordingSender(layout)
        core = PrefillRankCore(model, sender, loop, fast_path=fast)
        outcomes.append(core.run(_step(model, prompts, shipping)))
        senders.append(sender)
        cores.append(core)
    return outcomes, senders, cores


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("layerwise_variant", ["tiny-llama", "tiny-qwen2"])
def test_fast_path_ships_the_same_kv_and_first_tokens_on_cpu(tmp_path, loop, layerwise_variant):
    model = CausalLM.load(make_model(tmp_path / layerwise_variant, layerwise_variant, seed=11))
    assert not is_fast_path_model(model)  # CPU: the CausalLM path unless asked
    prompts = [[5, 9, 200, 31, 7, 7, 64, 3, 3], [100, 3, 18], [1, 2]]
    (reference, fast), (ref_sender, fast_sender), (ref_core, fast_core) = _run_both(model, loop, prompts,
                                                                                    [True, True, False])
    assert ref_core.fast_path is None and fast_core.fast_path is not None
    assert fast.failure is None and not fast.errors, fast
    assert fast.first_tokens == reference.first_tokens
    assert fast.kv_bytes == reference.kv_bytes and set(fast.kv_bytes) == {"r0", "r1"}
    assert set(fast_sender.pushed) == set(ref_sender.pushed) == {(f"r{i}", layer) for i in range(2)
                                                                  for layer in range(model.config.num_layers)}
    for key, (k_ref, v_ref) in ref_sender.pushed.items():
        k, v = fast_sender.pushed[key]
        assert k.shape == k_ref.shape == (len(prompts[int(key[0][1:])]), model.config.num_kv_heads,
                                          model.config.head_dim)
        torch.testing.assert_close(k, k_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fast_path_is_the_default_on_one_cuda_rank_and_matches_in_bf16(tmp_path, loop):
    model = CausalLM.load(make_model(tmp_path / "m", "tiny-llama", seed=11,
                                     overrides={"tie_word_embeddings": True, "hidden_size": 512,
                                                "intermediate_size": 1536, "num_attention_heads": 8,
                                                "num_key_value_heads": 2, "vocab_size": 2048}),
                          dtype=torch.bfloat16, device="cuda")
    assert is_fast_path_model(model)
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 2048, (n,), generator=generator).tolist() for n in (300, 41, 128)]
    layout = PrefillLayout(num_layers=model.config.num_layers, num_kv_heads=model.config.num_kv_heads)
    default_core = PrefillRankCore(model, _RecordingSender(layout), loop)
    assert default_core.fast_path is not None and default_core.fast_path.ops.name == "triton"
    (reference, fast), (ref_sender, fast_sender), _ = _run_both(model, loop, prompts, [True, False, True])
    assert fast.failure is None and not fast.errors, fast
    assert fast.first_tokens == reference.first_tokens
    assert set(fast_sender.pushed) == set(ref_sender.pushed)
    for key, (k_ref, v_ref) in ref_sender.pushed.items():
        k, v = fast_sender.pushed[key]
        assert _rel(k, k_ref) < 2e-2 and _rel(v, v_ref) < 2e-2, key
