"""cluster.yaml: the one file that describes a pdcluster deployment.

Loaded once at the edge (`load_config`) and turned into frozen dataclasses; every problem is reported as a
`ConfigError` that names the key (`decode.mesh.tp`), what is wrong, and what to write instead. Nothing past this
module reads raw YAML.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG_NAME = "default_cluster.yaml"


class ConfigError(ValueError):
    """A cluster.yaml problem, with the dotted key that holds it."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"cluster.yaml: {key}: {message}")


@dataclass(frozen=True, kw_only=True)
class ModelSection:
    path: str  # HF-format directory (config.json + *.safetensors [+ tokenizer.json])
    preset: str | None = None  # created at `path` with seeded random weights if the directory is missing
    dtype: str = "float32"
    name: str = ""  # shown in status; defaults to the directory name


def _default_disaggregation():
    from orchestrator.config_colocate import DisaggregationSection  # lazy: that module builds on the helpers below

    return DisaggregationSection()


@dataclass(frozen=True, kw_only=True)
class RouterSection:
    host: str = "127.0.0.1"
    port: int = 50051
    policy: str = "least-loaded"
    max_inflight: int = 256  # admission limit: more concurrent requests get RESOURCE_EXHAUSTED
    max_message_bytes: int = 4 * 1024 * 1024
    max_prompt_tokens: int | None = None  # None: the model's context
    max_streams_per_client: int | None = None  # concurrent Generate streams per client address (None: no limit)
    max_retries: int = 2  # a request whose replica fails is retried on another one this many times
    replica_timeout_s: float = 30.0  # a replica that makes no progress on a request for this long has failed
    tokens_file: str | None = None  # bearer tokens with roles (see orchestrator/security.py); None: no auth
    tls_cert: str | None = None  # PEM files; cert + key turn TLS on
    tls_key: str | None = None
    tls_client_ca: str | None = None  # clients must present a certificate signed by this CA (mutual TLS)
    # True: the tiers outlive the router (Ray detached actors); a new router with the same file re-attaches to them,
    # and stopping the router leaves them running (docs/cluster-operations.md, "Router restart").
    detach_tiers: bool = False
    # Which prompts skip the prefill tier and are prefilled on their decode replica (orchestrator/config_colocate.py).
    disaggregation: "DisaggregationSection" = field(default_factory=_default_disaggregation)


@dataclass(frozen=True, kw_only=True)
class MeshSection:
    tp: int = 1
    cp: int = 1
    pp: int = 1
    ep: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.pp


@dataclass(frozen=True, kw_only=True)
class PrefixCacheSection:
    """prefill.prefix_cache: each prefill replica keeps prompts' KV and reuses their longest cached prefix."""

    max_tokens: int = 0  # KV tokens a replica keeps over all cached prompts (LRU); 0: no prefix cache
    block_size: int = 16  # tokens per hashed block: prefixes match in whole blocks


@dataclass(frozen=True, kw_only=True)
class PrefixRoutingSection:
    """prefill.prefix_routing: the prefix-aware policy's limits (orchestrator/policies.py)."""

    max_imbalance: int = 4  # requests in flight beyond the least-loaded replica before the prefix is ignored
    index_blocks: int = 65536  # block hashes the router remembers per replica (oldest forgotten first)


@dataclass(frozen=True, kw_only=True)
class TierSection:
    name: str  # "prefill" or "decode"
    replicas: int = 1
    min_replicas: int = 0
    max_replicas: int | None = None
    mesh: MeshSection = field(default_factory=MeshSection)
    # Ray resources of each rank actor: num_cpus, num_gpus, accelerator_type, and custom resources.
    resources: dict[str, Any] = field(default_factory=lambda: {"num_cpus": 0.5})
    # prefill: batching budget per forward pass
    max_batch_tokens: int = 4096
    max_batch_seqs: int = 32
    # decode: paged KV cache and running batch. num_kv_blocks set: exactly that many blocks; None (unset): a GPU
    # tier sizes its cache from gpu_memory_fraction at start-up, a CPU tier takes 1024 (decode_tier/kv_sizing.py).
    num_kv_blocks: int | None = None
    gpu_memory_fraction: float = 0.9  # share of each GPU the rank may fill (weights + activations + KV cache)
    block_size: int = 16
    max_num_seqs: int = 64
    # decode: tokens one engine step feeds, decode rows first, local-prefill prompt chunks in the rest (None: prefill)
    max_step_tokens: int | None = None
    max_restarts: int = 3  # Ray restarts a dead replica this many times
    placement: str = "pack"  # a replica's ranks on one node ("pack", the default) or across nodes ("spread")
    policy: str = "least-loaded"  # which replica of this tier gets a request; unset in cluster.yaml: router.policy
    prefix_cache: PrefixCacheSection = field(default_factory=PrefixCacheSection)  # prefill only
    prefix_routing: PrefixRoutingSection = field(default_factory=PrefixRoutingSection)  # prefill only
    # Optional SLO autoscaling of this tier's replica count (orchestrator/autoscale_config.py); None: fixed count.
    autoscale: "AutoscaleSection | None" = None
    # GPU all-reduce / all-to-all algorithms of the rank mesh (direct access vs NCCL; mesh/collectives_config.py)
    collectives: "CollectivesConfig | None" = None


@dataclass(frozen=True, kw_only=True)
class KVTransferSection:
    backend: str = "ucx"
    lease_s: float = 30.0  # a reservation with no completed transfer after this long is freed
    layerwise: bool = True  # push layer l while layer l+1 computes
    checksum: bool = False  # per-layer checksum, for debugging


@dataclass(frozen=True, kw_only=True)
class RaySection:
    address: str | None = None  # None: start a local Ray instance; "auto" or host:port joins a cluster
    num_cpus: int | None = None  # logical CPUs of the local instance (None: enough for the tiers)
    placement_timeout_s: float | None = None  # how long a replica may wait for room (None: 60 s)
    namespace: str | None = None  # Ray namespace of detached tiers (None: pdcluster-<model name>-<router port>)


@dataclass(frozen=True, kw_only=True)
class EndpointSection:
    """An optional HTTP listener (metrics, gateway): port None = off, 0 = any free port."""

    host: str = "127.0.0.1"
    port: int | None = None

    @property
    def is_enabled(self) -> bool:
        return self.port is not None


@dataclass(frozen=True, kw_only=True)
class LoggingSection:
    level: str = "INFO"  # of `pdcluster serve`; the per-request JSON lines are INFO


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    model: ModelSection
    router: RouterSection
    prefill: TierSection
    decode: TierSection
    kv_transfer: KVTransferSection
    ray: RaySection
    metrics: EndpointSection = field(default_factory=EndpointSection)  # Prometheus /metrics
    gateway: EndpointSection = field(default_factory=EndpointSection)  # OpenAI-compatible HTTP API
    logging: LoggingSection = field(default_factory=LoggingSection)
    launch: "LaunchSection | None" = None  # the Ray cluster `pdcluster launch` starts (orchestrator/config_launch.py)
    source: str = ""  # file it came from, for messages
    # "colocated": no prefill tier (its section has 0 replicas); every decode replica prefills its own prompts.
    mode: str = "disaggregated"

    @property
    def is_colocated(self) -> bool:
        return self.mode == "colocated"

    def tiers(self) -> tuple[TierSection, TierSection]:
        return (self.prefill, self.decode)


_KNOWN_BACKENDS = ("ucx", "nccl")
_KNOWN_POLICIES = ("least-loaded", "power-of-two", "round-robin", "prefix-aware")
_KNOWN_DTYPES = ("float32", "bfloat16", "float16")
_KNOWN_RESOURCE_KEYS = ("num_cpus", "num_gpus", "accelerator_type", "memory", "custom")
_KNOWN_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _section(raw: dict, key: str, parent: str = "") -> dict:
    full = f"{parent}{key}"
    value = raw.get(key, {})
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(full, f"expected a mapping, got {type(value).__name__} ({value!r})")
    return value


def _reject_unknown(section: dict, allowed: tuple[str, ...], prefix: str) -> None:
    for key in section:
        if key not in allowed:
            raise ConfigError(f"{prefix}{key}", f"unknown key; allowed keys here: {', '.join(allowed)}")


def _int(section: dict, key: str, prefix: str, default: int | None, *, minimum: int | None = None) -> int | None:
    value = section.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{prefix}{key}", f"expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{prefix}{key}", f"must be >= {minimum}, got {value}")
    return value


def _float(section: dict, key: str, prefix: str, default: float, *, positive: bool = True) -> float:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{prefix}{key}", f"expected a number, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"{prefix}{key}", f"must be > 0, got {value}")
    return float(value)


def _str(section: dict, key: str, prefix: str, default: str | None, choices: tuple[str, ...] | None = None) -> str | None:
    value = section.get(key, default)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{prefix}{key}", f"expected a string, got {value!r}")
    if choices is not None and value not in choices:
        raise ConfigError(f"{prefix}{key}", f"{value!r} is not one of: {', '.join(choices)}")
    return value


def _bool(section: dict, key: str, prefix: str, default: bool) -> bool:
    value = section.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{prefix}{key}", f"expected true or false, got {value!r}")
    return value


def _parse_mesh(raw: dict, prefix: str) -> MeshSection:
    _reject_unknown(raw, ("tp", "cp", "pp", "ep"), prefix)
    degrees = {k: _int(raw, k, prefix, 1, minimum=1) for k in ("tp", "cp", "pp", "ep")}
    return MeshSection(**degrees)


def _parse_resources(raw: dict, prefix: str) -> dict[str, Any]:
    _reject_unknown(raw, _KNOWN_RESOURCE_KEYS, prefix)
    resources: dict[str, Any] = {}
    if "num_cpus" in raw:
        resources["num_cpus"] = _float(raw, "num_cpus", prefix, 0.5)
    if "num_gpus" in raw:
        resources["num_gpus"] = _float(raw, "num_gpus", prefix, 1.0)
    if "memory" in raw:
        resources["memory"] = _int(raw, "memory", prefix, None, minimum=1)
    if "accelerator_type" in raw:
        resources["accelerator_type"] = _str(raw, "accelerator_type", prefix, None)
    if "custom" in raw:
        custom = raw["custom"]
        if not isinstance(custom, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in custom.items()
        ):
            raise ConfigError(f"{prefix}custom", "expected a mapping of resource name to amount, e.g. {my_res: 1}")
        resources["custom"] = dict(custom)
    if "num_cpus" not in resources:
        resources["num_cpus"] = 0.5 if "num_gpus" not in resources else 1.0
    return resources


def _parse_endpoint(raw: dict, name: str) -> EndpointSection:
    p = f"{name}."
    _reject_unknown(raw, ("host", "port"), p)
    port = _int(raw, "port", p, None, minimum=0)
    if port is not None and port > 65535:
        raise ConfigError(f"{p}port", f"{port} is not a TCP port (0-65535; 0 picks a free one; null turns {name} off)")
    return EndpointSection(host=_str(raw, "host", p, "127.0.0.1"), port=port)


def _parse_logging(raw: dict) -> LoggingSection:
    _reject_unknown(raw, ("level",), "logging.")
    level = _str(raw, "level", "logging.", "INFO")
    if level.upper() not in _KNOWN_LOG_LEVELS:
        raise ConfigError("logging.level", f"{level!r} is not one of: {', '.join(_KNOWN_LOG_LEVELS)}")
    return LoggingSection(level=level.upper())


def _parse_prefix(raw: dict, name: str, policy: str) -> dict:
    """prefix_cache / prefix_routing of a tier (prefill only), checked against the tier's policy."""
    p = f"{name}."
    fields = {}
    for key in ("prefix_cache", "prefix_routing"):
        if key in raw and name != "prefill":
            raise ConfigError(f"{p}{key}", f"the prefix cache lives in the prefill tier: move it to prefill.{key}")
    cache_raw = _section(raw, "prefix_cache", p)
    _reject_unknown(cache_raw, ("max_tokens", "block_size"), f"{p}prefix_cache.")
    fields["prefix_cache"] = PrefixCacheSection(
        max_tokens=_int(cache_raw, "max_tokens", f"{p}prefix_cache.", 0, minimum=0),
        block_size=_int(cache_raw, "block_size", f"{p}prefix_cache.", 16, minimum=1))
    routing_raw = _section(raw, "prefix_routing", p)
    _reject_unknown(routing_raw, ("max_imbalance", "index_blocks"), f"{p}prefix_routing.")
    fields["prefix_routing"] = PrefixRoutingSection(
        max_imbalance=_int(routing_raw, "max_imbalance", f"{p}prefix_routing.", 4, minimum=0),
        index_blocks=_int(routing_raw, "index_blocks", f"{p}prefix_routing.", 65536, minimum=1))
    if name == "prefill" and policy == "prefix-aware" and fields["prefix_cache"].max_tokens == 0:
        raise ConfigError(f"{p}policy", "prefix-aware routing sends a follow-up turn to the replica holding its "
                          "prefix, which needs a prefix cache: set prefill.prefix_cache.max_tokens (e.g. 65536)")
    return fields


def _parse_tier(raw: dict, name: str, default_policy: str = "least-loaded") -> TierSection:
    p = f"{name}."
    allowed = ("replicas", "min_replicas", "max_replicas", "mesh", "resources", "max_batch_tokens", "max_batch_seqs",
               "num_kv_blocks", "gpu_memory_fraction", "block_size", "max_num_seqs", "max_restarts", "placement",
               "autoscale")
    allowed += ("policy", "prefix_cache", "prefix_routing")
    allowed += ("max_step_tokens",)
    allowed += ("collectives",)
    _reject_unknown(raw, allowed, p)
    replicas = _int(raw, "replicas", p, 1, minimum=0)
    min_replicas = _int(raw, "min_replicas", p, 0, minimum=0)
    max_replicas = _int(raw, "max_replicas", p, None, minimum=1)
    if replicas < min_replicas:
        raise ConfigError(f"{p}replicas", f"{replicas} is below min_replicas ({min_replicas})")
    if max_replicas is not None and replicas > max_replicas:
        raise ConfigError(f"{p}replicas", f"{replicas} is above max_replicas ({max_replicas})")
    resources = _parse_resources(_section(raw, "resources", p), f"{p}resources.")
    policy = _str(raw, "policy", p, default_policy, _KNOWN_POLICIES)
    num_kv_blocks = _int(raw, "num_kv_blocks", p, None, minimum=1)
    if num_kv_blocks is None and not resources.get("num_gpus"):
        num_kv_blocks = 1024  # CPU: no device memory to size from
    gpu_memory_fraction = _float(raw, "gpu_memory_fraction", p, 0.9)
    if gpu_memory_fraction > 1:
        raise ConfigError(f"{p}gpu_memory_fraction", f"must be in (0, 1] (a share of each GPU's memory), got "
                                                     f"{gpu_memory_fraction}")
    tier = TierSection(
        name=name,
        replicas=replicas,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        mesh=_parse_mesh(_section(raw, "mesh", p), f"{p}mesh."),
        resources=resources,
        max_batch_tokens=_int(raw, "max_batch_tokens", p, 4096, minimum=1),
        max_batch_seqs=_int(raw, "max_batch_seqs", p, 32, minimum=1),
        num_kv_blocks=num_kv_blocks,
        gpu_memory_fraction=gpu_memory_fraction,
        block_size=_int(raw, "block_size", p, 16, minimum=1),
        max_num_seqs=_int(raw, "max_num_seqs", p, 64, minimum=1),
        max_restarts=_int(raw, "max_restarts", p, 3, minimum=0),
        placement=_str(raw, "placement", p, "pack", ("pack", "spread")),
        max_step_tokens=_parse_step_tokens(raw, name, bool(resources.get("num_gpus"))),
        policy=policy,
        **_parse_prefix(raw, name, policy),
        autoscale=_parse_autoscale(raw.get("autoscale"), name, replicas=replicas, tier_min=min_replicas,
                                   tier_max=max_replicas),
        collectives=_parse_collectives(raw.get("collectives"), name),
    )
    return tier


def _parse_collectives(raw, name: str):
    from mesh.collectives_config import CollectivesConfigError, parse_collectives_config  # lazy, pure Python

    try:
        return parse_collectives_config(raw)
    except CollectivesConfigError as error:
        key = f"{name}.collectives" + (f".{error.key}" if error.key else "")
        raise ConfigError(key, error.detail) from None


def _parse_step_tokens(raw: dict, name: str, uses_gpu: bool) -> int | None:
    from orchestrator.config_colocate import parse_max_step_tokens  # lazy: that module builds on the helpers above

    max_num_seqs = _int(raw, "max_num_seqs", f"{name}.", 64, minimum=1)
    return parse_max_step_tokens(raw, name, max_num_seqs=max_num_seqs, uses_gpu=uses_gpu)


def _parse_autoscale(raw, name: str, **bounds):
    from orchestrator.autoscale_config import parse_autoscale  # lazy: that module builds on the helpers above

    return parse_autoscale(raw, name, **bounds)


def _path(section: dict, key: str, prefix: str, base_dir: Path | None) -> str | None:
    value = _str(section, key, prefix, None)
    if value is None:
        return None
    value = os.path.expanduser(value)
    if not os.path.isabs(value) and base_dir is not None:
        value = str((base_dir / value).resolve())
    return value


def _parse_router_security(router_raw: dict, base_dir: Path | None) -> dict:
    auth = _section(router_raw, "auth", "router.")
    _reject_unknown(auth, ("tokens_file",), "router.auth.")
    tls = _section(router_raw, "tls", "router.")
    _reject_unknown(tls, ("cert", "key", "client_ca"), "router.tls.")
    fields = {
        "tokens_file": _path(auth, "tokens_file", "router.auth.", base_dir),
        "tls_cert": _path(tls, "cert", "router.tls.", base_dir),
        "tls_key": _path(tls, "key", "router.tls.", base_dir),
        "tls_client_ca": _path(tls, "client_ca", "router.tls.", base_dir),
    }
    if bool(fields["tls_cert"]) != bool(fields["tls_key"]):
        missing = "key" if fields["tls_cert"] else "cert"
        raise ConfigError(f"router.tls.{missing}", "TLS needs both cert and key (PEM files)")
    if fields["tls_client_ca"] and not fields["tls_cert"]:
        raise ConfigError("router.tls.client_ca", "mutual TLS needs the server's cert and key too")
    return fields


def _parse_launch(raw: dict):
    from orchestrator.config_launch import parse_launch  # lazy: that module builds on the helpers above

    return parse_launch(raw)


def parse_config(raw: Any, *, base_dir: Path | None = None, source: str = "") -> ClusterConfig:
    """Validate a parsed YAML document. `base_dir` resolves a relative model path (the YAML file's folder)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("(top level)", f"expected a mapping of sections, got {type(raw).__name__}")
    _reject_unknown(raw, ("model", "router", "prefill", "decode", "kv_transfer", "ray", "metrics", "gateway",
                         "logging", "launch", "mode"), "")
    from orchestrator.config_colocate import parse_disaggregation, parse_mode  # lazy: builds on the helpers above

    mode = parse_mode(raw)

    model_raw = _section(raw, "model")
    _reject_unknown(model_raw, ("path", "preset", "dtype", "name"), "model.")
    path = _str(model_raw, "path", "model.", None)
    if not path:
        raise ConfigError("model.path", "missing: set it to a Hugging Face model directory (config.json + safetensors)")
    path = os.path.expanduser(path)
    if not os.path.isabs(path) and base_dir is not None:
        path = str((base_dir / path).resolve())
    model = ModelSection(
        path=path,
        preset=_str(model_raw, "preset", "model.", None),
        dtype=_str(model_raw, "dtype", "model.", "float32", _KNOWN_DTYPES),
        name=_str(model_raw, "name", "model.", "") or Path(path).name,
    )

    router_raw = _section(raw, "router")
    _reject_unknown(router_raw, ("host", "port", "policy", "max_inflight", "max_message_bytes", "max_prompt_tokens",
                                 "max_streams_per_client", "max_retries", "replica_timeout_s", "auth", "tls",
                                 "detach_tiers", "disaggregation"),
                    "router.")
    if mode == "colocated" and router_raw.get("disaggregation") is not None:
        raise ConfigError("router.disaggregation", "applies to mode: disaggregated (in colocated mode every prompt is "
                                                   "prefilled on its decode replica); remove it")
    port = _int(router_raw, "port", "router.", 50051, minimum=0)
    if port > 65535:
        raise ConfigError("router.port", f"{port} is not a TCP port (0-65535; 0 picks a free one)")
    router = RouterSection(
        host=_str(router_raw, "host", "router.", "127.0.0.1"),
        port=port,
        policy=_str(router_raw, "policy", "router.", "least-loaded", _KNOWN_POLICIES),
        max_inflight=_int(router_raw, "max_inflight", "router.", 256, minimum=1),
        max_message_bytes=_int(router_raw, "max_message_bytes", "router.", 4 * 1024 * 1024, minimum=1024),
        max_prompt_tokens=_int(router_raw, "max_prompt_tokens", "router.", None, minimum=1),
        max_streams_per_client=_int(router_raw, "max_streams_per_client", "router.", None, minimum=1),
        max_retries=_int(router_raw, "max_retries", "router.", 2, minimum=0),
        replica_timeout_s=_float(router_raw, "replica_timeout_s", "router.", 30.0),
        detach_tiers=_bool(router_raw, "detach_tiers", "router.", False),
        disaggregation=parse_disaggregation(router_raw),
        **_parse_router_security(router_raw, base_dir),
    )

    kv_raw = _section(raw, "kv_transfer")
    _reject_unknown(kv_raw, ("backend", "lease_s", "layerwise", "checksum"), "kv_transfer.")
    kv = KVTransferSection(
        backend=_str(kv_raw, "backend", "kv_transfer.", "ucx", _KNOWN_BACKENDS),
        lease_s=_float(kv_raw, "lease_s", "kv_transfer.", 30.0),
        layerwise=_bool(kv_raw, "layerwise", "kv_transfer.", True),
        checksum=_bool(kv_raw, "checksum", "kv_transfer.", False),
    )

    ray_raw = _section(raw, "ray")
    _reject_unknown(ray_raw, ("address", "num_cpus", "placement_timeout_s", "namespace"), "ray.")
    ray_section = RaySection(
        address=_str(ray_raw, "address", "ray.", None),
        num_cpus=_int(ray_raw, "num_cpus", "ray.", None, minimum=1),
        placement_timeout_s=(_float(ray_raw, "placement_timeout_s", "ray.", 60.0)
                             if ray_raw.get("placement_timeout_s") is not None else None),
        namespace=_str(ray_raw, "namespace", "ray.", None),
    )

    config = ClusterConfig(
        model=model,
        router=router,
        # colocated: a prefill tier of no replicas (parse_mode rejected a prefill section), so nothing is deployed
        prefill=(_parse_tier(_section(raw, "prefill"), "prefill", router.policy) if mode == "disaggregated" else
                 TierSection(name="prefill", replicas=0, min_replicas=0, max_replicas=0)),
        decode=_parse_tier(_section(raw, "decode"), "decode", router.policy),
        kv_transfer=kv,
        ray=ray_section,
        metrics=_parse_endpoint(_section(raw, "metrics"), "metrics"),
        gateway=_parse_endpoint(_section(raw, "gateway"), "gateway"),
        logging=_parse_logging(_section(raw, "logging")),
        launch=_parse_launch(raw),
        source=source,
        mode=mode,
    )
    if config.launch is not None:  # the file is served on the cluster it launches: Ray is that cluster
        from orchestrator.config_launch import apply_launch_rules

        config = dataclasses.replace(config, ray=apply_launch_rules(config.launch, config.ray, config.tiers()))
    # Degrees against the model (heads, layers, experts) are checked at deploy time, once the model is at hand
    # (orchestrator/deploy.py validate_mesh); here only what no model can make valid.
    if config.router.detach_tiers and not config.ray.address:
        raise ConfigError("router.detach_tiers", "needs a Ray cluster that outlives the router: set ray.address "
                          "(a local Ray instance started by `pdcluster serve` ends with it)")
    if config.decode.mesh.cp != 1:
        raise ConfigError("decode.mesh.cp", f"context parallelism is for prefill; decode replicas run cp: 1 "
                          f"(got {config.decode.mesh.cp}); use tp or pp to spread a decode replica")
    return config


def default_config_path() -> Path:
    return Path(__file__).with_name(DEFAULT_CONFIG_NAME)


def load_config(path: str | os.PathLike | None = None) -> ClusterConfig:
    """Read and validate a cluster.yaml; None reads the embedded default."""
    file = Path(path) if path is not None else default_config_path()
    try:
        text = file.read_text()
    except FileNotFoundError:
        raise ConfigError("(file)", f"{file} does not exist") from None
    except OSError as exc:
        raise ConfigError("(file)", f"cannot read {file}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError("(syntax)", f"not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    base_dir = file.resolve().parent if path is not None else None
    return parse_config(raw, base_dir=base_dir, source=str(file))


def with_overrides(config: ClusterConfig, **changes: Any) -> ClusterConfig:
    """Copy with top-level sections replaced, e.g. router=dataclasses.replace(config.router, port=0)."""
    return dataclasses.replace(config, **changes)
