"""The measured inputs of benchmarks/cp_scaling.py: which fused attention kernel is fastest (and right) on this GPU,
the point-to-point bandwidth between the two GPUs, the bf16 matrix rate, and a Llama-shaped model with random
weights drawn straight on the device.

Who calls it: benchmarks/cp_scaling.py, on each of its two rank processes.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from mesh.config import ModelConfig
from mesh.flash_block_attention import FlashBlockAttention
from mesh.model import CausalLM
from mesh.parallel import ParallelDims


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_s(fn, device: torch.device, *, repeats: int, warmup: int = 1) -> float:
    """Median seconds of fn() (device work included: synchronised before and after each run)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def matmul_rate(device: torch.device, size: int) -> float:
    """bf16 size^3 product on random data, FLOP/s (the ceiling MFU is read against is the brief's 790e12)."""
    a = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    b = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    seconds = time_s(lambda: a @ b, device, repeats=10, warmup=3)
    return 2 * size ** 3 / seconds


def p2p_bandwidth(device: torch.device, num_bytes: int) -> float:
    """Bytes/s one rank sends to the other while receiving as much (the ring step's pattern), both ranks calling."""
    rank = dist.get_rank()
    peer = 1 - rank
    send = torch.randint(0, 255, (num_bytes,), dtype=torch.uint8, device=device)
    recv = torch.empty_like(send)

    def exchange() -> None:
        ops = [dist.P2POp(dist.isend, send, peer), dist.P2POp(dist.irecv, recv, peer)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    seconds = time_s(exchange, device, repeats=5, warmup=2)
    return num_bytes / seconds


def choose_kernel(backends: list[str], device: torch.device, *, num_tokens: int, num_heads: int,
                  num_kv_heads: int, head_dim: int) -> dict:
    """Checks each backend on a small lower-right causal GQA block against the math backend, then times a causal
    [num_tokens x num_tokens] block and an unmasked one of the same size. Returns per-backend figures and the
    fastest correct backend on the causal block (what dominates a long prefill)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    scale = head_dim ** -0.5
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(rows: int, heads: int) -> torch.Tensor:
        return torch.randn(rows, heads, head_dim, generator=gen, device=device, dtype=dtype)

    small_q, small_k, small_v = rand(300, num_heads), rand(1100, num_kv_heads), rand(1100, num_kv_heads)
    reference, _ = FlashBlockAttention(backend="math").attend_rows(small_q, small_k, small_v, is_causal=True,
                                                                   scale=scale)
    q, k, v = rand(num_tokens, num_heads), rand(num_tokens, num_kv_heads), rand(num_tokens, num_kv_heads)
    causal_flops = 4 * num_tokens * num_tokens / 2 * num_heads * head_dim
    results: dict[str, dict] = {}
    for backend in backends:
        attend = FlashBlockAttention(backend=backend)
        try:
            out, _ = attend.attend_rows(small_q, small_k, small_v, is_causal=True, scale=scale)
            error = ((out.float() - reference).norm() / reference.norm()).item()
            causal_s = time_s(lambda: attend.attend_rows(q, k, v, is_causal=True, scale=scale), device,
                              repeats=5, warmup=2)
            full_s = time_s(lambda: attend.attend_rows(q, k, v, is_causal=False, scale=scale), device, repeats=3)
        except RuntimeError as failure:  # a backend this GPU / torch build does not offer
            results[backend] = {"error": str(failure).splitlines()[0][:200]}
            continue
        results[backend] = {"relative_error": error, "is_correct": error < 2e-2,
                            "causal_tflops": causal_flops / causal_s / 1e12,
                            "full_tflops": 2 * causal_flops / full_s / 1e12}
    usable = [b for b, r in results.items() if r.get("is_correct")]
    if not usable:
        raise RuntimeError(f"no attention backend passed its check: {results}")
    best = max(usable, key=lambda b: results[b]["causal_tflops"])
    return {"tokens": num_tokens, "backends": results, "chosen": best}


def random_model(config: ModelConfig, dims: ParallelDims, device: torch.device, dtype: torch.dtype,
                 cp_rates) -> CausalLM:
    """CausalLM with random weights filled in place on the device (no checkpoint: an 8B safetensors file would
    take minutes to write). Norm weights are 1, linear weights N(0, 1/fan_in), the embedding N(0, 1): random
    data, not zeros, because zeros can run faster than real weights."""
    torch.manual_seed(1234)
    model = CausalLM(config, dims, dtype=dtype, device=device, cp_rates=cp_rates)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            elif param.dim() == 2 and "embed_tokens" not in name:
                param.normal_(0.0, param.shape[1] ** -0.5)
            else:
                param.normal_(0.0, 1.0)
    return model.eval()
