"""One record per request, as the router sees it when the request ends, and the JSON log line made from it.

Who calls it: the router (orchestrator/router.py) builds a `RequestRecord` when a Generate call ends, whatever
ended it, and hands it to its `on_request_done` callback; `orchestrator/serve.py` wires that callback to
`RequestLog.write` (one JSON line on the `pdcluster.requests` logger) and to the metrics
(`ClusterMetrics.observe_request`). `configure_logging` is called by `pdcluster serve` with cluster.yaml's
`logging.level`.

The line is a single JSON object (docs/observability.md lists the keys), so log shippers parse it without a
pattern; the request id in it is the one the client sent (or the router made) and the one the replicas log.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field

REQUEST_LOGGER_NAME = "pdcluster.requests"

# gRPC status code name -> outcome of a request that did not complete normally.
_OUTCOME_BY_CODE = {
    "INVALID_ARGUMENT": "invalid",
    "ALREADY_EXISTS": "invalid",
    "RESOURCE_EXHAUSTED": "rejected",
    "UNAVAILABLE": "unavailable",
    "CANCELLED": "cancelled",
    "DEADLINE_EXCEEDED": "deadline",
}
# Every value the `outcome` field (and the metrics' `outcome` label) can take.
OUTCOMES = ("stop", "length", "cancelled", "error", "invalid", "rejected", "unavailable", "deadline")


def outcome_for(code: str, finish_reason: str | None) -> str:
    """A completed call (code OK) is its finish reason; a failed one is named after its gRPC code."""
    if code == "OK":
        return finish_reason if finish_reason in OUTCOMES else "error"
    return _OUTCOME_BY_CODE.get(code, "error")


@dataclass(frozen=True, kw_only=True)
class RequestRecord:
    """What one request did. Times are milliseconds; zero where the request never got that far."""

    request_id: str
    outcome: str  # one of OUTCOMES
    code: str  # gRPC status code name the client received: "OK", "INVALID_ARGUMENT", ...
    error: str = ""  # the message sent with a non-OK code
    prefill_replica: str = ""
    decode_replica: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_ms: float = 0.0  # waiting for a prefill batch
    prefill_ms: float = 0.0
    kv_transfer_ms: float = 0.0  # KV shipping after the prefill forward (the part that did not overlap it)
    kv_bytes: int = 0
    # Payload bytes of the tiers' collectives for this request, by kind (mesh/comm.py); empty on one-rank replicas.
    prefill_comm_bytes: dict = field(default_factory=dict)
    decode_comm_bytes: dict = field(default_factory=dict)
    ttft_ms: float = 0.0  # from the call's arrival at the router to the first token
    tpot_ms: float = 0.0  # mean time per output token after the first
    e2e_ms: float = 0.0  # from arrival to the end of the call
    end_time: float = 0.0  # time.time() when the call ended

    def to_json(self) -> str:
        fields = asdict(self)
        fields = {"ts": _iso_utc(fields.pop("end_time")), "event": "request", **fields}
        if not fields["error"]:
            del fields["error"]
        for key, value in fields.items():
            if isinstance(value, float):
                fields[key] = round(value, 3)
        return json.dumps(fields, separators=(",", ":"), ensure_ascii=False)


def _iso_utc(epoch_s: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch_s))
    return f"{seconds}.{int((epoch_s % 1) * 1000):03d}Z"


class RequestLog:
    """Writes each record as one JSON line at INFO on the `pdcluster.requests` logger."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger or logging.getLogger(REQUEST_LOGGER_NAME)

    def write(self, record: RequestRecord) -> None:
        if self._logger.isEnabledFor(logging.INFO):
            self._logger.info(record.to_json())


def configure_logging(level: str, *, stream=None) -> None:
    """The process's log level; request lines go out bare (the JSON object alone) on their own handler, so each
    line parses as JSON; other loggers keep the root handler's format."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root.setLevel(numeric)
    request_logger = logging.getLogger(REQUEST_LOGGER_NAME)
    for handler in list(request_logger.handlers):
        if getattr(handler, "_pdcluster_request_handler", False):
            request_logger.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._pdcluster_request_handler = True
    request_logger.addHandler(handler)
    request_logger.propagate = False
