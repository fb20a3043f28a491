"""The placement search: for each tier, every mesh on every GPU type, judged against the traffic's targets; then
the replica counts that carry the arrival rate on the fewest GPUs.

Who calls it: `orchestrator.planner.cli.run_plan` and the tests (`plan(...)`). In the spirit of DistServe's
placement: the two phases are sized separately (a prefill replica's capacity is the arrival rate its M/G/1 queue
takes with the TTFT target still met; a decode replica's is the batch it runs within the TPOT target and its
memory, over the decode steps a request needs), then replicas are counted and the pair with the most requests/s
per GPU wins. Promise: a `Plan` whose tiers meet both targets in the model, or `PlanInfeasible` naming the
binding constraint (memory, TTFT, TPOT, context length or GPU count) with the numbers behind it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mesh.parallel import MeshShape

from orchestrator.planner.cost_model import (KVTransferTime, MemoryEstimate, PhaseTime, activation_bytes,
                                             decode_step_time, kv_bytes_per_token_per_gpu, kv_transfer_time,
                                             mesh_problem, prefill_time, usable_memory_bytes, weight_bytes_per_gpu)
from orchestrator.planner.hardware import GpuSpec
from orchestrator.planner.model_shape import ModelShape
from orchestrator.planner.traffic import Traffic

TIERS = ("prefill", "decode")
_POWERS_OF_TWO = (1, 2, 4, 8, 16, 32, 64)


class PlanInfeasible(ValueError):
    """No deployment meets the targets; `constraint` is one of memory, ttft, tpot, context, gpus."""

    def __init__(self, constraint: str, message: str):
        self.constraint = constraint
        super().__init__(message)


@dataclass(frozen=True, kw_only=True)
class GpuOffer:
    spec: GpuSpec
    count: int | None = None  # GPUs of this type the cluster has; None: as many as the plan needs

    def __post_init__(self) -> None:
        if self.count is not None and self.count < 1:
            raise ValueError(f"GPU offer {self.spec.name}: count must be >= 1, got {self.count}")


@dataclass(frozen=True, kw_only=True)
class SearchOptions:
    max_gpus_per_replica: int = 8
    max_batch_size: int = 1024  # decode sequences one replica runs at once
    kv_link_bytes_per_s: float | None = None  # None: the GPU's KV link (same type), else the inter-node link
    step_overhead_s: float = 0.0  # framework time per forward pass (Python, launches), not modelled otherwise
    is_layerwise: bool = True  # KV pushed layer by layer during the prefill

    def __post_init__(self) -> None:
        if self.max_gpus_per_replica < 1 or self.max_batch_size < 1:
            raise ValueError("search options: max_gpus_per_replica and max_batch_size must be >= 1")
        if self.step_overhead_s < 0:
            raise ValueError("search options: step_overhead_s must be >= 0")


@dataclass(frozen=True, kw_only=True)
class TierCandidate:
    tier: str
    gpu: GpuSpec
    mesh: MeshShape
    is_kept: bool
    reason: str
    memory: MemoryEstimate | None = None
    phase: PhaseTime | None = None  # prefill: the design prompt; decode: one step at the chosen batch
    latency_s: float | None = None  # prefill: TTFT with no queue; decode: TPOT at the chosen batch
    batch_size: int | None = None  # decode: sequences in flight per replica
    requests_per_s: float = 0.0  # one replica's capacity within the target
    mean_service_s: float = 0.0  # prefill: E[S] of the bottleneck stage over the prompt lengths (M/G/1)
    service_second_moment_s2: float = 0.0  # prefill: E[S^2]

    @property
    def gpus_per_replica(self) -> int:
        return self.mesh.world_size

    @property
    def requests_per_s_per_gpu(self) -> float:
        return self.requests_per_s / self.gpus_per_replica

    def sort_key(self) -> tuple:
        return (-self.requests_per_s_per_gpu, self.gpus_per_replica, self.latency_s or 0.0)


@dataclass(frozen=True, kw_only=True)
class TierPlan:
    candidate: TierCandidate
    replicas: int
    predicted_latency_s: float  # prefill: mean-wait TTFT of the design prompt at the planned load; decode: TPOT

    @property
    def num_gpus(self) -> int:
        return self.replicas * self.candidate.gpus_per_replica


@dataclass(frozen=True, kw_only=True)
class Plan:
    model: ModelShape
    traffic: Traffic
    prefill: TierPlan
    decode: TierPlan
    kv_transfer: KVTransferTime
    candidates: dict[str, list[TierCandidate]] = field(default_factory=dict)

    @property
    def total_gpus(self) -> int:
        return self.prefill.num_gpus + self.decode.num_gpus

    @property
    def requests_per_s_per_gpu(self) -> float:
        return self.traffic.arrival_rate_per_s / self.total_gpus


# --- candidates ---------------------------------------------------------------------------------------------------

def candidate_meshes(model: ModelShape, tier: str, gpu: GpuSpec,
                     options: SearchOptions) -> list[tuple[MeshShape, str | None]]:
    """Every mesh worth judging for `tier`, with why it cannot be used (None: usable). Decode has cp = 1 (context
    parallelism serves long prefills); MoE models also try ep = cp * tp."""
    limit = options.max_gpus_per_replica
    meshes: list[tuple[MeshShape, str | None]] = []
    cps = _POWERS_OF_TWO if tier == "prefill" else (1,)
    for tp in _POWERS_OF_TWO:
        for cp in cps:
            for pp in _POWERS_OF_TWO:
                if tp * cp * pp > limit:
                    continue
                eps = (1, cp * tp) if model.is_moe and cp * tp > 1 else (1,)
                for ep in eps:
                    mesh = MeshShape(tp=tp, cp=cp, pp=pp, ep=ep)
                    problem = mesh_problem(model, mesh)
                    if problem is None and tp > gpu.gpus_per_node:
                        problem = f"tp={tp} spans nodes ({gpu.gpus_per_node} GPUs per node share the fast link)"
                    if problem is None and cp * tp > gpu.gpus_per_node:
                        problem = f"cp*tp={cp * tp} spans nodes (ring attention needs the fast link)"
                    meshes.append((mesh, problem))
    return meshes


def _rejected(tier: str, gpu: GpuSpec, mesh: MeshShape, reason: str, **known) -> TierCandidate:
    return TierCandidate(tier=tier, gpu=gpu, mesh=mesh, is_kept=False, reason=reason, **known)


def _gb(num_bytes: float) -> str:
    return f"{num_bytes / 1e9:.1f} GB"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds < 10 else f"{seconds:.3g} s"


def _prefill_service(model: ModelShape, mesh: MeshShape, gpu: GpuSpec, traffic: Traffic,
                     options: SearchOptions) -> tuple[float, float]:
    """E[S] and E[S^2] of the bottleneck stage's service time over the prompt-length distribution."""
    times = {n: prefill_time(model, mesh, gpu, num_tokens=n, overhead_s=options.step_overhead_s).bottleneck_stage_s
             for n in traffic.input_lengths.values}
    return traffic.input_lengths.expect(lambda n: times[n]), traffic.input_lengths.expect(lambda n: times[n] ** 2)


def mg1_wait_s(rate_per_s: float, mean_service_s: float, second_moment_s2: float) -> float:
    """Mean queueing delay of an M/G/1 queue (Pollaczek-Khinchine); inf when the queue is unstable."""
    utilisation = rate_per_s * mean_service_s
    if utilisation >= 1:
        return math.inf
    return rate_per_s * second_moment_s2 / (2 * (1 - utilisation))


def evaluate_prefill(model: ModelShape, mesh: MeshShape, gpu: GpuSpec, traffic: Traffic,
                     options: SearchOptions) -> TierCandidate:
    design_len, longest = traffic.design_input_len, traffic.input_lengths.max
    memory = MemoryEstimate(
        weights_bytes=weight_bytes_per_gpu(model, mesh),
        kv_cache_bytes=longest * kv_bytes_per_token_per_gpu(model, mesh),  # held until shipped to the decode tier
        activation_bytes=activation_bytes(model, mesh, num_tokens=longest, num_rows=1),
        capacity_bytes=usable_memory_bytes(gpu))
    if not memory.fits:
        return _rejected("prefill", gpu, mesh, f"memory: {_gb(memory.total_bytes)} per GPU > "
                         f"{_gb(memory.capacity_bytes)} usable", memory=memory)
    phase = prefill_time(model, mesh, gpu, num_tokens=design_len, overhead_s=options.step_overhead_s)
    known = dict(memory=memory, phase=phase, latency_s=phase.latency_s)
    slack = traffic.ttft_target_s - phase.latency_s
    if slack <= 0:
        return _rejected("prefill", gpu, mesh, f"TTFT {_ms(phase.latency_s)} > target "
                         f"{_ms(traffic.ttft_target_s)} for the p{traffic.latency_quantile * 100:g} prompt "
                         f"({design_len} tokens) with no queue", **known)
    mean_s, second_s2 = _prefill_service(model, mesh, gpu, traffic, options)
    # Largest rate with wait(rate) <= slack: rate * E[S^2] / (2 (1 - rate E[S])) = slack.
    capacity = 2 * slack / (second_s2 + 2 * slack * mean_s)
    return TierCandidate(tier="prefill", gpu=gpu, mesh=mesh, is_kept=True,
                         reason=f"{capacity / mesh.world_size:.3g} req/s per GPU within TTFT", requests_per_s=capacity,
                         mean_service_s=mean_s, service_second_moment_s2=second_s2, **known)


def _decode_memory(model: ModelShape, mesh: MeshShape, gpu: GpuSpec, *, num_seqs: int, tokens_per_seq: float,
                   micro_batch: int) -> MemoryEstimate:
    return MemoryEstimate(
        weights_bytes=weight_bytes_per_gpu(model, mesh),
        kv_cache_bytes=num_seqs * tokens_per_seq * kv_bytes_per_token_per_gpu(model, mesh),
        activation_bytes=activation_bytes(model, mesh, num_tokens=micro_batch, num_rows=micro_batch),
        capacity_bytes=usable_memory_bytes(gpu))


def evaluate_decode(model: ModelShape, mesh: MeshShape, gpu: GpuSpec, traffic: Traffic,
                    options: SearchOptions) -> TierCandidate:
    """The largest batch whose step time meets the TPOT target at the design context and whose KV fits."""
    pp = mesh.pp
    # Blocks are reserved for prompt + max_tokens up front: size memory by the mean of each.
    tokens_per_seq = traffic.input_lengths.mean + traffic.output_lengths.mean
    longest_seq = traffic.input_lengths.max + traffic.output_lengths.max
    context = traffic.design_input_len + traffic.design_output_len / 2
    one = _decode_memory(model, mesh, gpu, num_seqs=1, tokens_per_seq=longest_seq, micro_batch=1)
    if not one.fits:
        return _rejected("decode", gpu, mesh, f"memory: {_gb(one.total_bytes)} per GPU for one "
                         f"{longest_seq}-token sequence > {_gb(one.capacity_bytes)} usable", memory=one)
    free = one.capacity_bytes - one.weights_bytes - one.activation_bytes
    max_seqs_by_memory = int(free // (tokens_per_seq * kv_bytes_per_token_per_gpu(model, mesh)))
    max_micro = max(1, min(max_seqs_by_memory, options.max_batch_size) // pp)

    def step(micro: int) -> PhaseTime:
        return decode_step_time(model, mesh, gpu, batch_size=micro, context_len=context,
                                overhead_s=options.step_overhead_s)

    first = step(1)
    if first.latency_s > traffic.tpot_target_s:
        return _rejected("decode", gpu, mesh, f"TPOT {_ms(first.latency_s)} > target {_ms(traffic.tpot_target_s)} "
                         f"even at batch 1 (reading weights and KV alone: {_ms(first.memory_bound_s)})",
                         memory=one, phase=first, latency_s=first.latency_s, batch_size=pp)
    low, high = 1, max_micro  # step time grows with the batch: bisect for the largest that meets the target
    if step(high).latency_s <= traffic.tpot_target_s:
        low = high
    while high - low > 1:
        middle = (low + high) // 2
        if step(middle).latency_s <= traffic.tpot_target_s:
            low = middle
        else:
            high = middle
    micro = low
    phase = step(micro)
    num_seqs = micro * pp
    memory = _decode_memory(model, mesh, gpu, num_seqs=num_seqs, tokens_per_seq=tokens_per_seq, micro_batch=micro)
    limit = ("memory" if micro == max_micro and max_seqs_by_memory // pp <= options.max_batch_size // pp
             else "batch cap" if micro == max_micro else "TPOT target")
    steps = traffic.mean_decode_steps
    capacity = math.inf if steps <= 0 else num_seqs / (phase.latency_s * steps)
    return TierCandidate(tier="decode", gpu=gpu, mesh=mesh, is_kept=True, memory=memory, phase=phase,
                         latency_s=phase.latency_s, batch_size=num_seqs, requests_per_s=capacity,
                         reason=(f"batch {num_seqs} (limited by {limit}), "
                                 f"{capacity / mesh.world_size:.3g} req/s per GPU"))


def evaluate_tier(model: ModelShape, tier: str, gpus: list[GpuSpec], traffic: Traffic,
                  options: SearchOptions) -> list[TierCandidate]:
    """Every candidate of `tier`, kept ones first (most requests/s per GPU first), then the rejected ones."""
    evaluate = evaluate_prefill if tier == "prefill" else evaluate_decode
    candidates = []
    for gpu in gpus:
        for mesh, problem in candidate_meshes(model, tier, gpu, options):
            if problem is not None:
                candidates.append(_rejected(tier, gpu, mesh, f"mesh: {problem}"))
            else:
                candidates.append(evaluate(model, mesh, gpu, traffic, options))
    kept = sorted((c for c in candidates if c.is_kept), key=TierCandidate.sort_key)
    rejected = sorted((c for c in candidates if not c.is_kept),
                      key=lambda c: (c.reason.startswith("mesh"), c.memory is None or not c.memory.fits,
                                     c.latency_s if c.latency_s is not None else math.inf, c.gpus_per_replica))
    return kept + rejected


# --- the whole plan -----------------------------------------------------------------------------------------------

def plan(model: ModelShape, traffic: Traffic, offers: list[GpuOffer], options: SearchOptions | None = None) -> Plan:
    """The deployment with the most requests/s per GPU that meets the traffic's targets (see the module doc)."""
    options = options or SearchOptions()
    if not offers:
        raise ValueError("plan: offer at least one GPU type")
    _check_context(model, traffic)
    gpus = [offer.spec for offer in offers]
    candidates = {tier: evaluate_tier(model, tier, gpus, traffic, options) for tier in TIERS}
    for tier in TIERS:
        if not any(c.is_kept for c in candidates[tier]):
            raise diagnose(model, tier, candidates[tier], traffic, options)
    p, n_p, d, n_d = _best_pair(candidates, traffic, offers)
    rate = traffic.arrival_rate_per_s
    prefill = TierPlan(candidate=p, replicas=n_p, predicted_latency_s=_prefill_ttft(p, rate / n_p))
    decode = TierPlan(candidate=d, replicas=n_d,
                      predicted_latency_s=_decode_tpot(model, d, rate / n_d, traffic, options))
    kv = _kv_transfer(model, traffic, p, d, options)
    return Plan(model=model, traffic=traffic, prefill=prefill, decode=decode, kv_transfer=kv, candidates=candidates)


def _check_context(model: ModelShape, traffic: Traffic) -> None:
    longest = traffic.input_lengths.max + traffic.output_lengths.max
    if model.max_context_len and longest > model.max_context_len:
        raise PlanInfeasible("context", f"prompts and outputs of up to {longest} tokens exceed the model's context "
                             f"of {model.max_context_len} tokens (max_position_embeddings)")


def _replicas(rate: float, capacity: float) -> int:
    return 1 if capacity == math.inf else max(1, math.ceil(rate / capacity - 1e-9))


def _best_pair(candidates: dict[str, list[TierCandidate]], traffic: Traffic,
               offers: list[GpuOffer]) -> tuple[TierCandidate, int, TierCandidate, int]:
    """The kept pair (with replica counts) that carries the rate on the fewest GPUs within the cluster's counts."""
    rate = traffic.arrival_rate_per_s
    available = {offer.spec.name: offer.count for offer in offers}
    best, best_key, shortest = None, None, None
    for p in (c for c in candidates["prefill"] if c.is_kept):
        n_p = _replicas(rate, p.requests_per_s)
        for d in (c for c in candidates["decode"] if c.is_kept):
            n_d = _replicas(rate, d.requests_per_s)
            used: dict[str, int] = {}
            used[p.gpu.name] = used.get(p.gpu.name, 0) + n_p * p.gpus_per_replica
            used[d.gpu.name] = used.get(d.gpu.name, 0) + n_d * d.gpus_per_replica
            total = sum(used.values())
            if shortest is None or total < shortest[0]:
                shortest = (total, used)
            if any(available[name] is not None and count > available[name] for name, count in used.items()):
                continue
            # Fewest GPUs; on a tie smaller replicas (simpler meshes, finer scaling), then more latency headroom.
            key = (total, p.gpus_per_replica + d.gpus_per_replica,
                   (p.latency_s or 0) / traffic.ttft_target_s + (d.latency_s or 0) / traffic.tpot_target_s)
            if best_key is None or key < best_key:
                best, best_key = (p, n_p, d, n_d), key
    if best is None:
        needed = ", ".join(f"{count} {name}" for name, count in shortest[1].items())
        have = ", ".join(f"{count} {name}" for name, count in available.items() if count is not None)
        raise PlanInfeasible("gpus", f"arrival rate {rate:g} req/s needs at least {shortest[0]} GPUs ({needed}) "
                             f"within the targets; the cluster offers {have}")
    return best


def _prefill_ttft(candidate: TierCandidate, rate: float) -> float:
    """Mean queueing delay at `rate` plus the design prompt's own latency."""
    return mg1_wait_s(rate, candidate.mean_service_s, candidate.service_second_moment_s2) + candidate.latency_s


def _decode_tpot(model: ModelShape, candidate: TierCandidate, rate: float, traffic: Traffic,
                 options: SearchOptions) -> float:
    """TPOT at the batch that `rate` keeps in flight (Little's law: batch = rate x steps x TPOT), found by fixed-point
    iteration from batch 1; never above the candidate's own (the batch it was sized for)."""
    steps = traffic.mean_decode_steps
    if steps <= 0:
        return candidate.latency_s
    pp = candidate.mesh.pp
    context = traffic.design_input_len + traffic.design_output_len / 2
    num_seqs = float(pp)
    tpot = candidate.latency_s
    for _ in range(50):
        micro = max(1, min(math.ceil(num_seqs / pp), candidate.batch_size // pp))
        tpot = decode_step_time(model, candidate.mesh, candidate.gpu, batch_size=micro, context_len=context,
                                overhead_s=options.step_overhead_s).latency_s
        updated = rate * steps * tpot
        if abs(updated - num_seqs) < 0.5:
            break
        num_seqs = updated
    return min(tpot, candidate.latency_s)


def _kv_transfer(model: ModelShape, traffic: Traffic, prefill: TierCandidate, decode: TierCandidate,
                 options: SearchOptions) -> KVTransferTime:
    if options.kv_link_bytes_per_s is not None:
        link = options.kv_link_bytes_per_s
    elif prefill.gpu.name == decode.gpu.name:
        link = min(prefill.gpu.kv_link_bytes_per_s, decode.gpu.kv_link_bytes_per_s)
    else:  # different GPU types live on different nodes
        link = min(prefill.gpu.internode_bytes_per_s, decode.gpu.internode_bytes_per_s)
    return kv_transfer_time(model, num_tokens=traffic.design_input_len, link_bytes_per_s=link,
                            prefill_latency_s=prefill.latency_s, is_layerwise=options.is_layerwise,
                            latency_s=prefill.gpu.collective_latency_s)


# --- refusals -----------------------------------------------------------------------------------------------------

def diagnose(model: ModelShape, tier: str, candidates: list[TierCandidate], traffic: Traffic,
             options: SearchOptions) -> PlanInfeasible:
    """The binding constraint when no candidate of `tier` survives."""
    fitting = [c for c in candidates if c.memory is not None and c.memory.fits]
    if not fitting:
        return _memory_refusal(model, tier, candidates, traffic, options)
    if tier == "decode":
        return _tpot_refusal(model, fitting, traffic, options)
    return _ttft_refusal(model, fitting, traffic, options)


def _memory_refusal(model, tier, candidates, traffic, options) -> PlanInfeasible:
    sized = [c for c in candidates if c.memory is not None]
    gpu_names = sorted({c.gpu.name for c in candidates})
    if not sized:
        return PlanInfeasible("memory", f"no {tier} mesh of at most {options.max_gpus_per_replica} GPUs splits "
                              f"{model.name} ({candidates[0].reason if candidates else 'no candidates'})")
    closest = min(sized, key=lambda c: c.memory.total_bytes / c.memory.capacity_bytes)
    return PlanInfeasible("memory", (
        f"{model.name} does not fit a {tier} replica of at most {options.max_gpus_per_replica} GPUs "
        f"({', '.join(gpu_names)}): weights are {_gb(model.weight_bytes)}; the closest mesh "
        f"({_mesh_text(closest.mesh)} on {closest.gpu.name}) needs {_gb(closest.memory.total_bytes)} per GPU "
        f"(weights {_gb(closest.memory.weights_bytes)}, KV {_gb(closest.memory.kv_cache_bytes)}) of "
        f"{_gb(closest.memory.capacity_bytes)} usable; raise --max-gpus-per-replica or shorten the sequences"))


def _tpot_refusal(model, fitting, traffic, options) -> PlanInfeasible:
    best = min(fitting, key=lambda c: c.latency_s)
    floor = min(fitting, key=lambda c: c.phase.memory_bound_s)
    max_tp = max(c.mesh.tp for c in fitting)
    target = traffic.tpot_target_s
    if target < floor.phase.memory_bound_s:
        read = floor.phase.memory_bound_s * floor.gpu.hbm_bytes_per_s
        return PlanInfeasible("tpot", (
            f"TPOT target {_ms(target)} is below the memory-bandwidth floor {_ms(floor.phase.memory_bound_s)} for "
            f"tp<={max_tp} ({_mesh_text(floor.mesh)} on {floor.gpu.name}: every step reads {_gb(read)} per GPU, "
            f"weights and KV cache summed over the stages a token crosses, at {floor.gpu.hbm_bytes_per_s / 1e12:.2f} "
            "TB/s)"))
    p = best.phase
    return PlanInfeasible("tpot", (
        f"TPOT target {_ms(target)} is below the best achievable {_ms(best.latency_s)} at batch 1 "
        f"({_mesh_text(best.mesh)} on {best.gpu.name}: {_ms(p.memory_bound_s)} reading weights and KV, "
        f"{_ms(p.tp_comm_s)} in TP collectives, {_ms(p.pp_comm_s)} in stage hand-offs)"))


def _ttft_refusal(model, fitting, traffic, options) -> PlanInfeasible:
    best = min(fitting, key=lambda c: c.latency_s)
    target, tokens = traffic.ttft_target_s, traffic.design_input_len
    # Compute floor: the prompt's FLOPs spread over the most GPUs a replica may have, at the measured peaks.
    gpu = max({c.gpu.name: c.gpu for c in fitting}.values(), key=lambda g: g.matmul_flops)
    num_gpus = options.max_gpus_per_replica
    linear_flops = 2 * tokens * model.num_layers * model.active_linear_params_per_layer
    attention_flops = 4 * model.head_dim * model.num_heads * tokens * (tokens / 2) * model.num_layers
    floor = (linear_flops / gpu.matmul_flops + attention_flops / gpu.attention_flops) / num_gpus
    if target < floor:
        return PlanInfeasible("ttft", (
            f"TTFT target {_ms(target)} is below the compute floor {_ms(floor)} for a {tokens}-token prompt on "
            f"{num_gpus} x {gpu.name} ({(linear_flops + attention_flops) / 1e12:.3g} TFLOP at "
            f"{gpu.matmul_flops / 1e12:.0f} TFLOP/s per GPU)"))
    p = best.phase
    return PlanInfeasible("ttft", (
        f"TTFT target {_ms(target)} is below the best achievable {_ms(best.latency_s)} for a {tokens}-token "
        f"prompt ({_mesh_text(best.mesh)} on {best.gpu.name}: {_ms(p.linear_s + p.attention_s)} compute, "
        f"{_ms(p.tp_comm_s + p.cp_comm_s + p.pp_comm_s + p.ep_comm_s)} communication)"))


def _mesh_text(mesh: MeshShape) -> str:
    parts = [f"tp={mesh.tp}"] + [f"{name}={getattr(mesh, name)}" for name in ("cp", "pp", "ep")
                                 if getattr(mesh, name) > 1]
    return " ".join(parts)
