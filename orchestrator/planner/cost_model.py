"""Per-phase cost model of one replica: memory per GPU, prefill latency, decode step time, KV transfer time.

Who calls it: `orchestrator.planner.search` for every candidate mesh, and the tests. Pure arithmetic on a
`ModelShape`, a `MeshShape` and a `GpuSpec`; no torch, no communication.

The model (docs/planner.md has the derivation and its limits):
- Linear layers follow a roofline: time = max(FLOPs / matmul rate, weight bytes read / memory bandwidth). Prefill
  of a long prompt lands on the compute side, a decode step on the memory side (its weights and KV cache are read
  once per step whatever the batch).
- Attention: prefill uses the ring-attention estimate of `mesh.cp_heuristic` (the same model the prefill tier
  uses to pick pass-KV or pass-Q; with cp = 1 it is plain causal attention at the measured flash rate); decode
  attention is its own roofline, max(KV bytes read / memory bandwidth, FLOPs / attention rate): it runs as
  separate kernels after the projections, so its time adds to theirs rather than overlapping.
- The element-wise kernels between the matrix products (norms, residual adds, rotary, the KV cache write,
  SiLU * up) move their bytes over the memory bandwidth, and every kernel of a step costs a fixed
  `kernel_latency_s` on top of its data time (launch, ramp-up, tail); these dominate small decode batches.
- Each collective costs its latency plus its wire bytes over the measured bandwidth: all-reduce
  2(t-1)/t x payload over the bus bandwidth (nccl-tests' convention), all-gather (t-1)/t x output, a send its
  bytes over the point-to-point (or inter-node) rate. Volumes come from `orchestrator.planner.volumes`.
- Pipeline stages run one after the other for one batch: latency is the sum over stages; a pipeline that is kept
  full admits a new batch every bottleneck-stage time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mesh.cp_heuristic import estimate_cp_latency
from mesh.parallel import MeshShape

from orchestrator.planner.hardware import GpuSpec
from orchestrator.planner.model_shape import ModelShape
from orchestrator.planner.volumes import cp_local_tokens, kv_heads_per_rank

MEMORY_UTILIZATION = 0.9  # share of device memory the engine may fill (CUDA context, NCCL and allocator slack)
# Kernels one layer of a forward runs: qkv, rotary + cache write, attention (+ its split merge), o, add + norm,
# gate/up, SiLU * up, down, add + norm: mesh/gpu_decoder.py's step as benchmarks/results/engine_speed_h200.json
# measured it. Plus two per stage end (final norm, LM head) and the embedding lookup on the first stage.
KERNELS_PER_LAYER = 10


def mesh_problem(model: ModelShape, mesh: MeshShape) -> str | None:
    """Why `model` cannot be split as `mesh` (the mesh's own rules, MoE included), or None."""
    tp = mesh.tp
    if model.num_heads % tp:
        return f"tp={tp} does not divide {model.num_heads} attention heads"
    if tp <= model.num_kv_heads and model.num_kv_heads % tp:
        return f"tp={tp} does not divide {model.num_kv_heads} KV heads"
    if tp > model.num_kv_heads and tp % model.num_kv_heads:
        return f"tp={tp} is not a multiple of {model.num_kv_heads} KV heads (cannot replicate them evenly)"
    if model.intermediate_size % tp and mesh.ep == 1:
        return f"tp={tp} does not divide intermediate_size={model.intermediate_size}"
    if model.vocab_size % tp:
        return f"tp={tp} does not divide vocab_size={model.vocab_size}"
    if mesh.pp > model.num_layers:
        return f"pp={mesh.pp} exceeds the {model.num_layers} layers"
    if mesh.ep > 1 and not model.is_moe:
        return f"ep={mesh.ep} on a dense model"
    if mesh.ep > 1 and model.num_experts % mesh.ep:
        return f"ep={mesh.ep} does not divide {model.num_experts} experts"
    return None


def stage_layer_counts(num_layers: int, pp: int) -> list[int]:
    """Contiguous layer ranges per stage, as even as possible (the first stages take the remainder)."""
    base, extra = divmod(num_layers, pp)
    return [base + (1 if stage < extra else 0) for stage in range(pp)]


# --- memory -------------------------------------------------------------------------------------------------------

def layer_weight_bytes_per_gpu(model: ModelShape, mesh: MeshShape) -> float:
    """One decoder layer's weights on one rank."""
    tp, h, e = mesh.tp, model.hidden_size, model.dtype_bytes
    q_local = model.q_size // tp
    kv_local = kv_heads_per_rank(model, tp) * model.head_dim
    attention = h * q_local + 2 * h * kv_local + q_local * h
    if model.is_moe and mesh.ep > 1:
        mlp = model.num_experts // mesh.ep * model.mlp_params_per_expert + h * model.num_experts
    elif model.is_moe:
        mlp = model.num_experts * model.mlp_params_per_expert / tp + h * model.num_experts
    else:
        mlp = model.mlp_params_per_expert / tp
    return (attention + mlp + model.norm_params_per_layer) * e


def stage_weight_bytes(model: ModelShape, mesh: MeshShape) -> list[float]:
    """Weights on one rank of each pipeline stage: its layers, the embedding on the first stage, the final norm
    and the LM head on the last (a tied head shares the embedding's shard only when both sit on one stage)."""
    counts = stage_layer_counts(model.num_layers, mesh.pp)
    table = model.vocab_size * model.hidden_size / mesh.tp * model.dtype_bytes
    per_layer = layer_weight_bytes_per_gpu(model, mesh)
    stages = [count * per_layer for count in counts]
    stages[0] += table
    has_own_head = not model.tie_word_embeddings or mesh.pp > 1
    stages[-1] += (table if has_own_head else 0.0) + model.hidden_size * model.dtype_bytes
    return stages


def weight_bytes_per_gpu(model: ModelShape, mesh: MeshShape) -> float:
    """The busiest GPU's weights."""
    return max(stage_weight_bytes(model, mesh))


def kv_bytes_per_token_per_gpu(model: ModelShape, mesh: MeshShape) -> float:
    """One token's K and V on the busiest GPU (its stage's layers, its KV heads, 1/cp of the tokens)."""
    layers = max(stage_layer_counts(model.num_layers, mesh.pp))
    return 2 * layers * kv_heads_per_rank(model, mesh.tp) * model.head_dim * model.dtype_bytes / mesh.cp


def activation_bytes(model: ModelShape, mesh: MeshShape, *, num_tokens: int, num_rows: int) -> float:
    """Peak transient memory of one forward pass over `num_tokens` tokens (flash attention: no score matrix):
    the residual and its normed copy, plus the larger of the MLP's and attention's intermediates, plus the
    gathered float32 logits of the returned rows."""
    tp, e, h = mesh.tp, model.dtype_bytes, model.hidden_size
    tokens = cp_local_tokens([num_tokens], mesh.cp) if mesh.cp > 1 else num_tokens
    experts = model.num_experts_per_token if model.is_moe else 1
    mlp = 3 * model.intermediate_size * experts / tp
    attention = 2 * (model.q_size + 2 * model.kv_size) / tp
    return tokens * (2 * h + max(mlp, attention)) * e + num_rows * model.vocab_size * (e + 4)


@dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    weights_bytes: float
    kv_cache_bytes: float
    activation_bytes: float
    capacity_bytes: float  # usable: device memory x MEMORY_UTILIZATION

    @property
    def total_bytes(self) -> float:
        return self.weights_bytes + self.kv_cache_bytes + self.activation_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.capacity_bytes


def usable_memory_bytes(gpu: GpuSpec) -> float:
    return gpu.memory_bytes * MEMORY_UTILIZATION


def glue_bytes_per_token_per_layer(model: ModelShape, mesh: MeshShape) -> float:
    """Bytes the element-wise kernels of one layer move per token on one rank (what the matrix products and
    attention do not already account for): two fused add + RMSNorm (read the residual and the input, write both:
    4h each), rotary on q and k (read and write), the K/V write into the cache, SiLU(gate) * up (read 2I, write I);
    the MLP's intermediate is per routed expert for MoE."""
    tp, h = mesh.tp, model.hidden_size
    q_local = model.q_size / tp
    kv_local = kv_heads_per_rank(model, tp) * model.head_dim
    experts = model.num_experts_per_token if model.is_moe else 1
    mlp_local = model.intermediate_size * experts / tp  # ep = cp x tp: a cp shard's rows spread over its tp ranks
    return model.dtype_bytes * (8 * h + 2 * (q_local + kv_local) + 2 * kv_local + 3 * mlp_local)


ENGINES = ("fused", "eager")


def eager_glue_bytes_per_token_per_layer(model: ModelShape, mesh: MeshShape) -> float:
    """The same element-wise work as mesh/decoder.py runs it eagerly (multi-rank meshes use that engine), counted
    op by op from the code: RMSNorm upcasts to float32 and makes six passes (36h bytes in bf16), the residual adds
    (3h elements each), rotary as slice-negate, concatenate, two multiplies and an add (10 passes over q and k),
    the K/V cache write, GQA's K/V expanded to the query heads for SDPA and the per-sequence outputs concatenated,
    SiLU(gate) then * up (5I)."""
    tp, h, e = mesh.tp, model.hidden_size, model.dtype_bytes
    q_local = model.q_size / tp
    kv_local = kv_heads_per_rank(model, tp) * model.head_dim
    experts = model.num_experts_per_token if model.is_moe else 1
    mlp_local = model.intermediate_size * experts / tp
    norm = 2 * ((e + 4) + 8 + 4 + 8 + (4 + e) + 2 * e) * h  # two RMSNorms, bytes
    elements = 2 * 3 * h + 10 * (q_local + kv_local) + 2 * 2 * kv_local + 2 * (kv_local + q_local) + 2 * q_local \
        + 5 * mlp_local
    return norm + e * elements


def _glue_bytes(model: ModelShape, mesh: MeshShape, engine: str) -> float:
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "eager":
        return eager_glue_bytes_per_token_per_layer(model, mesh)
    return glue_bytes_per_token_per_layer(model, mesh)


def stage_kernel_s(gpu: GpuSpec, layers: int, *, is_first: bool, is_last: bool) -> float:
    """Fixed kernel time of one stage's forward: KERNELS_PER_LAYER per layer, the embedding, final norm and head."""
    kernels = KERNELS_PER_LAYER * layers + (1 if is_first else 0) + (2 if is_last else 0)
    return kernels * gpu.kernel_latency_s


# --- collectives --------------------------------------------------------------------------------------------------

def all_reduce_s(gpu: GpuSpec, payload_bytes: float, num_ranks: int) -> float:
    if num_ranks <= 1:
        return 0.0
    return gpu.collective_latency_s + payload_bytes * 2 * (num_ranks - 1) / num_ranks / gpu.allreduce_bus_bytes_per_s


def all_gather_s(gpu: GpuSpec, output_bytes: float, num_ranks: int) -> float:
    if num_ranks <= 1:
        return 0.0
    return gpu.collective_latency_s + output_bytes * (num_ranks - 1) / num_ranks / gpu.allreduce_bus_bytes_per_s


def send_s(gpu: GpuSpec, num_bytes: float, *, crosses_node: bool) -> float:
    rate = gpu.internode_bytes_per_s if crosses_node else gpu.p2p_bytes_per_s
    return gpu.collective_latency_s + num_bytes / rate


def all_to_all_s(gpu: GpuSpec, bytes_leaving_rank: float, num_ranks: int) -> float:
    if num_ranks <= 1:
        return 0.0
    return gpu.collective_latency_s + bytes_leaving_rank / gpu.p2p_bytes_per_s


# --- time per phase -----------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class PhaseTime:
    """Seconds of one forward pass, split by cause (each summed over the stages a token passes)."""

    linear_s: float  # roofline of the linear layers: max(compute, weight read) per stage
    attention_s: float  # attention: compute (prefill), max(KV read, compute) (decode)
    tp_comm_s: float
    cp_comm_s: float  # ring transfers that compute does not hide
    ep_comm_s: float
    pp_comm_s: float
    overhead_s: float
    latency_s: float  # one batch through every stage
    bottleneck_stage_s: float  # a full pipeline admits a batch this often (= latency_s when pp = 1)
    memory_bound_s: float  # the bytes-over-bandwidth part alone, summed over stages (the decode floor)
    glue_s: float = 0.0  # element-wise kernels' memory traffic (norms, residuals, rotary, cache write, SiLU)
    kernel_s: float = 0.0  # fixed time of every kernel of the forward (kernel_latency_s each)


def _crosses_node(mesh: MeshShape, gpu: GpuSpec) -> bool:
    return mesh.world_size > gpu.gpus_per_node


def _ep_comm_s(model: ModelShape, mesh: MeshShape, gpu: GpuSpec, tokens_on_cp_rank: int, layers: int) -> float:
    """Per layer (mesh/moe.py): the routing counts' all-to-all, the rows out to their experts and back ((ep - 1) /
    ep of them leave the rank under uniform routing), and the all-gather of the tp ranks' chunks."""
    if mesh.ep <= 1:
        return 0.0
    remote = (mesh.ep - 1) / mesh.ep
    chunk = math.ceil(tokens_on_cp_rank / mesh.tp)
    one_way = chunk * model.num_experts_per_token * model.hidden_size * model.dtype_bytes * remote
    per_layer = (all_to_all_s(gpu, model.num_experts * 8 * remote, mesh.ep) + 2 * all_to_all_s(gpu, one_way, mesh.ep)
                 + all_gather_s(gpu, mesh.tp * chunk * model.hidden_size * model.dtype_bytes, mesh.tp))
    return layers * per_layer


def _tp_comm_s(model: ModelShape, mesh: MeshShape, gpu: GpuSpec, *, tokens: int, rows: int, layers: int,
               is_first: bool, is_last: bool) -> float:
    allreduces = (1 if mesh.ep > 1 else 2) * layers + (1 if is_first else 0)
    seconds = allreduces * all_reduce_s(gpu, tokens * model.hidden_size * model.dtype_bytes, mesh.tp)
    if is_last:
        seconds += all_gather_s(gpu, rows * model.vocab_size * model.dtype_bytes, mesh.tp)
    return seconds


def prefill_time(model: ModelShape, mesh: MeshShape, gpu: GpuSpec, *, num_tokens: int, num_cached: int = 0,
                 overhead_s: float = 0.0, cp_mode: str = "auto", engine: str = "fused") -> PhaseTime:
    """One prompt of `num_tokens` new tokens (after `num_cached` cached ones) through the replica. `cp_mode`: the
    ring variant a CP step runs ("auto": the faster of the two, as the prefill tier picks it). `engine`: "fused"
    (the GPU fast path's fused element-wise kernels) or "eager" (mesh/decoder.py op by op)."""
    if num_tokens < 1:
        raise ValueError(f"prefill_time: num_tokens must be >= 1, got {num_tokens}")
    if cp_mode not in ("auto", "pass-kv", "pass-q"):
        raise ValueError(f"prefill_time: cp_mode must be auto, pass-kv or pass-q, got {cp_mode!r}")
    tp, cp, e = mesh.tp, mesh.cp, model.dtype_bytes
    tokens = cp_local_tokens([num_tokens], cp)
    attention = estimate_cp_latency(
        num_tokens, num_cached, num_heads=model.num_heads // tp, num_kv_heads=kv_heads_per_rank(model, tp),
        head_dim=model.head_dim, cp_size=cp, peak_flops=gpu.attention_flops,
        bandwidth_bytes_per_s=gpu.p2p_bytes_per_s, dtype_bytes=e)
    attention_layer_s = {"auto": min(attention.pass_kv_s, attention.pass_q_s), "pass-kv": attention.pass_kv_s,
                         "pass-q": attention.pass_q_s}[cp_mode]
    attention_compute_layer_s = cp * attention.step_compute_s
    weights = stage_weight_bytes(model, mesh)
    counts = stage_layer_counts(model.num_layers, mesh.pp)
    glue_per_token_layer = _glue_bytes(model, mesh, engine)
    linear = att = tp_comm = cp_comm = ep_comm = memory_bound = glue = fixed = 0.0
    stage_times = []
    for stage, (layers, stage_bytes) in enumerate(zip(counts, weights)):
        is_first, is_last = stage == 0, stage == mesh.pp - 1
        stage_glue = tokens * layers * glue_per_token_layer / gpu.hbm_bytes_per_s
        stage_fixed = stage_kernel_s(gpu, layers, is_first=is_first, is_last=is_last)
        flops = 2 * tokens * layers * model.active_linear_params_per_layer / tp
        if is_last:
            flops += 2 * model.vocab_size * model.hidden_size / tp  # the one returned row
            stage_tp_extra = all_reduce_s(gpu, model.hidden_size * e, cp)  # CP: the row's hidden state gathered
        else:
            stage_tp_extra = 0.0
        memory_s = stage_bytes / gpu.hbm_bytes_per_s
        stage_linear = max(flops / gpu.matmul_flops, memory_s)
        stage_att = layers * attention_compute_layer_s
        stage_cp = layers * (attention_layer_s - attention_compute_layer_s)
        stage_tp = _tp_comm_s(model, mesh, gpu, tokens=tokens, rows=1, layers=layers, is_first=is_first,
                              is_last=is_last)
        stage_cp += stage_tp_extra
        stage_ep = _ep_comm_s(model, mesh, gpu, tokens, layers)
        stage_times.append(stage_linear + stage_att + stage_cp + stage_tp + stage_ep + stage_glue + stage_fixed)
        linear, att, cp_comm, tp_comm, ep_comm = (linear + stage_linear, att + stage_att, cp_comm + stage_cp,
                                                  tp_comm + stage_tp, ep_comm + stage_ep)
        glue, fixed = glue + stage_glue, fixed + stage_fixed
        memory_bound += memory_s
    handoff = send_s(gpu, tokens * model.hidden_size * e, crosses_node=_crosses_node(mesh, gpu)) if mesh.pp > 1 \
        else 0.0
    pp_comm = (mesh.pp - 1) * handoff
    latency = sum(stage_times) + pp_comm + overhead_s
    return PhaseTime(linear_s=linear, attention_s=att, tp_comm_s=tp_comm, cp_comm_s=cp_comm, ep_comm_s=ep_comm,
                     pp_comm_s=pp_comm, overhead_s=overhead_s, latency_s=latency,
                     bottleneck_stage_s=max(stage_times) + handoff + overhead_s / mesh.pp,
                     memory_bound_s=memory_bound, glue_s=glue, kernel_s=fixed)


def _expert_share_read(model: ModelShape, num_tokens: int) -> float:
    """Expected share of a layer's experts that `num_tokens` tokens touch (each picks k of E)."""
    if not model.is_moe:
        return 1.0
    return 1.0 - (1.0 - model.num_experts_per_token / model.num_experts) ** num_tokens


def decode_step_time(model: ModelShape, mesh: MeshShape, gpu: GpuSpec, *, batch_size: int, context_len: float,
                     overhead_s: float = 0.0, engine: str = "fused") -> PhaseTime:
    """One decode step of `batch_size` sequences (one micro-batch when pp > 1) of mean context `context_len`;
    `engine` as for prefill_time."""
    if batch_size < 1:
        raise ValueError(f"decode_step_time: batch_size must be >= 1, got {batch_size}")
    if mesh.cp != 1:
        raise ValueError("decode_step_time: decode meshes have cp = 1")
    tp, e = mesh.tp, model.dtype_bytes
    counts = stage_layer_counts(model.num_layers, mesh.pp)
    weights = stage_weight_bytes(model, mesh)
    expert_share = _expert_share_read(model, batch_size)
    expert_bytes_per_layer = 0.0
    if model.is_moe:
        experts_here = model.num_experts // mesh.ep if mesh.ep > 1 else model.num_experts / tp
        expert_bytes_per_layer = experts_here * model.mlp_params_per_expert * e
    kv_per_token_layer = 2 * kv_heads_per_rank(model, tp) * model.head_dim * e
    glue_per_token_layer = _glue_bytes(model, mesh, engine)
    linear = att = tp_comm = ep_comm = memory_bound = glue = fixed = 0.0
    stage_times = []
    for stage, (layers, stage_bytes) in enumerate(zip(counts, weights)):
        is_first, is_last = stage == 0, stage == mesh.pp - 1
        # The embedding table is only indexed (a few rows), never streamed, unless it is also the LM head (tied, on
        # one stage): then the head streams it.
        is_head_too = is_last and model.tie_word_embeddings and mesh.pp == 1
        weights_read = stage_bytes - (model.vocab_size * model.hidden_size / tp * e if is_first and not is_head_too
                                      else 0.0)
        weights_read -= layers * expert_bytes_per_layer * (1.0 - expert_share)
        kv_read = batch_size * context_len * layers * kv_per_token_layer
        memory_s = (weights_read + kv_read) / gpu.hbm_bytes_per_s
        flops = 2 * batch_size * layers * model.active_linear_params_per_layer / tp
        flops_att = 4 * model.head_dim * (model.num_heads // tp) * batch_size * context_len * layers
        if is_last:
            flops += 2 * batch_size * model.vocab_size * model.hidden_size / tp
        # Projections and attention are different kernels, one after the other: each its own roofline.
        stage_linear = max(flops / gpu.matmul_flops, weights_read / gpu.hbm_bytes_per_s)
        stage_att = max(flops_att / gpu.attention_flops, kv_read / gpu.hbm_bytes_per_s)
        stage_glue = batch_size * layers * glue_per_token_layer / gpu.hbm_bytes_per_s
        stage_fixed = stage_kernel_s(gpu, layers, is_first=is_first, is_last=is_last)
        stage_tp = _tp_comm_s(model, mesh, gpu, tokens=batch_size, rows=batch_size, layers=layers,
                              is_first=is_first, is_last=is_last)
        stage_ep = _ep_comm_s(model, mesh, gpu, batch_size, layers)
        stage_times.append(stage_linear + stage_att + stage_glue + stage_fixed + stage_tp + stage_ep)
        linear, att, tp_comm, ep_comm = linear + stage_linear, att + stage_att, tp_comm + stage_tp, ep_comm + stage_ep
        glue, fixed = glue + stage_glue, fixed + stage_fixed
        memory_bound += memory_s
    handoff = send_s(gpu, batch_size * model.hidden_size * e, crosses_node=_crosses_node(mesh, gpu)) \
        if mesh.pp > 1 else 0.0
    pp_comm = (mesh.pp - 1) * handoff
    latency = sum(stage_times) + pp_comm + overhead_s
    return PhaseTime(linear_s=linear, attention_s=att, tp_comm_s=tp_comm, cp_comm_s=0.0, ep_comm_s=ep_comm,
                     pp_comm_s=pp_comm, overhead_s=overhead_s, latency_s=latency,
                     bottleneck_stage_s=max(stage_times) + handoff + overhead_s / mesh.pp,
                     memory_bound_s=memory_bound, glue_s=glue, kernel_s=fixed)


# --- KV transfer between tiers ------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class KVTransferTime:
    num_bytes: float
    total_s: float  # all layers over the link
    exposed_s: float  # what is left after the prefill finishes (layer-wise pushing overlaps the rest)


def kv_transfer_time(model: ModelShape, *, num_tokens: int, link_bytes_per_s: float, prefill_latency_s: float,
                     is_layerwise: bool = True, latency_s: float = 0.0) -> KVTransferTime:
    """Prefill -> decode KV shipment of one prompt. Layer-wise, layer l travels while layer l + 1 computes, so
    only the last layer's share, or the excess of the transfer over the compute, remains after the prefill. The
    transport sends one message per layer (kv_transfer's sessions), each paying `latency_s`."""
    num_bytes = model.kv_bytes_per_token * num_tokens
    total = model.num_layers * latency_s + num_bytes / link_bytes_per_s
    if not is_layerwise:
        return KVTransferTime(num_bytes=num_bytes, total_s=total, exposed_s=total)
    layers = model.num_layers
    exposed = max(latency_s + num_bytes / layers / link_bytes_per_s, total - prefill_latency_s * (layers - 1) / layers)
    return KVTransferTime(num_bytes=num_bytes, total_s=total, exposed_s=exposed)

