"""What every benchmark script shares: percentiles, a printed table, the machine it ran on, and the JSON file.

Who calls it: the scripts in benchmarks/ (one per figure). Each prints its figures as plain-text tables and
writes one JSON document holding the command line, the machine and the same figures, so a run can be compared
with another one later without re-parsing the console output.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between closest ranks; NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(values: Sequence[float], quantiles: Sequence[float] = (50, 90, 99)) -> dict[str, float]:
    """{"n", "min", "p50", "p90", "p99", "max", "mean"} of a sample (NaN entries when it is empty)."""
    summary: dict[str, float] = {"n": len(values)}
    summary["min"] = min(values) if values else math.nan
    for q in quantiles:
        summary[f"p{q:g}"] = percentile(values, q)
    summary["max"] = max(values) if values else math.nan
    summary["mean"] = sum(values) / len(values) if values else math.nan
    return summary


def linear_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys over xs (NaN with fewer than two distinct xs)."""
    if len(xs) != len(ys):
        raise ValueError(f"linear_slope: {len(xs)} xs but {len(ys)} ys")
    if len(xs) < 2:
        return math.nan
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread == 0:
        return math.nan
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread


def format_cell(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.2f}" if abs(value) < 1e5 else f"{value:.3g}"
    return str(value)


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence], *, out=None,
                left_columns: Sequence[int] = (0,)) -> None:
    """A plain-text table: the `left_columns` (names, free text) left-aligned, the others (figures) right-aligned."""
    out = out if out is not None else sys.stdout  # looked up per call: redirections made after import apply
    cells = [[str(h) for h in header]] + [[format_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: list[str]) -> str:
        cells = (c.ljust(w) if i in left_columns else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        return "  ".join(cells).rstrip()

    print(f"\n{title}", file=out)
    print(line(cells[0]), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for row in cells[1:]:
        print(line(row), file=out)
    out.flush()


def _total_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as file:
            for entry in file:
                if entry.startswith("MemTotal:"):
                    return int(entry.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def machine_info() -> dict:
    """The machine, for the JSON: cores, memory, OS, Python and the key library versions present."""
    memory = _total_memory_bytes()
    info = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "num_cpus": os.cpu_count(),
        "num_cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(memory / 2**30, 2) if memory else None,
        "python": platform.python_version(),
    }
    for module in ("torch", "ray", "grpc", "ucxx"):
        loaded = sys.modules.get(module)
        if loaded is not None:
            info[f"{module}_version"] = getattr(loaded, "__version__", "?")
    return info


def command_line() -> str:
    return shlex.join([Path(sys.executable).name, *sys.argv])


def write_json(path: str | os.PathLike, document: dict) -> Path:
    """Writes the document (NaN written as null) and returns the path; parent folders are created."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(_without_nan(document), indent=2, sort_keys=False) + "\n")
    return target


def _without_nan(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _without_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_nan(v) for v in value]
    return value


class Progress:
    """Progress lines on stderr during a long phase, at most one every `every_s` seconds (plus forced ones)."""

    def __init__(self, phase: str, every_s: float = 5.0, out=None) -> None:
        self.phase = phase
        self.every_s = every_s
        self.out = out if out is not None else sys.stderr
        self.started = time.monotonic()
        self._last = -math.inf

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def maybe(self, message: str, *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self.every_s:
            self._last = now
            print(f"[{self.phase} {now - self.started:7.1f} s] {message}", file=self.out, flush=True)
