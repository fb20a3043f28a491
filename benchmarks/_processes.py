"""What named processes use: resident memory (RSS) sampled over time with a verdict on growth, and CPU time.

Who calls it: benchmarks/load.py (memory during its soak; CPU during each phase, to show where the cores went).
RSS comes from psutil when it is installed, else from /proc/<pid>/status; CPU time from /proc/<pid>/stat and
/proc/stat (Linux), so the benchmark needs no extra dependency. Readers return None where the data is missing
(a process that ended, a platform without /proc), never raise.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

from benchmarks._report import linear_slope

MIB = 2**20

try:
    import psutil
except ImportError:  # the /proc fallback below covers Linux
    psutil = None


def rss_bytes(pid: int) -> int | None:
    """Resident set size of `pid` in bytes; None when the process is gone or unreadable."""
    if psutil is not None:
        try:
            return psutil.Process(pid).memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
    try:
        with open(f"/proc/{pid}/status") as file:
            for entry in file:
                if entry.startswith("VmRSS:"):
                    return int(entry.split()[1]) * 1024  # the kernel reports kB
    except OSError:
        return None
    return None


def cpu_seconds(pid: int, tid: int | None = None) -> float | None:
    """User + system CPU seconds used so far by process `pid` (all its threads), or by its thread `tid`."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid is not None else f"/proc/{pid}/stat"
    try:
        with open(path) as file:
            text = file.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the name (field 2) may hold spaces: cut after it
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def machine_cpu_seconds() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot, summed over its cores (/proc/stat)."""
    try:
        with open("/proc/stat") as file:
            values = [int(v) for v in file.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already inside user time
    ticks = os.sysconf("SC_CLK_TCK")
    return (total - idle) / ticks, total / ticks


class CpuMeter:
    """CPU seconds used by each named process (or thread) between start() and stop(), and by the machine."""

    def __init__(self, targets: dict[str, tuple[int, int | None]]) -> None:
        """targets: {label: (pid, tid or None)}."""
        self.targets = targets
        self._start: dict[str, float | None] = {}
        self._machine_start = None
        self._started = 0.0

    def start(self) -> "CpuMeter":
        self._started = time.monotonic()
        self._machine_start = machine_cpu_seconds()
        self._start = {label: cpu_seconds(pid, tid) for label, (pid, tid) in self.targets.items()}
        return self

    def stop(self) -> dict:
        """{"wall_s", "num_cores", "machine_busy_cores", "cpu_s": {label: seconds}, "cores": {label: average cores
        busy}}; "others_cores" is the machine's busy time not used by any process named here (other work on the
        machine, e.g. other test runs, or unnamed helpers such as Ray's daemons when they are not listed)."""
        wall_s = time.monotonic() - self._started
        used = {}
        for label, (pid, tid) in self.targets.items():
            now, before = cpu_seconds(pid, tid), self._start.get(label)
            used[label] = (now - before) if now is not None and before is not None else math.nan
        result = {"wall_s": wall_s, "num_cores": os.cpu_count(), "cpu_s": used,
                  "cores": {label: value / wall_s if wall_s > 0 else math.nan for label, value in used.items()}}
        machine = machine_cpu_seconds()
        if machine is not None and self._machine_start is not None and wall_s > 0:
            busy = machine[0] - self._machine_start[0]
            result["machine_busy_cores"] = busy / wall_s
            processes = sum(v for label, v in used.items() if not math.isnan(v) and self.targets[label][1] is None)
            result["others_cores"] = (busy - processes) / wall_s
        return result


def rss_source() -> str:
    return "psutil" if psutil is not None else "/proc/<pid>/status VmRSS"


@dataclass
class MemorySampler:
    """Samples the RSS of every process in `pids` ({label: pid}); `sample()` whenever the caller wants a point."""

    pids: dict[str, int]
    started: float = field(default_factory=time.monotonic)
    times_s: list[float] = field(default_factory=list)
    rss_mib: dict[str, list[float]] = field(default_factory=dict)  # label -> one value per sample (NaN: gone)

    def sample(self) -> dict[str, float]:
        now = time.monotonic() - self.started
        point = {}
        for label, pid in self.pids.items():
            value = rss_bytes(pid)
            point[label] = value / MIB if value is not None else math.nan
            self.rss_mib.setdefault(label, []).append(point[label])
        self.times_s.append(now)
        return point

    def summary(self, growth_limit_mib_per_min: float) -> dict[str, dict]:
        """Per process: start/end/max RSS, the slope over the whole soak and over its second half (MiB per minute),
        and a verdict. 'stable' needs both slopes at or under the limit; a process whose growth stopped half-way
        is 'grew early, then flat' (shown, not hidden); 'GROWING' when the second half still climbs; 'DIED' when
        the process disappeared."""
        result = {}
        for label, values in self.rss_mib.items():
            pairs = [(t, v) for t, v in zip(self.times_s, values) if not math.isnan(v)]
            if not pairs:
                result[label] = {"pid": self.pids[label], "verdict": "no samples"}
                continue
            times = [t / 60 for t, _ in pairs]
            rss = [v for _, v in pairs]
            half = [(t, v) for t, v in zip(times, rss) if t >= times[-1] / 2]
            slope = linear_slope(times, rss)
            late_slope = linear_slope([t for t, _ in half], [v for _, v in half])
            if len(pairs) < len(values):
                verdict = "DIED"
            elif math.isnan(slope):
                verdict = "too few samples"
            elif max(slope, 0 if math.isnan(late_slope) else late_slope) <= growth_limit_mib_per_min:
                verdict = "stable"
            elif not math.isnan(late_slope) and late_slope <= growth_limit_mib_per_min:
                verdict = "grew early, then flat"
            else:
                verdict = "GROWING"
            result[label] = {
                "pid": self.pids[label],
                "start_mib": rss[0],
                "end_mib": rss[-1],
                "max_mib": max(rss),
                "growth_mib": rss[-1] - rss[0],
                "slope_mib_per_min": slope,
                "late_slope_mib_per_min": late_slope,
                "num_samples": len(rss),
                "verdict": verdict,
            }
        return result

    def series(self) -> dict:
        return {"times_s": self.times_s, "rss_mib": self.rss_mib}
