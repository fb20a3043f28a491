"""cluster.yaml's optional `launch:` section: the Ray cluster that `pdcluster launch` starts with `ray up`.

Who calls it: `orchestrator.config.parse_config` (once, at load) through `parse_launch`, and `apply_launch_rules`
for what the section implies about the rest of the file. orchestrator/launch.py turns a parsed `LaunchSection`
into Ray's cluster-launcher YAML. Validation here covers only what can be checked without the network or the
user's local files (a key file or a file mount is checked by `pdcluster launch` itself, on the machine that runs it:
the router also parses this section when a user sends the file with `pdcluster apply`).

    launch:
      cluster_name: pdcluster          # Ray's cluster name (`ray up` tags nodes with it)
      provider: {type: aws, region: us-west-2}   # Ray's provider block, passed through as is
      auth: {ssh_user: ubuntu}         # ssh_user, ssh_private_key, ssh_public_key
      head_node: {node_config: {InstanceType: m5.2xlarge}, resources: {}}
      node_types:                      # one worker node type per accelerator type named by the tiers
        H100: {node_config: {InstanceType: p5.48xlarge}, gpus_per_node: 8, cpus_per_node: 192}
      setup_commands: []               # extra commands run on every node before pdcluster is installed
      file_mounts: {}                  # remote path -> local path, as Ray's file_mounts
      pdcluster_install: "pdcluster==0.1.0"   # pip spec; default: this version; false: already installed
      ray_install: "ray[default]==2.60.0"     # pip spec; default: this Ray version; false: already installed
      ray_auth: token                  # token (default) or disabled
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from orchestrator.config import ConfigError, RaySection, TierSection, _int, _reject_unknown, _section, _str

LAUNCH_KEYS = ("cluster_name", "provider", "auth", "head_node", "node_types", "setup_commands", "file_mounts",
               "pdcluster_install", "ray_install", "idle_timeout_minutes", "ray_auth")
_AUTH_KEYS = ("ssh_user", "ssh_private_key", "ssh_public_key")
_NODE_TYPE_KEYS = ("node_config", "gpus_per_node", "cpus_per_node", "resources", "min_workers", "max_workers",
                   "worker_ips")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # goes into Ray node type and resource names, and a folder name
LOCAL_PROVIDER = "local"  # Ray's on-premise provider: fixed machines by IP, no node types


@dataclass(frozen=True, kw_only=True)
class HeadNodeSection:
    node_config: dict[str, Any] = field(default_factory=dict)  # provider-specific, passed to Ray as is
    resources: dict[str, int] = field(default_factory=dict)  # Ray resources the head offers (names as Ray spells them)


@dataclass(frozen=True, kw_only=True)
class NodeTypeSection:
    """One worker node type; its key in `launch.node_types` is the accelerator type the tiers ask for."""

    accelerator_type: str
    node_config: dict[str, Any] = field(default_factory=dict)
    gpus_per_node: int = 0
    cpus_per_node: int | None = None  # None: Ray detects it; then CPU-only tiers cannot be sized
    resources: dict[str, int] = field(default_factory=dict)  # extra Ray resources each node offers
    min_workers: int | None = None  # None: derived from the tiers' replica counts
    max_workers: int | None = None  # None: derived from the tiers' max_replicas
    worker_ips: tuple[str, ...] = ()  # local provider only: the machines of this type


@dataclass(frozen=True, kw_only=True)
class LaunchSection:
    provider: dict[str, Any]  # Ray's provider block (type, region, head_ip, ...), passed through
    cluster_name: str = "pdcluster"
    auth: dict[str, str] = field(default_factory=dict)
    head_node: HeadNodeSection = field(default_factory=HeadNodeSection)
    node_types: dict[str, NodeTypeSection] = field(default_factory=dict)
    setup_commands: tuple[str, ...] = ()
    file_mounts: dict[str, str] = field(default_factory=dict)
    pdcluster_install: str | None = None  # None: this pdcluster version from PyPI; "": already on the nodes
    ray_install: str | None = None  # None: this Ray version; "": already on the nodes
    idle_timeout_minutes: int | None = None
    ray_auth: str = "token"  # "token": pdcluster makes a token and puts it on every node; "disabled"

    @property
    def is_local(self) -> bool:
        return self.provider.get("type") == LOCAL_PROVIDER


def _name(value: Any, key: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ConfigError(key, f"{what} {value!r} must be letters, digits, '-', '_' or '.', starting with a "
                          "letter or digit")
    return value


def _mapping(raw: dict, key: str, prefix: str) -> dict:
    return dict(_section(raw, key, prefix))


def _resources(raw: dict, key: str, prefix: str) -> dict[str, int]:
    value = _mapping(raw, key, prefix)
    for name, amount in value.items():
        if not isinstance(name, str) or isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
            raise ConfigError(f"{prefix}{key}", "expected a mapping of Ray resource name to a whole number >= 0, "
                              f"e.g. {{CPU: 8, my_resource: 1}} (got {name!r}: {amount!r})")
    return value


def _strings(raw: dict, key: str, prefix: str) -> tuple[str, ...]:
    value = raw.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{prefix}{key}", f"expected a list of strings, got {value!r}")
    return tuple(value)


def _install(raw: dict, key: str, prefix: str) -> str | None:
    """Missing: None (pdcluster picks the default); false: "" (already installed); else a pip spec string."""
    if key not in raw:
        return None
    value = raw[key]
    if value is False:
        return ""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{prefix}{key}", f"expected a pip requirement such as 'pdcluster==0.1.0', or false when "
                          f"the node image has it already; got {value!r}")
    return value.strip()


def _parse_node_type(raw: Any, accelerator_type: str, is_local: bool) -> NodeTypeSection:
    p = f"launch.node_types.{accelerator_type}."
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(p[:-1], f"expected a mapping (node_config, gpus_per_node, ...), got {raw!r}")
    _reject_unknown(raw, _NODE_TYPE_KEYS, p)
    if is_local and "node_config" in raw:
        raise ConfigError(f"{p}node_config", "the local provider starts no machines; list them in worker_ips")
    if not is_local and "worker_ips" in raw:
        raise ConfigError(f"{p}worker_ips", "only the local provider takes machine addresses; cloud providers start "
                          "nodes from node_config")
    node_type = NodeTypeSection(
        accelerator_type=accelerator_type,
        node_config=_mapping(raw, "node_config", p),
        gpus_per_node=_int(raw, "gpus_per_node", p, 0, minimum=0),
        cpus_per_node=_int(raw, "cpus_per_node", p, None, minimum=1),
        resources=_resources(raw, "resources", p),
        min_workers=_int(raw, "min_workers", p, None, minimum=0),
        max_workers=_int(raw, "max_workers", p, None, minimum=0),
        worker_ips=_strings(raw, "worker_ips", p),
    )
    if None not in (node_type.min_workers, node_type.max_workers) and node_type.max_workers < node_type.min_workers:
        raise ConfigError(f"{p}max_workers", f"{node_type.max_workers} is below min_workers ({node_type.min_workers})")
    for reserved in ("GPU", "CPU", f"accelerator_type:{accelerator_type}"):
        if reserved in node_type.resources:
            raise ConfigError(f"{p}resources", f"{reserved!r} is set by pdcluster (gpus_per_node, cpus_per_node and "
                              "the node type's key); list only extra resources here")
    return node_type


def parse_launch(raw: dict) -> LaunchSection | None:
    """The `launch:` section of a parsed cluster.yaml document, or None when it is absent (or null)."""
    if raw.get("launch") is None:
        return None
    section = _section(raw, "launch")
    p = "launch."
    _reject_unknown(section, LAUNCH_KEYS, p)
    provider = _mapping(section, "provider", p)
    if not isinstance(provider.get("type"), str) or not provider["type"]:
        raise ConfigError("launch.provider.type", "missing: name Ray's node provider (aws, gcp, azure, local, ...) "
                          "and give its settings (region, project_id, head_ip, ...) next to it")
    is_local = provider["type"] == LOCAL_PROVIDER
    if is_local and not isinstance(provider.get("head_ip"), str):
        raise ConfigError("launch.provider.head_ip", "the local provider needs the head machine's address")
    if "worker_ips" in provider and not (isinstance(provider["worker_ips"], list)
                                         and all(isinstance(ip, str) for ip in provider["worker_ips"])):
        raise ConfigError("launch.provider.worker_ips", f"expected a list of addresses, got {provider['worker_ips']!r}")

    auth = _mapping(section, "auth", p)
    _reject_unknown(auth, _AUTH_KEYS, "launch.auth.")
    for key in auth:
        _str(auth, key, "launch.auth.", None)
    if is_local and "ssh_user" not in auth:
        raise ConfigError("launch.auth.ssh_user", "the local provider logs in over ssh: name the user")

    head_raw = _mapping(section, "head_node", p)
    _reject_unknown(head_raw, ("node_config", "resources"), "launch.head_node.")
    head = HeadNodeSection(node_config=_mapping(head_raw, "node_config", "launch.head_node."),
                           resources=_resources(head_raw, "resources", "launch.head_node."))
    if is_local and head.node_config:
        raise ConfigError("launch.head_node.node_config", "the local provider starts no machines; the head is "
                          "launch.provider.head_ip")
    if not is_local and not head.node_config:
        raise ConfigError("launch.head_node.node_config", f"missing: the {provider['type']} machine for the head "
                          "(for example {InstanceType: m5.2xlarge} on AWS, {machineType: n2-standard-8, ...} on GCP)")

    types_raw = _mapping(section, "node_types", p)
    node_types = {_name(name, f"launch.node_types.{name}", "accelerator type"): _parse_node_type(value, name, is_local)
                  for name, value in types_raw.items()}

    mounts = _mapping(section, "file_mounts", p)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in mounts.items()):
        raise ConfigError("launch.file_mounts", "expected a mapping of remote path to local path")

    return LaunchSection(
        cluster_name=_name(_str(section, "cluster_name", p, "pdcluster"), "launch.cluster_name", "cluster name"),
        provider=provider,
        auth=auth,
        head_node=head,
        node_types=node_types,
        setup_commands=_strings(section, "setup_commands", p),
        file_mounts=mounts,
        pdcluster_install=_install(section, "pdcluster_install", p),
        ray_install=_install(section, "ray_install", p),
        idle_timeout_minutes=_int(section, "idle_timeout_minutes", p, None, minimum=0),
        ray_auth=_str(section, "ray_auth", p, "token", ("token", "disabled")),
    )


def apply_launch_rules(launch: LaunchSection, ray_section: RaySection, tiers: tuple[TierSection, ...]) -> RaySection:
    """What a `launch:` section means for the rest of the file; returns the ray section to use.

    The file is served on the launched cluster's head, so Ray is that cluster (`ray.address: auto`); and every
    tier's accelerator type must be one the launched nodes offer, or its replicas could never be placed."""
    if ray_section.address not in (None, "auto"):
        raise ConfigError("ray.address", f"{ray_section.address!r}: a file with a launch: section is served on the "
                          "cluster it launches; leave ray.address out (or write auto)")
    offered = set(launch.node_types)
    offered |= {name.split(":", 1)[1] for name in launch.head_node.resources if name.startswith("accelerator_type:")}
    for tier in tiers:
        accelerator = tier.resources.get("accelerator_type")
        if accelerator is None and not launch.is_local:
            raise ConfigError(f"{tier.name}.resources.accelerator_type",
                              "missing: `pdcluster launch` starts one worker node type per accelerator type; set it to "
                              f"one of launch.node_types ({', '.join(sorted(offered)) or 'none defined yet'})")
        if accelerator is not None and accelerator not in offered:
            raise ConfigError(f"{tier.name}.resources.accelerator_type",
                              f"{accelerator!r} is not offered by any launched node; add "
                              f"launch.node_types.{accelerator} "
                              f"(offered now: {', '.join(sorted(offered)) or 'none'})")
    return dataclasses.replace(ray_section, address="auto")
