"""`pdcluster launch`: the Ray cluster-launcher config derived from cluster.yaml's launch: section.

Every derived config goes through Ray's own checks (`validate_ray_config`: Ray's provider defaults, its JSON schema
and node-type rules, as `ray up` applies them before calling the cloud)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from orchestrator.config import ConfigError, load_config, parse_config
from orchestrator.launch import (HEAD_NODE_TYPE, REMOTE_CONFIG, REMOTE_FILES, LaunchError, derive_ray_config,
                                 install_specs, launch_files, plan_workers, required_nodes, validate_ray_config,
                                 write_launch_files)

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _raw(provider: dict, node_types: dict, *, prefill: dict | None = None, decode: dict | None = None,
         **launch) -> dict:
    head = {} if provider["type"] == "local" else {"node_config": {"InstanceType": "m5.2xlarge"}}
    return {
        "model": {"path": "/models/llama"},
        "prefill": prefill or {"replicas": 2, "mesh": {"tp": 4},
                               "resources": {"num_gpus": 1, "num_cpus": 8, "accelerator_type": "H100"}},
        "decode": decode or {"replicas": 3, "max_replicas": 6, "mesh": {"tp": 2},
                             "resources": {"num_gpus": 1, "num_cpus": 4, "accelerator_type": "A100"}},
        "launch": {"provider": provider, "auth": {"ssh_user": "ubuntu"}, "head_node": head,
                   "node_types": copy.deepcopy(node_types), **launch},
    }


AWS_TYPES = {"H100": {"node_config": {"InstanceType": "p5.48xlarge"}, "gpus_per_node": 8, "cpus_per_node": 192},
             "A100": {"node_config": {"InstanceType": "p4d.24xlarge"}, "gpus_per_node": 8, "cpus_per_node": 96}}


def _derive(raw: dict, tmp_path: Path) -> tuple[dict, object]:
    """Write `raw` as a cluster.yaml, derive (writing the mounted files under tmp_path), validate with Ray."""
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = load_config(path)
    files = launch_files(config, tmp_path / "state")
    ray_config = write_launch_files(path, config, files)
    validate_ray_config(ray_config)
    return ray_config, files


def test_aws_node_types_resources_and_worker_counts(tmp_path):
    ray_config, files = _derive(_raw({"type": "aws", "region": "us-west-2"}, AWS_TYPES), tmp_path)
    types = ray_config["available_node_types"]
    assert ray_config["head_node_type"] == HEAD_NODE_TYPE and set(types) == {"head", "worker-H100", "worker-A100"}
    assert types["head"] == {"node_config": {"InstanceType": "m5.2xlarge"}, "resources": {}, "min_workers": 0,
                             "max_workers": 0}
    # prefill: 2 replicas x tp 4 = 8 GPUs on 8-GPU nodes; no max_replicas: max = min
    assert types["worker-H100"] == {"node_config": {"InstanceType": "p5.48xlarge"},
                                    "resources": {"accelerator_type:H100": 1, "GPU": 8, "CPU": 192},
                                    "min_workers": 1, "max_workers": 1}
    # decode: 3 x tp 2 = 6 GPUs -> 1 node; max 6 x 2 = 12 GPUs -> 2 nodes
    assert (types["worker-A100"]["min_workers"], types["worker-A100"]["max_workers"]) == (1, 2)
    assert ray_config["max_workers"] == 3
    assert ray_config["provider"] == {"type": "aws", "region": "us-west-2"}
    assert ray_config["file_mounts"] == {REMOTE_FILES: str(files.node_files)}
    assert (files.node_files / "cluster.yaml").read_text() == (tmp_path / "cluster.yaml").read_text()
    assert REMOTE_CONFIG.startswith(REMOTE_FILES + "/")


def test_gcp_provider_passes_ray_validation_with_cpu_and_custom_resources(tmp_path):
    node_types = {"L4": {"node_config": {"machineType": "g2-standard-48"}, "gpus_per_node": 4, "cpus_per_node": 48,
                         "resources": {"nvme": 1}}}
    tier = {"replicas": 3, "max_replicas": 5, "mesh": {"tp": 2},
            "resources": {"num_gpus": 1, "num_cpus": 20, "accelerator_type": "L4", "custom": {"nvme": 0.25}}}
    raw = _raw({"type": "gcp", "region": "us-central1", "availability_zone": "us-central1-a", "project_id": "p"},
               node_types, prefill=tier, decode=tier)
    raw["launch"]["head_node"] = {"node_config": {"machineType": "n2-standard-8"}, "resources": {"CPU": 8}}
    ray_config, _ = _derive(raw, tmp_path)
    l4 = ray_config["available_node_types"]["worker-L4"]
    assert l4["resources"] == {"accelerator_type:L4": 1, "GPU": 4, "CPU": 48, "nvme": 1}
    # both tiers on L4: 2 x 3 replicas x 2 ranks = 12 ranks; GPUs 12/4 = 3 nodes, CPUs 240/48 = 5 nodes,
    # nvme 3/1 = 3 nodes: the scarcest resource decides. At max: 20 ranks -> CPUs 400/48 -> 9 nodes.
    assert (l4["min_workers"], l4["max_workers"]) == (5, 9)
    assert ray_config["available_node_types"]["head"]["resources"] == {"CPU": 8}


def test_local_provider_lists_machines_and_gives_them_their_resources(tmp_path):
    node_types = {"H100": {"worker_ips": ["10.0.0.2", "10.0.0.3"], "gpus_per_node": 8},
                  "A100": {"worker_ips": ["10.0.0.4"]}}
    raw = _raw({"type": "local", "head_ip": "10.0.0.1", "worker_ips": ["10.0.0.9"]}, node_types)
    raw["launch"]["head_node"] = {"resources": {"CPU": 4, "router_host": 1}}
    ray_config, _ = _derive(raw, tmp_path)
    assert "available_node_types" not in ray_config  # Ray's local provider refuses node types
    assert ray_config["provider"]["worker_ips"] == ["10.0.0.9", "10.0.0.4", "10.0.0.2", "10.0.0.3"]
    assert ray_config["max_workers"] == 4
    head_start = ray_config["head_start_ray_commands"][-1]
    assert "--num-cpus=4 --resources='{\"router_host\":1}'" in head_start
    worker_start = ray_config["worker_start_ray_commands"][-1]
    assert "10.0.0.2|10.0.0.3) FLAGS='--num-gpus=8 --resources={\"accelerator_type:H100\":1}';;" in worker_start
    assert worker_start.endswith("ray start --address=$RAY_HEAD_IP:6379 $FLAGS")
    assert required_nodes(load_config(tmp_path / "cluster.yaml")) == (
        {"accelerator_type:H100": 2, "accelerator_type:A100": 1}, 5)


@pytest.mark.parametrize("doc, expected", [
    ("launch-aws.yaml", {"worker-H100": (1, 2), "worker-A100": (1, 2)}),
    ("launch-gcp.yaml", {"worker-H100": (1, 2), "worker-L4": (2, 3)}),
])
def test_docs_examples_derive_what_they_say(doc, expected, tmp_path):
    config = load_config(DOCS / doc)
    files = launch_files(config, tmp_path)
    ray_config = write_launch_files(DOCS / doc, config, files)
    prepared = validate_ray_config(ray_config)
    workers = {name: (t["min_workers"], t["max_workers"]) for name, t in ray_config["available_node_types"].items()
               if name != HEAD_NODE_TYPE}
    assert workers == expected
    assert config.ray.address == "auto"  # served on the cluster it launches
    # Ray keeps its provider's head setup (boto3 / the Google API client) since pdcluster sets none of its own
    assert prepared["head_setup_commands"]


def test_setup_and_start_commands(tmp_path):
    raw = _raw({"type": "aws", "region": "us-west-2"}, AWS_TYPES, setup_commands=["echo first"],
               pdcluster_install="pdcluster==9.9", ray_install=False)
    raw["model"] = {"path": "~/models/tiny one", "preset": "tiny-llama"}
    ray_config, _ = _derive(raw, tmp_path)
    setup = ray_config["setup_commands"]
    assert setup[0] == "echo first"  # the user's environment comes first
    assert "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$HOME/pdcluster/files/auth_token" in setup[1]
    assert setup[2:] == ["pip install -q pdcluster==9.9",
                         "test -f ~/'models/tiny one'/config.json || pdcluster make-model ~/'models/tiny one' "
                         "--preset tiny-llama"]
    for commands in (ray_config["head_start_ray_commands"], ray_config["worker_start_ray_commands"]):
        assert commands[0] == "ray stop" and "RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=" in commands[1]
    head_start = ray_config["head_start_ray_commands"][1]
    assert "--head --port=6379 --autoscaling-config=~/ray_bootstrap_config.yaml" in head_start


def test_token_is_made_once_private_and_kept(tmp_path):
    raw = _raw({"type": "aws", "region": "us-west-2"}, AWS_TYPES)
    _, files = _derive(raw, tmp_path)
    token = files.token.read_text()
    assert len(token) == 64 and files.token.stat().st_mode & 0o077 == 0
    _derive(raw, tmp_path)
    assert files.token.read_text() == token  # a running cluster's nodes hold it: never replaced
    raw["launch"]["ray_auth"] = "disabled"
    ray_config, files = _derive(raw, tmp_path)
    assert files.token is None and not (files.node_files / "auth_token").exists()
    assert "RAY_AUTH_MODE=disabled ray start" in ray_config["worker_start_ray_commands"][1]


def test_default_installs_pin_this_ray_and_pdcluster():
    from importlib import metadata

    launch = parse_config(_raw({"type": "aws"}, AWS_TYPES)).launch
    ray_spec, pdcluster_spec = install_specs(launch)
    assert ray_spec == f"ray[default]=={metadata.version('ray')}"
    assert pdcluster_spec.startswith("pdcluster==")


def _workers(raw) -> dict:
    return {w.accelerator_type: (w.min_workers, w.max_workers) for w in plan_workers(parse_config(raw))}


def test_sizing_rounds_up_and_shares_nodes_between_tiers():
    shared = {"replicas": 3, "max_replicas": 5, "mesh": {"tp": 3},
              "resources": {"num_gpus": 0.5, "num_cpus": 1, "accelerator_type": "H100"}}
    raw = _raw({"type": "aws"}, AWS_TYPES, prefill=shared, decode=dict(shared, replicas=1, max_replicas=None))
    # ranks: 9 + 3 = 12 at 0.5 GPU = 6 GPUs -> 1 node; at max: 15 + 3 = 18 ranks = 9 GPUs -> 2 nodes. A100 unused.
    assert _workers(raw) == {"H100": (1, 2)}
    raw["launch"]["node_types"]["A100"]["max_workers"] = 2  # an unused type kept for later, by its own bounds
    raw["launch"]["node_types"]["H100"]["min_workers"] = 3
    assert _workers(raw) == {"A100": (0, 2), "H100": (3, 3)}


def test_zero_replicas_need_no_nodes_until_max():
    tier = {"replicas": 0, "max_replicas": 2, "resources": {"num_gpus": 8, "accelerator_type": "H100"}}
    assert _workers(_raw({"type": "aws"}, AWS_TYPES, prefill=tier))["H100"] == (0, 2)


@pytest.mark.parametrize("change, key, words", [
    (lambda r: r["launch"].pop("provider"), "launch.provider.type", "missing"),
    (lambda r: r["launch"]["provider"].update(type=3), "launch.provider.type", "missing"),
    (lambda r: r["launch"].update(head_node={}), "launch.head_node.node_config", "missing"),
    (lambda r: r["launch"].update(extra=1), "launch.extra", "unknown key"),
    (lambda r: r["launch"]["auth"].update(password="x"), "launch.auth.password", "unknown key"),
    (lambda r: r["launch"]["node_types"]["H100"].update(gpus=8), "launch.node_types.H100.gpus", "unknown key"),
    (lambda r: r["launch"]["node_types"]["H100"].update(gpus_per_node=-1), "launch.node_types.H100.gpus_per_node",
     ">= 0"),
    (lambda r: r["launch"]["node_types"]["H100"].update(resources={"GPU": 8}), "launch.node_types.H100.resources",
     "set by pdcluster"),
    (lambda r: r["launch"]["node_types"]["H100"].update(resources={"x": 0.5}), "launch.node_types.H100.resources",
     "whole number"),
    (lambda r: r["launch"]["node_types"]["H100"].update(worker_ips=["10.0.0.2"]), "launch.node_types.H100.worker_ips",
     "only the local provider"),
    (lambda r: r["launch"]["node_types"]["A100"].update(min_workers=3, max_workers=2),
     "launch.node_types.A100.max_workers", "below min_workers"),
    (lambda r: r["launch"].update(node_types={"H 100": {}}), "launch.node_types.H 100", "letters, digits"),
    (lambda r: r["launch"].update(cluster_name="a/b"), "launch.cluster_name", "letters, digits"),
    (lambda r: r["launch"].update(ray_auth="password"), "launch.ray_auth", "token"),
    (lambda r: r["launch"].update(pdcluster_install=""), "launch.pdcluster_install", "pip requirement"),
    (lambda r: r["launch"].update(setup_commands="pip install x"), "launch.setup_commands", "list of strings"),
    (lambda r: r["decode"]["resources"].update(accelerator_type="B200"), "decode.resources.accelerator_type",
     "launch.node_types.B200"),
    (lambda r: r["decode"]["resources"].pop("accelerator_type"), "decode.resources.accelerator_type",
     "one of launch.node_types (A100, H100)"),
    (lambda r: r.update(ray={"address": "10.0.0.1:6379"}), "ray.address", "leave ray.address out"),
])
def test_launch_section_errors_name_the_key(change, key, words):
    raw = copy.deepcopy(_raw({"type": "aws", "region": "us-west-2"}, AWS_TYPES))
    change(raw)
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert err.value.key == key
    assert words in str(err.value)


@pytest.mark.parametrize("change, key, words", [
    (lambda r: r["launch"]["node_types"]["A100"].update(gpus_per_node=0), "launch.node_types.A100.gpus_per_node",
     "offers none"),
    (lambda r: r["decode"]["resources"].update(num_gpus=16), "decode.resources", "more than a whole A100 node"),
    (lambda r: r["decode"]["resources"].pop("num_gpus") and r["launch"]["node_types"]["A100"].pop("cpus_per_node"),
     "launch.node_types.A100.cpus_per_node", "CPUs only"),
    (lambda r: r["decode"]["resources"].update(custom={"nvme": 1}), "launch.node_types.A100.resources", "nvme"),
    (lambda r: r["launch"]["node_types"]["A100"].update(max_workers=0), "launch.node_types.A100.max_workers",
     "below the 1 nodes"),
])
def test_sizing_errors_name_the_key(change, key, words):
    raw = copy.deepcopy(_raw({"type": "aws", "region": "us-west-2"}, AWS_TYPES))
    change(raw)
    with pytest.raises(ConfigError) as err:
        plan_workers(parse_config(raw))
    assert err.value.key == key
    assert words in str(err.value)


@pytest.mark.parametrize("change, key", [
    (lambda r: r["model"].update(path="models/llama"), "model.path"),
    (lambda r: r.update(router={"port": 0}), "router.port"),
    (lambda r: r["launch"]["auth"].update(ssh_private_key="no-such-key.pem"), "launch.auth.ssh_private_key"),
    (lambda r: r["launch"].update(file_mounts={"~/data": "no-such-dir"}), "launch.file_mounts.~/data"),
])
def test_derivation_errors_name_the_key(change, key, tmp_path):
    raw = _raw({"type": "aws", "region": "us-west-2"}, AWS_TYPES)
    change(raw)
    with pytest.raises(ConfigError) as err:
        _derive(raw, tmp_path)
    assert err.value.key == key


def test_local_paths_resolve_against_the_file_and_ray_rejects_a_bad_provider_block(tmp_path):
    (tmp_path / "key.pem").write_text("k")
    (tmp_path / "data").mkdir()
    raw = _raw({"type": "aws", "region": "us-west-2"}, AWS_TYPES, file_mounts={"~/data": "data"})
    raw["launch"]["auth"]["ssh_private_key"] = "key.pem"
    ray_config, _ = _derive(raw, tmp_path)
    assert ray_config["auth"]["ssh_private_key"] == str(tmp_path / "key.pem")
    assert ray_config["file_mounts"]["~/data"] == str(tmp_path / "data")
    broken = copy.deepcopy(ray_config)
    broken["provider"]["use_internal_ips"] = "yes"  # Ray's schema wants a boolean
    with pytest.raises(LaunchError, match="Ray rejects the derived cluster config at provider/use_internal_ips"):
        validate_ray_config(broken)


def test_files_without_launch_are_unchanged_and_launch_null_is_absent():
    config = parse_config({"model": {"path": "/m"}, "launch": None})
    assert config.launch is None and config.ray.address is None
    with pytest.raises(ConfigError) as err:
        derive_ray_config(config, {}, None)
    assert err.value.key == "launch"


def test_operations_doc_covers_every_launch_key():
    from orchestrator.config_launch import _NODE_TYPE_KEYS, LAUNCH_KEYS

    text = (DOCS / "cluster-operations.md").read_text()
    for key in (*LAUNCH_KEYS, *_NODE_TYPE_KEYS):
        assert f"{key}:" in text or f"`{key}`" in text, f"docs/cluster-operations.md does not explain launch key {key}"
