"""docs/observability.md and docs/grafana-dashboard.json name exactly the series that ClusterMetrics exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from orchestrator.metrics import ClusterMetrics

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _families() -> set[str]:
    names = set()
    for family in ClusterMetrics().registry.collect():
        names.add(family.name + "_total" if family.type == "counter" else family.name)
    return names


def _base(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_every_series_is_documented_and_nothing_else():
    documented = set(re.findall(r"^\| `(pdcluster_\w+)` \|", (DOCS / "observability.md").read_text(), re.M))
    assert documented == _families()


def test_dashboard_queries_use_existing_series():
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    used = {_base(name) for expr in exprs for name in re.findall(r"pdcluster_\w+", expr)}
    families = _families()
    unknown = {name for name in used if name not in families}
    assert not unknown, f"dashboard queries unknown series: {sorted(unknown)}"
    assert used == families, f"series without a panel: {sorted(families - used)}"
