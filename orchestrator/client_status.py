"""The Status message as a plain dict, both ways: the router builds the message from `Backend.status()`,
the client SDK turns it back into the same dict (plus the router's own fields).

Imports only protos, so the client SDK stays importable without torch or ray. Dict shape (see
orchestrator/backend.py): {"model", "max_context_len", "num_inflight", "prefill": [replica], "decode": [replica]}
with replica = {"id", "state", "node", "accelerator", "mesh": {tp, cp, pp, ep},
"load": {num_queued, num_running}, "kv_blocks": {num_free, num_total}}; "autoscale": a list of decisions
(AUTOSCALE_KEYS), present once a tier's autoscaler has decided something.
"""

from __future__ import annotations

from protos import generation_pb2

_STATE_PREFIX = "REPLICA_STATE_"
MESH_AXES = ("tp", "cp", "pp", "ep")
TIERS = ("prefill", "decode")
AUTOSCALE_KEYS = ("tier", "action", "from_replicas", "to_replicas", "reason", "at", "demand_rps", "capacity_rps",
                  "is_latest")


class StatusFormatError(ValueError):
    """A backend's status dict does not have the documented shape; the message names the key."""


def status_to_proto(status: dict, *, max_context_len: int, num_inflight: int) -> generation_pb2.StatusResponse:
    response = generation_pb2.StatusResponse(
        model=str(_require(status, "model", "status")),
        max_context_len=max_context_len,
        num_inflight=num_inflight,
    )
    for tier in TIERS:
        for index, replica in enumerate(_require(status, tier, "status")):
            _replica_to_proto(replica, f"status.{tier}[{index}]", getattr(response, tier).add())
    for decision in status.get("autoscale", ()):  # orchestrator/autoscale_runner.py status()
        response.autoscale.add(**{key: decision[key] for key in AUTOSCALE_KEYS})
    return response


def status_from_proto(response: generation_pb2.StatusResponse) -> dict:
    status = {
        "model": response.model,
        "max_context_len": response.max_context_len,
        "num_inflight": response.num_inflight,
        **{tier: [_replica_from_proto(replica) for replica in getattr(response, tier)] for tier in TIERS},
    }
    if response.autoscale:
        status["autoscale"] = [{key: getattr(d, key) for key in AUTOSCALE_KEYS} for d in response.autoscale]
    return status


def _replica_to_proto(replica: dict, where: str, out: generation_pb2.ReplicaStatus) -> None:
    out.id = str(_require(replica, "id", where))
    state = str(_require(replica, "state", where))
    try:
        out.state = generation_pb2.ReplicaState.Value(_STATE_PREFIX + state.upper())
    except ValueError:
        raise StatusFormatError(f"{where}.state: unknown replica state {state!r}") from None
    out.node = str(replica.get("node", ""))
    out.accelerator = str(replica.get("accelerator", ""))
    mesh = _require(replica, "mesh", where)
    for axis in MESH_AXES:
        setattr(out.mesh, axis, int(mesh.get(axis, 1)))
    load = _require(replica, "load", where)
    out.load.num_queued = int(_require(load, "num_queued", f"{where}.load"))
    out.load.num_running = int(_require(load, "num_running", f"{where}.load"))
    kv_blocks = _require(replica, "kv_blocks", where)
    out.kv_blocks.num_free = int(_require(kv_blocks, "num_free", f"{where}.kv_blocks"))
    out.kv_blocks.num_total = int(_require(kv_blocks, "num_total", f"{where}.kv_blocks"))
    out.failures = int(replica.get("failures", 0))
    out.restarts = int(replica.get("restarts", 0))


def _replica_from_proto(replica: generation_pb2.ReplicaStatus) -> dict:
    state_name = generation_pb2.ReplicaState.Name(replica.state)
    return {
        "id": replica.id,
        "state": state_name.removeprefix(_STATE_PREFIX).lower(),
        "node": replica.node,
        "accelerator": replica.accelerator,
        "mesh": {axis: getattr(replica.mesh, axis) for axis in MESH_AXES},
        "load": {"num_queued": replica.load.num_queued, "num_running": replica.load.num_running},
        "kv_blocks": {"num_free": replica.kv_blocks.num_free, "num_total": replica.kv_blocks.num_total},
        "failures": replica.failures,
        "restarts": replica.restarts,
    }


def _require(mapping: dict, key: str, where: str):
    if not isinstance(mapping, dict):
        raise StatusFormatError(f"{where}: expected a dict, got {type(mapping).__name__}")
    if key not in mapping:
        raise StatusFormatError(f"{where}: missing key {key!r}")
    return mapping[key]
