"""Ray's cluster-launcher config, derived from cluster.yaml's `launch:` section and the tiers.

Who calls it: `pdcluster launch` / `pdcluster down` (orchestrator/cli_launch.py) and tests. Pure apart from
`write_launch_files` (the derived YAML and the files it mounts) and `validate_ray_config` (Ray's own checks).

What is derived (docs/cluster-operations.md says it for users):
  - a head node type (`head`) from launch.head_node; it runs the router (`pdcluster serve`), no replicas;
  - one worker node type per accelerator type the tiers name (`<tier>.resources.accelerator_type`), offering
    `accelerator_type:<X>: 1` (what orchestrator/deploy.py's placement bundles ask for), GPU and CPU counts;
  - min_workers from the tiers' replica counts, max_workers from max_replicas (else replicas): each tier's ranks
    (replicas x mesh world size) times its per-rank resources, divided by what one node offers, rounded up;
  - setup commands that install Ray and pdcluster (and create a preset model) on every node, and start commands
    with Ray's token authentication set explicitly (the token is made here and mounted on every node).
Ray's `local` provider has no node types: its machines are listed by address; pdcluster gives each worker its
type's resources in the worker start command and the head its launch.head_node.resources.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import secrets
import shlex
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import yaml

from orchestrator.config import ClusterConfig, ConfigError, TierSection
from orchestrator.config_launch import LaunchSection, NodeTypeSection

HEAD_NODE_TYPE = "head"
REMOTE_DIR = "~/pdcluster"
# A folder mounted on every node (Ray syncs folders more reliably than single files, Docker images included).
REMOTE_FILES = f"{REMOTE_DIR}/files"
REMOTE_CONFIG = f"{REMOTE_FILES}/cluster.yaml"  # the user's cluster.yaml, as `pdcluster serve` reads it on the head
REMOTE_TOKEN_ENV = "$HOME/pdcluster/files/auth_token"  # RAY_AUTH_TOKEN_PATH on the nodes (the shell expands $HOME)
REMOTE_SERVE_LOG = f"{REMOTE_DIR}/serve.log"
REMOTE_SERVE_PID = f"{REMOTE_DIR}/serve.pid"
RAY_PORT = 6379
_FLOAT_SLACK = 1e-9  # 0.1 * 30 must count as 3 GPUs, not 3.0000000000000004


class LaunchError(RuntimeError):
    """`pdcluster launch` / `down` could not do what was asked; the message says what and how to fix it."""


@dataclass(frozen=True, kw_only=True)
class WorkerPlan:
    """One Ray worker node type: which accelerator it carries, what each node offers, and how many."""

    accelerator_type: str
    node_type_name: str
    resources: dict  # what one node offers, as Ray's node type `resources`
    min_workers: int
    max_workers: int


@dataclass(frozen=True, kw_only=True)
class LaunchFiles:
    """Local files the derived config mounts on the nodes; `write_launch_files` creates them."""

    state_dir: Path
    ray_config: Path  # the derived Ray cluster-launcher YAML
    node_files: Path  # the folder mounted at REMOTE_FILES on every node:
    cluster_config: Path  # ... the user's cluster.yaml, copied as is: `pdcluster serve` reads it on the head
    token: Path | None  # ... Ray's auth token (launch.ray_auth: token), made once per cluster and then reused


# ---------------------------------------------------------------------------------------------------- sizing


def _rank_demand(tier: TierSection) -> dict[str, float]:
    """What one rank actor of `tier` asks Ray for, in the resource names node types offer (as deploy.py's bundle)."""
    demand = {"CPU": float(tier.resources.get("num_cpus", 0.5)), "GPU": float(tier.resources.get("num_gpus") or 0)}
    demand.update({k: float(v) for k, v in tier.resources.get("custom", {}).items()})
    return {k: v for k, v in demand.items() if v > 0}


def _node_offer(node_type: NodeTypeSection) -> dict[str, float]:
    offer = {k: float(v) for k, v in node_type.resources.items()}
    if node_type.gpus_per_node:
        offer["GPU"] = float(node_type.gpus_per_node)
    if node_type.cpus_per_node is not None:
        offer["CPU"] = float(node_type.cpus_per_node)
    return offer


def _tier_ranks(tier: TierSection, *, at_most: bool) -> int:
    replicas = tier.max_replicas if at_most and tier.max_replicas is not None else tier.replicas
    return replicas * tier.mesh.world_size


def nodes_needed(node_type: NodeTypeSection, tiers: list[TierSection], *, at_most: bool) -> int:
    """Nodes of `node_type` that hold every rank of `tiers` (at their replica counts, or max_replicas when
    `at_most`): per resource, the total the ranks ask for over what one node offers, rounded up; the largest wins.
    CPUs count only where the node type says how many it has (otherwise Ray detects them at start-up)."""
    where = f"launch.node_types.{node_type.accelerator_type}"
    offer = _node_offer(node_type)
    totals: dict[str, float] = {}
    for tier in tiers:
        demand = _rank_demand(tier)
        for key, amount in demand.items():
            if key == "CPU" and node_type.cpus_per_node is None:
                continue
            if offer.get(key, 0) <= 0:
                field = {"GPU": "gpus_per_node", "CPU": "cpus_per_node"}.get(key, "resources")
                raise ConfigError(f"{where}.{field}", f"{tier.name} ranks ask for {key} {amount:g} each, and this "
                                  f"node type offers none; set {field}")
            if amount > offer[key] + _FLOAT_SLACK:
                raise ConfigError(f"{tier.name}.resources", f"one {tier.name} rank asks for {key} {amount:g}, more "
                                  f"than a whole {node_type.accelerator_type} node offers ({offer[key]:g})")
            totals[key] = totals.get(key, 0.0) + amount * _tier_ranks(tier, at_most=at_most)
    if not totals and any(_tier_ranks(t, at_most=True) for t in tiers):
        raise ConfigError(f"{where}.cpus_per_node", f"the {' and '.join(t.name for t in tiers)} ranks ask for CPUs "
                          "only: say how many CPUs one node has, so pdcluster can size the node count")
    return max((math.ceil(total / offer[key] - _FLOAT_SLACK) for key, total in totals.items()), default=0)


def plan_workers(config: ClusterConfig) -> list[WorkerPlan]:
    """The worker node types of a cloud provider: one per accelerator type that a tier names, plus node types of
    launch.node_types that no tier uses but that set max_workers themselves. Sorted by accelerator type."""
    launch = _launch(config)
    plans = []
    for name, node_type in sorted(launch.node_types.items()):
        tiers = [t for t in config.tiers() if t.resources.get("accelerator_type") == name]
        if not tiers and node_type.max_workers is None:
            continue
        low = node_type.min_workers if node_type.min_workers is not None else nodes_needed(node_type, tiers,
                                                                                           at_most=False)
        high = node_type.max_workers if node_type.max_workers is not None else max(
            low, nodes_needed(node_type, tiers, at_most=True))
        if high < low:
            raise ConfigError(f"launch.node_types.{name}.max_workers",
                              f"{high} is below the {low} nodes the tiers' replica counts need")
        offer = {f"accelerator_type:{name}": 1, **{k: int(v) for k, v in _node_offer(node_type).items()}}
        plans.append(WorkerPlan(accelerator_type=name, node_type_name=f"worker-{name}", resources=offer,
                                min_workers=low, max_workers=high))
    return plans


# ---------------------------------------------------------------------------------------------------- commands


def _launch(config: ClusterConfig) -> LaunchSection:
    if config.launch is None:
        raise ConfigError("launch", f"{config.source or 'cluster.yaml'} has no launch: section; add one (provider, "
                          "head_node, node_types; see docs/launch-aws.yaml) to let pdcluster start the Ray cluster")
    return config.launch


def pdcluster_version() -> str | None:
    try:
        return metadata.version("pdcluster")
    except metadata.PackageNotFoundError:  # a source checkout: the version its pyproject.toml declares
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        match = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M) if pyproject.exists() else None
        return match.group(1) if match else None


def install_specs(launch: LaunchSection) -> tuple[str, str]:
    """(ray, pdcluster) pip requirements for the nodes; "" where the node image already has it."""
    ray_spec = launch.ray_install if launch.ray_install is not None else f"ray[default]=={metadata.version('ray')}"
    if launch.pdcluster_install is not None:
        return ray_spec, launch.pdcluster_install
    version = pdcluster_version()
    return ray_spec, f"pdcluster=={version}" if version else "pdcluster"


def _remote_path(path: str) -> str:
    """A path for a remote shell: `~/` stays unquoted (so the shell expands it), the rest is quoted."""
    if path.startswith("~/"):
        return "~/" + shlex.quote(path[2:])
    return shlex.quote(path)


def auth_env(launch: LaunchSection) -> str:
    """Environment for every Ray process and driver on the nodes: the authentication mode, explicitly (Ray 2.60
    turns token mode on by itself only in some cases), and the token pdcluster made and mounted."""
    if launch.ray_auth == "token":
        return f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={REMOTE_TOKEN_ENV}"
    return f"RAY_AUTH_MODE={launch.ray_auth}"


def head_driver_env(launch: LaunchSection) -> str:
    """Environment for a Ray driver on the head (`pdcluster serve`, the node wait): the head's own Ray by address,
    not `auto`'s guess (which picks among every Ray instance it finds on the machine), and the token."""
    return f"{auth_env(launch)} RAY_ADDRESS=127.0.0.1:{RAY_PORT}"


def setup_commands(config: ClusterConfig, raw_model_path: str) -> list[str]:
    """Every node: the user's commands first (environment, drivers, weights), then Ray and pdcluster, then the
    preset model (seeded, so every node writes the same weights) where cluster.yaml asks for one."""
    launch = _launch(config)
    ray_spec, pdcluster_spec = install_specs(launch)
    commands = list(launch.setup_commands)
    # Interactive shells on the nodes (`ray exec`, `ray attach`, the autoscaler's commands) talk to the cluster
    # with the same authentication mode as its processes.
    commands.append(f"sed -i '/^export RAY_AUTH_/d' ~/.bashrc 2>/dev/null; "
                    f"echo 'export {auth_env(launch)}' >> ~/.bashrc")
    commands += [f"pip install -q {shlex.quote(spec)}" for spec in (ray_spec, pdcluster_spec) if spec]
    if config.model.preset:
        path = _remote_path(raw_model_path)
        commands.append(f"test -f {path}/config.json || pdcluster make-model {path} "
                        f"--preset {shlex.quote(config.model.preset)}")
    return commands


def _start_flags(resources: dict, *, quote: bool = True) -> str:
    """`ray start` flags for a local-provider machine: CPU and GPU have their own flags, the rest --resources.
    `quote=False`: for a shell variable expanded unquoted (the JSON is compact, so it stays one word)."""
    flags = []
    if "CPU" in resources:
        flags.append(f"--num-cpus={int(resources['CPU'])}")
    if "GPU" in resources:
        flags.append(f"--num-gpus={int(resources['GPU'])}")
    custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU")}
    if custom:
        text = json.dumps(custom, separators=(",", ":"), sort_keys=True)
        flags.append("--resources=" + (shlex.quote(text) if quote else text))
    return " ".join(flags)


def _local_worker_flags(launch: LaunchSection) -> str:
    """A shell snippet that sets FLAGS from the machine's own addresses (`hostname -I`): the local provider runs
    one start command on every worker, so the node type's resources are picked per address."""
    cases = []
    for name, node_type in sorted(launch.node_types.items()):
        if not node_type.worker_ips:
            continue
        offer = {f"accelerator_type:{name}": 1, **{k: int(v) for k, v in _node_offer(node_type).items()}}
        pattern = "|".join(shlex.quote(ip) for ip in node_type.worker_ips)
        cases.append(f"{pattern}) FLAGS={shlex.quote(_start_flags(offer, quote=False))};;")
    if not cases:
        return ""
    return f"FLAGS=''; for ip in $(hostname -I) $(hostname); do case $ip in {' '.join(cases)} esac; done; "


def start_commands(launch: LaunchSection) -> tuple[list[str], list[str]]:
    """(head, worker) `ray start` commands; the authentication mode is explicit on both sides."""
    env = auth_env(launch)
    head_flags = _start_flags(launch.head_node.resources) if launch.is_local else ""
    head = ["ray stop",
            f"ulimit -n 65536 2>/dev/null; {env} ray start --head --port={RAY_PORT} "
            f"--autoscaling-config=~/ray_bootstrap_config.yaml {head_flags}".rstrip()]
    if launch.is_local:
        worker_start = (f"{_local_worker_flags(launch)}ulimit -n 65536 2>/dev/null; "
                        f"{env} ray start --address=$RAY_HEAD_IP:{RAY_PORT} $FLAGS")
    else:  # the autoscaler passes each node type's resources to `ray start` itself
        worker_start = f"ulimit -n 65536 2>/dev/null; {env} ray start --address=$RAY_HEAD_IP:{RAY_PORT}"
    return head, ["ray stop", worker_start]


# ---------------------------------------------------------------------------------------------------- the config


def local_worker_ips(launch: LaunchSection) -> list[str]:
    ips = list(launch.provider.get("worker_ips", []))
    for _, node_type in sorted(launch.node_types.items()):
        ips += node_type.worker_ips
    duplicates = sorted({ip for ip in ips if ips.count(ip) > 1})
    if duplicates:
        raise ConfigError("launch.node_types", f"{', '.join(duplicates)} listed more than once (provider.worker_ips "
                          "and the node types' worker_ips name each machine once)")
    return ips


def derive_ray_config(config: ClusterConfig, raw: dict, files: LaunchFiles) -> dict:
    """Ray's cluster-launcher config (the dict `ray up` reads from YAML). `raw` is the parsed cluster.yaml
    document: paths in it are the nodes' paths, as written (parsing resolved them on this machine)."""
    launch = _launch(config)
    raw_model_path = str((raw.get("model") or {}).get("path", config.model.path))
    if not (raw_model_path.startswith("/") or raw_model_path.startswith("~")):
        raise ConfigError("model.path", f"{raw_model_path!r} is relative; the nodes read the model from their own "
                          "disks: give an absolute or ~/ path")
    if config.router.port == 0:
        raise ConfigError("router.port", "0 picks a free port at start-up; a launched router needs a fixed port "
                          "that clients can be told (for example 50051)")
    head_start, worker_start = start_commands(launch)
    provider = dict(launch.provider)
    mounts = {REMOTE_FILES: str(files.node_files), **launch.file_mounts}
    ray_config: dict = {
        "cluster_name": launch.cluster_name,
        "provider": provider,
        "auth": dict(launch.auth),
        "file_mounts": mounts,
        "setup_commands": setup_commands(config, raw_model_path),
        "head_start_ray_commands": head_start,
        "worker_start_ray_commands": worker_start,
    }
    if launch.idle_timeout_minutes is not None:
        ray_config["idle_timeout_minutes"] = launch.idle_timeout_minutes
    if launch.is_local:  # Ray's local provider: one implicit node type, machines by address
        provider["worker_ips"] = local_worker_ips(launch)
        ray_config["max_workers"] = len(provider["worker_ips"])
        return ray_config
    workers = plan_workers(config)
    ray_config["available_node_types"] = {
        HEAD_NODE_TYPE: {"node_config": dict(launch.head_node.node_config),
                         "resources": dict(launch.head_node.resources), "min_workers": 0, "max_workers": 0},
        **{w.node_type_name: {"node_config": dict(launch.node_types[w.accelerator_type].node_config),
                              "resources": dict(w.resources), "min_workers": w.min_workers,
                              "max_workers": w.max_workers} for w in workers},
    }
    ray_config["head_node_type"] = HEAD_NODE_TYPE
    ray_config["max_workers"] = sum(w.max_workers for w in workers)
    return ray_config


def required_nodes(config: ClusterConfig) -> tuple[dict[str, int], int]:
    """What must be up before the tiers are deployed: ({resource name: nodes that offer it}, total nodes incl.
    the head). `pdcluster launch` waits for this on the head (orchestrator/launch_wait.py)."""
    launch = _launch(config)
    if launch.is_local:
        need = {f"accelerator_type:{name}": len(t.worker_ips) for name, t in launch.node_types.items() if t.worker_ips}
        for name in launch.head_node.resources:
            if name.startswith("accelerator_type:"):
                need[name] = need.get(name, 0) + 1
        return need, 1 + len(local_worker_ips(launch))
    workers = plan_workers(config)
    need = {f"accelerator_type:{w.accelerator_type}": w.min_workers for w in workers if w.min_workers}
    return need, 1 + sum(w.min_workers for w in workers)


# ---------------------------------------------------------------------------------------------------- files


def default_state_dir(cluster_name: str) -> Path:
    """Where `pdcluster launch` keeps a cluster's derived files (override: PDCLUSTER_LAUNCH_DIR or --state-dir)."""
    root = os.environ.get("PDCLUSTER_LAUNCH_DIR") or os.path.join("~", ".pdcluster", "launch")
    return Path(os.path.expanduser(root)) / cluster_name


def launch_files(config: ClusterConfig, state_dir: str | os.PathLike | None = None) -> LaunchFiles:
    launch = _launch(config)
    folder = Path(state_dir).expanduser().resolve() if state_dir else default_state_dir(launch.cluster_name)
    node_files = folder / "node-files"
    return LaunchFiles(state_dir=folder, ray_config=folder / "ray-cluster.yaml", node_files=node_files,
                       cluster_config=node_files / "cluster.yaml",
                       token=node_files / "auth_token" if launch.ray_auth == "token" else None)


def check_local_files(config: ClusterConfig, base_dir: Path) -> None:
    """The launch section's files on this machine (ssh key, mounted paths) exist: Ray would fail later, worse."""
    launch = _launch(config)
    key = launch.auth.get("ssh_private_key")
    if key and not _local(key, base_dir).exists():
        raise ConfigError("launch.auth.ssh_private_key", f"{_local(key, base_dir)} does not exist")
    for remote, local in launch.file_mounts.items():
        if not _local(local, base_dir).exists():
            raise ConfigError(f"launch.file_mounts.{remote}", f"{_local(local, base_dir)} does not exist")


def _local(path: str, base_dir: Path) -> Path:
    path = Path(os.path.expanduser(path))
    return path if path.is_absolute() else (base_dir / path).resolve()


def resolve_local_paths(config: ClusterConfig, base_dir: Path) -> ClusterConfig:
    """Local paths of the launch section made absolute against cluster.yaml's folder (Ray resolves them against
    its own working directory otherwise)."""
    launch = _launch(config)
    auth = dict(launch.auth)
    for key in ("ssh_private_key", "ssh_public_key"):
        if key in auth:
            auth[key] = str(_local(auth[key], base_dir))
    mounts = {remote: str(_local(local, base_dir)) for remote, local in launch.file_mounts.items()}
    return dataclasses.replace(config, launch=dataclasses.replace(launch, auth=auth, file_mounts=mounts))


def write_launch_files(config_path: str | os.PathLike, config: ClusterConfig, files: LaunchFiles) -> dict:
    """Derive the Ray config for the cluster.yaml at `config_path` and write it with the files it mounts
    (the token is made once and kept: a running cluster's nodes hold it). Returns the derived config."""
    source = Path(config_path)
    raw = yaml.safe_load(source.read_text()) or {}
    base_dir = source.resolve().parent
    check_local_files(config, base_dir)
    config = resolve_local_paths(config, base_dir)
    files.node_files.mkdir(parents=True, exist_ok=True)
    files.cluster_config.write_text(source.read_text())
    if files.token is not None and not files.token.exists():
        files.token.touch(mode=0o600)
        files.token.write_text(secrets.token_hex(32))
    elif files.token is None and (files.node_files / "auth_token").exists():  # ray_auth turned off: not shipped
        (files.node_files / "auth_token").unlink()
    ray_config = derive_ray_config(config, raw, files)
    files.ray_config.write_text(dump_ray_config(ray_config))
    return ray_config


def dump_ray_config(ray_config: dict) -> str:
    header = "# Ray cluster-launcher config derived by `pdcluster launch` from cluster.yaml; `ray up` reads it.\n"
    return header + yaml.safe_dump(ray_config, sort_keys=False, width=120)


def validate_ray_config(ray_config: dict) -> dict:
    """Ray's own checks, as `ray up` makes them before touching a provider: its defaults for the provider merged in
    (`prepare_config`), then the JSON schema and the node-type rules (`validate_config`). Returns the prepared
    config; raises LaunchError with Ray's message. The provider's own bootstrap (cloud API calls) is not run."""
    import copy

    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        prepared = prepare_config(copy.deepcopy(ray_config))
        validate_config(prepared)
    except Exception as exc:  # jsonschema.ValidationError, ValueError, or Ray's cli abort (SystemExit-free)
        where = "/".join(str(p) for p in getattr(exc, "absolute_path", []) or [])
        message = getattr(exc, "message", None) or str(exc)
        at = f" at {where}" if where else ""
        raise LaunchError(f"Ray rejects the derived cluster config{at}: {message}") from None
    return prepared


def python_ray_cli() -> list[str]:
    """The `ray` command of this Python (the same Ray version that derived and validated the config)."""
    return [sys.executable, "-m", "ray.scripts.scripts"]
