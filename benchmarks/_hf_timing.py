"""Hugging Face transformers on the same weights and workloads, for the ratio in benchmarks/engine_speed.py.

The transformers model is built on the meta device and handed row-slice views of the fast path's fused weights
(`mesh.gpu_weights.checkpoint_views`), so both run on the very same memory. Timings go through `generate` with
sdpa attention in bf16: per-token times come from a logits processor that synchronises and stamps the clock once
per generated token (the first stamp closes the prefill), so one `generate` call gives both the time to the first
token and the time per output token.
"""

from __future__ import annotations

import statistics
import time

import torch


def build_hf_model(hf_config: dict, views: dict[str, torch.Tensor], *, device: str = "cuda",
                   dtype: torch.dtype = torch.bfloat16):
    import transformers

    config = transformers.AutoConfig.for_model(**{k: v for k, v in hf_config.items() if k != "architectures"})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.load_state_dict(views, assign=True, strict=False)
    # Non-persistent buffers (rotary frequencies) are not in a state dict: rebuild them on the device.
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config).to(device)
    model.tie_weights()
    meta = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise RuntimeError(f"transformers model left parameters on the meta device: {meta[:3]}")
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    return model.eval()


class _Stamps:
    """A logits processor that records when each generated token's logits are ready."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        _synchronize()
        self.times.append(time.perf_counter())
        return scores


def hf_generate_timing(model, *, batch: int, context: int, new_tokens: int, vocab: int) -> dict:
    """generate(do_sample=False) on random prompts [batch, context]: ms to the first token and median ms per
    later token."""
    from transformers import LogitsProcessorList

    ids = torch.randint(0, vocab, (batch, context), device=model.device)
    stamps = _Stamps()
    _synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                       logits_processor=LogitsProcessorList([stamps]))
    _synchronize()
    steps = [b - a for a, b in zip(stamps.times, stamps.times[1:])]
    return {"ttft_ms": (stamps.times[0] - start) * 1e3,
            "tpot_ms": statistics.median(steps) * 1e3 if steps else float("nan"),
            "num_tokens": len(stamps.times)}


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
