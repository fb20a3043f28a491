"""`pdcluster serve --openai PORT / --metrics-port PORT`: flags override cluster.yaml's gateway / metrics ports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from orchestrator.cli import _with_endpoint, build_parser
from orchestrator.config import parse_config

REPO = Path(__file__).resolve().parents[2]


def test_flags_turn_the_endpoints_on():
    args = build_parser().parse_args(["serve", "--openai", "8000", "--metrics-port", "0"])
    config = parse_config({"model": {"path": "/m"}, "gateway": {"host": "0.0.0.0"}})
    config = _with_endpoint(config, "gateway", args.openai, "--openai")
    config = _with_endpoint(config, "metrics", args.metrics_port, "--metrics-port")
    assert (config.gateway.host, config.gateway.port) == ("0.0.0.0", 8000)
    assert config.metrics.is_enabled and config.metrics.port == 0
    unchanged = _with_endpoint(config, "gateway", None, "--openai")
    assert unchanged is config


def test_a_bad_port_is_one_line_naming_the_flag(tmp_path):
    good = tmp_path / "c.yaml"
    good.write_text("model: {path: /m}\n")
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "serve", str(good), "--openai", "70000"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "pdcluster: cluster.yaml: gateway.port: --openai 70000 is not a TCP port (0-65535)"
