"""Text rendering of a `Plan`: the candidates of each tier with their predicted figures and verdicts, then the
chosen deployment. Who calls it: `orchestrator.planner.cli.run_plan`. Pure formatting."""

from __future__ import annotations

from orchestrator.planner.search import Plan, TierCandidate, TierPlan


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f} ms"


def _gb(num_bytes: float | None) -> str:
    return "-" if num_bytes is None else f"{num_bytes / 1e9:.1f} GB"


def _rate(value: float) -> str:
    return "inf" if value == float("inf") else f"{value:.3g}"


def _row(candidate: TierCandidate, chosen: TierCandidate) -> list[str]:
    m = candidate.mesh
    if candidate is chosen:
        verdict = f"CHOSEN: {candidate.reason}"
    elif candidate.is_kept:
        verdict = f"kept: {candidate.reason}"
    else:
        verdict = f"rejected: {candidate.reason}"
    batch = "-" if candidate.batch_size is None else str(candidate.batch_size)
    memory = candidate.memory.total_bytes if candidate.memory is not None else None
    return [candidate.gpu.name, str(m.tp), str(m.cp), str(m.pp), str(m.ep), str(m.world_size),
            _ms(candidate.latency_s), batch, _gb(memory),
            _rate(candidate.requests_per_s) if candidate.is_kept else "-",
            _rate(candidate.requests_per_s_per_gpu) if candidate.is_kept else "-", verdict]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header) - 1)]
    lines = []
    for r in [header] + rows:
        cells = [cell.rjust(width) if i else cell.ljust(width) for i, (cell, width) in enumerate(zip(r, widths))]
        lines.append("  " + "  ".join(cells + [r[-1]]))
    return lines


def format_candidates(tier: str, candidates: list[TierCandidate], chosen: TierCandidate, top: int,
                      quantile_text: str = "p90") -> list[str]:
    kept = [c for c in candidates if c.is_kept][:top]
    # The closest rejections first (those that fit and only missed a target), mesh-rule refusals last.
    rejected = [c for c in candidates if not c.is_kept][:top]
    if chosen not in kept:
        kept.append(chosen)
    latency = "TTFT*" if tier == "prefill" else "TPOT"
    header = ["gpu", "tp", "cp", "pp", "ep", "GPUs", latency, "batch", "mem/GPU", "req/s/replica", "req/s/GPU",
              "verdict"]
    num_kept = sum(c.is_kept for c in candidates)
    lines = [f"{tier} candidates: {num_kept} kept of {len(candidates)} (top {len(kept)} kept and "
             f"{len(rejected)} closest rejected shown)"]
    lines += _table(header, [_row(c, chosen) for c in kept + rejected])
    if tier == "prefill":
        lines.append(f"  * TTFT of the {quantile_text} prompt with no queue; req/s/replica is the load at which "
                     "queueing brings it up to the target")
    return lines


def _tier_line(name: str, tier: TierPlan, what: str) -> str:
    c = tier.candidate
    m = c.mesh
    replicas = f"{tier.replicas} replica{'s' if tier.replicas > 1 else ''}"
    gpus = f"{tier.num_gpus} GPU{'s' if tier.num_gpus > 1 else ''}"
    return (f"  {name}: {replicas} of tp={m.tp} cp={m.cp} pp={m.pp} ep={m.ep} on {c.gpu.name} ({gpus}), "
            f"predicted {what} {_ms(tier.predicted_latency_s)}")


def format_plan(plan: Plan, *, top: int = 5) -> str:
    model, traffic = plan.model, plan.traffic
    gpus = {c.gpu.name: c.gpu for cs in plan.candidates.values() for c in cs}
    size = (f"{model.num_params / 1e9:.1f}B" if model.num_params >= 1e9 else f"{model.num_params / 1e6:.2f}M")
    quantile_text = f"p{traffic.latency_quantile * 100:g}"
    lines = [f"pdcluster plan: {model.name} ({size} parameters, {model.weight_bytes / 1e9:.3g} GB at "
             f"{model.dtype_bytes} bytes each)",
             f"traffic: {traffic.describe()}"]
    for gpu in gpus.values():
        lines.append(f"hardware {gpu.name}: {gpu.source}")
    lines.append("")
    lines += format_candidates("prefill", plan.candidates["prefill"], plan.prefill.candidate, top, quantile_text)
    lines.append("")
    lines += format_candidates("decode", plan.candidates["decode"], plan.decode.candidate, top, quantile_text)
    lines.append("")
    kv = plan.kv_transfer
    lines += [
        "chosen:",
        _tier_line("prefill", plan.prefill, f"TTFT ({quantile_text} prompt, mean queueing)"),
        _tier_line("decode ", plan.decode, "TPOT (at the planned load)"),
        f"  KV transfer of the {quantile_text} prompt: {_gb(kv.num_bytes)}, {_ms(kv.total_s)} over the link, "
        f"{_ms(kv.exposed_s)} left after the prefill ends",
        f"  total {plan.total_gpus} GPUs for {traffic.arrival_rate_per_s:g} req/s: "
        f"{plan.requests_per_s_per_gpu:.3g} req/s per GPU",
    ]
    return "\n".join(lines)
