"""Figures of benchmarks/goodput.py: per-rate latency percentiles and SLO attainment, the goodput rate, the table,
and the PNG of attainment against rate. Pure except `plot` (matplotlib, imported there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from benchmarks._report import percentile


@dataclass(frozen=True, kw_only=True)
class Slo:
    ttft_ms: float = 1000.0
    tpot_ms: float = 25.0
    attainment: float = 0.9  # share of requests that must meet both for a rate to count

    def __post_init__(self) -> None:
        if self.ttft_ms <= 0 or self.tpot_ms <= 0 or not 0 < self.attainment <= 1:
            raise ValueError(f"Slo needs positive targets and attainment in (0, 1], got {self}")

    def is_met(self, result: dict) -> bool:
        """A request meets the SLO when it completed, its TTFT is within target and so is its TPOT (a request
        with one output token has no TPOT: only TTFT counts)."""
        if result["code"] != "OK" or result["ttft_ms"] is None:
            return False
        return result["ttft_ms"] <= self.ttft_ms and (result["tpot_ms"] is None or result["tpot_ms"] <= self.tpot_ms)


def rate_summary(rate_rps: float, run: dict, slo: Slo) -> dict:
    """One rate's row: percentiles of TTFT and TPOT over completed requests, attainment over all sent."""
    results = run["results"]
    completed = [r for r in results if r["code"] == "OK"]
    ttft = [r["ttft_ms"] for r in completed if r["ttft_ms"] is not None]
    tpot = [r["tpot_ms"] for r in completed if r["tpot_ms"] is not None]
    row = {"rate_rps": rate_rps, "num_requests": len(results), "num_failed": len(results) - len(completed),
           "attainment": sum(slo.is_met(r) for r in results) / len(results) if results else 0.0,
           "wall_s": run["wall_s"],
           "output_tokens_per_s": sum(r["output_tokens"] for r in completed) / run["wall_s"] if run["wall_s"] else 0,
           "send_lag_ms_p99": percentile([r["send_lag_ms"] for r in results], 99)}
    for name, values in (("ttft_ms", ttft), ("tpot_ms", tpot)):
        for q in (50, 90, 99):
            row[f"{name}_p{q}"] = percentile(values, q)
    for part in ("queue_ms", "prefill_ms", "kv_transfer_ms"):  # where TTFT goes, as the router measured it
        values = [r["router"][part] for r in completed if part in r.get("router", {})]
        if values:
            row[f"router_{part}_p50"] = percentile(values, 50)
    failures = sorted({f"{r['code']}: {r['message']}" for r in results if r["code"] != "OK"})
    if failures:
        row["failures"] = failures[:5]
    row["meets_slo"] = row["attainment"] >= slo.attainment
    return row


def goodput_rate(rows: list[dict]) -> float:
    """The highest measured rate meeting the SLO at or below which every measured rate met it too (a lucky pass
    above a failing rate does not count); 0 when the lowest rate already fails."""
    best = 0.0
    for row in sorted(rows, key=lambda r: r["rate_rps"]):
        if not row["meets_slo"]:
            break
        best = row["rate_rps"]
    return best


def next_rate(rows: list[dict], rates: list[float], *, bisect_steps_left: int) -> float | None:
    """The next rate to measure: the sweep's rates in order until one fails, then the midpoint between the best
    passing and the lowest failing rate while bisection steps are left; None when done."""
    measured = {r["rate_rps"] for r in rows}
    failing = [r["rate_rps"] for r in rows if not r["meets_slo"]]
    if not failing:
        remaining = [rate for rate in rates if rate not in measured]
        return remaining[0] if remaining else None
    if bisect_steps_left <= 0:
        return None
    low, high = goodput_rate(rows), min(failing)
    if low == 0:
        low = high / 4  # the lowest rate failed: look well below it
        return None if high / 4 in measured else round(low, 3)
    middle = round((low + high) / 2, 3)
    return None if middle in measured or high - low < 0.02 * high else middle


def format_table(name: str, rows: list[dict], slo: Slo) -> str:
    header = ("rate req/s", "n", "failed", "TTFT p50/p90/p99 ms", "TPOT p50/p90/p99 ms", "attain", "meets")
    lines = [f"{name}: SLO TTFT <= {slo.ttft_ms:g} ms and TPOT <= {slo.tpot_ms:g} ms for "
             f">= {slo.attainment:.0%} of requests"]
    body = [header]
    for r in sorted(rows, key=lambda r: r["rate_rps"]):
        body.append((f"{r['rate_rps']:g}", str(r["num_requests"]), str(r["num_failed"]),
                     "/".join(_ms(r[f"ttft_ms_p{q}"]) for q in (50, 90, 99)),
                     "/".join(_ms(r[f"tpot_ms_p{q}"]) for q in (50, 90, 99)),
                     f"{r['attainment']:.0%}", "yes" if r["meets_slo"] else "no"))
    widths = [max(len(row[i]) for row in body) for i in range(len(header))]
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in body]
    lines.append(f"goodput: {goodput_rate(rows):g} req/s")
    return "\n".join(lines)


def _ms(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def plot(data: dict, path) -> None:
    """Attainment against rate, one line per configuration, the attainment target dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    markers = "osD^v"
    for index, config in enumerate(data["configs"]):
        rows = sorted(config["rates"], key=lambda r: r["rate_rps"])
        # markers differ and sizes shrink, so lines that coincide (both at 100%) stay visible
        ax.plot([r["rate_rps"] for r in rows], [100 * r["attainment"] for r in rows],
                marker=markers[index % len(markers)], markersize=9 - 2 * index,
                label=f"{config['name']} (goodput {config['goodput_rps']:g} req/s)")
    slo = data["slo"]
    ax.axhline(100 * slo["attainment"], linestyle="--", color="gray", label=f"{slo['attainment']:.0%} target")
    ax.set_xlabel("request rate (req/s, Poisson arrivals)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(-3, 105)
    ax.set_title(f"{data.get('title', 'goodput')}\nSLO: TTFT <= {slo['ttft_ms']:g} ms and TPOT <= "
                 f"{slo['tpot_ms']:g} ms", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
