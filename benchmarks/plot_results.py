"""Draw a benchmark's JSON result as a PNG next to it.

    python benchmarks/plot_results.py benchmarks/results/cp_scaling_h200x2_run1.json [more.json ...]

Knows the JSON of cp_scaling.py, kv_transfer.py and load.py (by their keys); writes <name>.png beside each file.
Needs matplotlib (`pip install "pdcluster[bench]"`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _plot_cp_scaling(data: dict, plt):
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    rows = data.get("prefill", [])
    tokens = sorted({r["new_tokens"] for r in rows})
    configs = sorted({r["config"] for r in rows})
    width = 0.8 / max(1, len(configs))
    for i, config in enumerate(configs):
        xs, ys = [], []
        for j, t in enumerate(tokens):
            row = next((r for r in rows if r["config"] == config and r["new_tokens"] == t), None)
            if row:
                xs.append(j + i * width)
                ys.append(100 * row["mfu_per_gpu"])
        left.bar(xs, ys, width, label=config)
    left.set_xticks([j + width * (len(configs) - 1) / 2 for j in range(len(tokens))], [f"{t // 1024}K" for t in tokens])
    left.set_ylabel("MFU per GPU (%)")
    left.set_title("prefill, Llama-3-8B shape")
    left.legend(loc="lower left", fontsize=8)
    partial = data.get("partial", [])
    for mode in sorted({r["mode"] for r in partial}):
        points = sorted((r["new_fraction"], r["seconds"]) for r in partial if r["mode"] == mode)
        right.plot([100 * f for f, _ in points], [s for _, s in points], marker="o", label=mode)
    right.set_xscale("log")
    right.set_xlabel("new tokens (% of a 128K cache)")
    right.set_ylabel("seconds")
    right.set_title("partial prefill on CP2: pass-KV vs pass-Q")
    if partial:
        right.legend()
    return fig


def _plot_kv_transfer(data: dict, plt):
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    rows = data.get("throughput", [])
    labels = [f"{r['transport']}\n{r['table'][:4]} {r['num_tokens'] // 1024}K" for r in rows]
    left.bar(range(len(rows)), [r["gbps"] for r in rows])
    ceiling = (data.get("copy_ceiling_gbps") or {}).get("measured")
    if ceiling:
        left.axhline(ceiling, linestyle="--", color="gray", label=f"GPU0->GPU1 copy {ceiling:.0f} GB/s")
        left.legend()
    left.set_xticks(range(len(rows)), labels, fontsize=7)
    left.set_ylabel("GB/s")
    left.set_title("KV cache GPU -> GPU")
    ttft = data.get("ttft", [])
    tokens = [r["num_tokens"] for r in ttft]
    for key, label in (("colocated_ttft_s", "colocated"), ("nccl_ttft_s", "disaggregated, nccl"),
                       ("ucx_ttft_s", "disaggregated, ucx")):
        if all(key in r for r in ttft):
            right.plot(tokens, [1e3 * r[key] for r in ttft], marker="o", label=label)
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("prompt tokens")
    right.set_ylabel("TTFT (ms)")
    right.set_title("1 prefill GPU + 1 decode GPU vs one GPU")
    right.legend()
    return fig


def _plot_load(data: dict, plt):
    fig, ax = plt.subplots(figsize=(7, 4))
    soak = (data.get("soak") or {}).get("samples") or []
    if not soak:
        return None
    names = sorted({name for sample in soak for name in sample.get("rss_mib", {})})
    for name in names:
        ax.plot([s["t_s"] / 60 for s in soak], [s["rss_mib"].get(name) for s in soak], label=name)
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title("memory over the soak")
    ax.legend(fontsize=7)
    return fig


def plot(path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    if "prefill" in data and "partial" in data:
        fig = _plot_cp_scaling(data, plt)
    elif "throughput" in data and "ttft" in data:
        fig = _plot_kv_transfer(data, plt)
    else:
        fig = _plot_load(data, plt)
    if fig is None:
        return None
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    for name in argv:
        out = plot(Path(name))
        print(f"{name}: {out or 'no figure for this file'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
