"""cluster.yaml validation: every problem is one error that names the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.config import ConfigError, default_config_path, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]


def test_embedded_default_is_the_repo_cluster_yaml():
    assert default_config_path().read_text() == (REPO / "cluster.yaml").read_text()
    config = load_config()
    assert config.prefill.replicas == 1 and config.decode.replicas == 1
    assert config.kv_transfer.backend == "ucx"
    assert (config.router.host, config.router.port) == ("127.0.0.1", 50051)
    assert config.model.preset == "tiny-llama"


def _minimal(**sections):
    raw = {"model": {"path": "/models/x"}}
    raw.update(sections)
    return raw


@pytest.mark.parametrize("raw, key, words", [
    ({}, "model.path", "missing"),
    (_minimal(decode={"mesh": {"tp": "two"}}), "decode.mesh.tp", "integer"),
    (_minimal(decode={"mesh": {"tp": 0}}), "decode.mesh.tp", ">= 1"),
    (_minimal(prefill={"replicas": -1}), "prefill.replicas", ">= 0"),
    (_minimal(prefill={"replicas": 3, "max_replicas": 2}), "prefill.replicas", "max_replicas"),
    (_minimal(kv_transfer={"backend": "nixl"}), "kv_transfer.backend", "ucx"),
    (_minimal(router={"port": 70000}), "router.port", "TCP port"),
    (_minimal(router={"policy": "random"}), "router.policy", "least-loaded"),
    (_minimal(decode={"blok_size": 16}), "decode.blok_size", "unknown key"),
    (_minimal(extra={}), "extra", "unknown key"),
    (_minimal(decode=[1, 2]), "decode", "mapping"),
    (_minimal(decode={"resources": {"gpus": 1}}), "decode.resources.gpus", "unknown key"),
    (_minimal(kv_transfer={"lease_s": 0}), "kv_transfer.lease_s", "> 0"),
    (_minimal(model={"path": "/m", "dtype": "int4"}), "model.dtype", "float32"),
    (_minimal(metrics={"port": 70000}), "metrics.port", "TCP port"),
    (_minimal(metrics={"port": "9100"}), "metrics.port", "integer"),
    (_minimal(metrics={"path": "/m"}), "metrics.path", "unknown key"),
    (_minimal(gateway={"port": -1}), "gateway.port", ">= 0"),
    (_minimal(gateway=[8000]), "gateway", "mapping"),
    (_minimal(logging={"level": "LOUD"}), "logging.level", "INFO"),
])
def test_errors_name_the_key(raw, key, words):
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert err.value.key == key
    assert key in str(err.value) and words in str(err.value)


def test_observability_sections_default_off_and_parse():
    config = parse_config(_minimal())
    assert not config.metrics.is_enabled and not config.gateway.is_enabled
    assert config.logging.level == "INFO"
    config = parse_config(_minimal(metrics={"port": 9100, "host": "0.0.0.0"}, gateway={"port": 0},
                                   logging={"level": "debug"}))
    assert (config.metrics.host, config.metrics.port) == ("0.0.0.0", 9100)
    assert config.gateway.is_enabled and (config.gateway.host, config.gateway.port) == ("127.0.0.1", 0)
    assert config.logging.level == "DEBUG"


def test_relative_model_path_is_relative_to_the_file(tmp_path):
    (tmp_path / "c.yaml").write_text("model: {path: models/tiny}\n")
    assert load_config(tmp_path / "c.yaml").model.path == str(tmp_path / "models" / "tiny")


def test_yaml_syntax_error_names_the_line(tmp_path):
    (tmp_path / "c.yaml").write_text("model:\n  path: [unclosed\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "c.yaml")
    assert "line" in str(err.value)


def test_cli_reports_a_bad_file_in_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {path: /m}\ndecode:\n  mesh: {tp: two}\n")
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "serve", str(bad)], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "pdcluster: cluster.yaml: decode.mesh.tp: expected an integer, got 'two'"
    assert "Traceback" not in proc.stderr


def test_tier_collectives_parse_and_errors_name_the_key():
    config = parse_config(_minimal(decode={"collectives": {"all_reduce": "one-shot", "one_shot_max_bytes": 65536,
                                                           "buffer_bytes": 4 << 20}}))
    assert config.decode.collectives.all_reduce == "one-shot"
    assert config.decode.collectives.one_shot_max_bytes == 65536
    assert config.prefill.collectives.all_reduce == "auto"  # absent: auto, measured at start-up
    for raw, key in (({"all_reduce": "ring"}, "decode.collectives.all_reduce"),
                     ({"buffer_bytes": 1000}, "decode.collectives.buffer_bytes"),
                     ({"allreduce": "auto"}, "decode.collectives.allreduce"),
                     ("nccl", "decode.collectives")):
        with pytest.raises(ConfigError) as err:
            parse_config(_minimal(decode={"collectives": raw}))
        assert err.value.key == key and key in str(err.value)


def test_detached_tiers_need_a_ray_cluster_and_get_a_namespace():
    from orchestrator.tier_registry import tier_namespace

    base = {"model": {"path": "/m/tiny llama"}, "router": {"port": 50052}}
    assert parse_config(base).router.detach_tiers is False
    with pytest.raises(ConfigError) as err:  # a local Ray instance would end with the router
        parse_config({**base, "router": {"detach_tiers": True}})
    assert err.value.key == "router.detach_tiers" and "ray.address" in str(err.value)
    config = parse_config({**base, "router": {"port": 50052, "detach_tiers": True}, "ray": {"address": "auto"}})
    assert config.router.detach_tiers is True
    assert tier_namespace(config) == "pdcluster-tiny-llama-50052"  # model name and router port, Ray-safe
    named = parse_config({**base, "ray": {"address": "auto", "namespace": "prod-a"}})
    assert tier_namespace(named) == "prod-a"
    with pytest.raises(ConfigError) as err:
        parse_config({**base, "router": {"detach_tiers": "yes"}, "ray": {"address": "auto"}})
    assert err.value.key == "router.detach_tiers"


def test_serve_keep_tiers_without_a_ray_cluster_is_a_config_error(tmp_path):
    from orchestrator.cli import main

    path = tmp_path / "cluster.yaml"
    path.write_text("model: {path: /nonexistent/model}\n")
    assert main(["serve", str(path), "--keep-tiers"]) == 2  # exits before anything starts
