"""The interface between the gRPC router and whatever actually generates tokens.

The router (orchestrator/router.py) validates and tokenizes a request, then calls `Backend.generate` once per
request and relays its events to the client. Implementations: the Ray-backed cluster (orchestrator/cluster.py)
and an in-process fake for tests (orchestrator/fake_backend.py).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import grpc

if TYPE_CHECKING:  # mesh.sampling pulls in torch; the router only needs the type here
    from mesh.sampling import SamplingParams

FINISH_REASONS = ("stop", "length", "cancelled", "error")
REPLICA_STATES = ("starting", "ready", "draining", "dead")


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """What the router needs to know about the served model to validate requests."""

    model_name: str
    vocab_size: int
    max_context_len: int  # prompt + generated tokens of one request, at most
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("ModelInfo.model_name must not be empty")
        if self.vocab_size <= 0:
            raise ValueError(f"ModelInfo.vocab_size must be > 0, got {self.vocab_size}")
        if self.max_context_len < 2:
            raise ValueError(f"ModelInfo.max_context_len must be >= 2 (one prompt token + one output), got {self.max_context_len}")
        bad_eos = [token for token in self.eos_token_ids if not 0 <= token < self.vocab_size]
        if bad_eos:
            raise ValueError(f"ModelInfo.eos_token_ids {bad_eos} are outside [0, {self.vocab_size})")


@dataclass(frozen=True, kw_only=True)
class RequestSpec:
    """One validated, tokenized request, as the router hands it to `Backend.generate`."""

    request_id: str  # unique among the requests in flight
    prompt_token_ids: list[int]
    params: SamplingParams
    # Stop strings are matched by the router on decoded text; the backend sees them only for logging.
    stop: tuple[str, ...] = ()
    # Absolute wall-clock time (time.time() seconds) after which nobody waits for the result; None = none.
    deadline: float | None = None


@dataclass(frozen=True, kw_only=True)
class Timings:
    """The backend's view of one request, in seconds (the router converts to ms for clients)."""

    queue_s: float = 0.0  # waiting for a prefill slot
    prefill_s: float = 0.0
    kv_transfer_s: float = 0.0  # KV shipping that did not overlap prefill compute
    ttft_s: float = 0.0  # as the backend saw it; the router reports its own, measured from request arrival
    tpot_s: float = 0.0
    kv_bytes: int = 0
    num_cached_tokens: int = 0  # prompt tokens the prefill replica took from its prefix cache instead of computing
    # Payload bytes of each tier's collectives for this request, by kind (mesh/comm.py), summed over its ranks.
    prefill_comm_bytes: Mapping[str, int] = field(default_factory=dict)
    decode_comm_bytes: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("queue_s", "prefill_s", "kv_transfer_s", "ttft_s", "tpot_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"Timings.{name} must be a finite number >= 0, got {value}")
        if self.kv_bytes < 0:
            raise ValueError(f"Timings.kv_bytes must be >= 0, got {self.kv_bytes}")
        if self.num_cached_tokens < 0:
            raise ValueError(f"Timings.num_cached_tokens must be >= 0, got {self.num_cached_tokens}")
        for name in ("prefill_comm_bytes", "decode_comm_bytes"):
            for kind, num_bytes in getattr(self, name).items():
                if not (isinstance(kind, str) and isinstance(num_bytes, int) and num_bytes >= 0):
                    raise ValueError(f"Timings.{name} maps kind names to byte counts >= 0, got {kind!r}: {num_bytes!r}")


@dataclass(frozen=True)
class TokenEvent:
    """Tokens generated since the previous event (at least one).

    The optional keyword fields let the router report replicas and backend timings even when it ends the
    stream itself (stop string, client cancel) and never sees a FinishEvent: a backend sets them as soon as
    it knows them (typically on the first event) and may leave them unset afterwards.
    """

    token_ids: list[int]
    prefill_replica: str = field(default="", kw_only=True)
    decode_replica: str = field(default="", kw_only=True)
    timings: Timings | None = field(default=None, kw_only=True)


@dataclass(frozen=True, kw_only=True)
class FinishEvent:
    """The last event of a stream that ended on the backend's side (stop token, eos, max_tokens)."""

    finish_reason: str  # one of FINISH_REASONS
    timings: Timings = field(default_factory=Timings)
    prefill_replica: str = ""
    decode_replica: str = ""

    def __post_init__(self) -> None:
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"FinishEvent.finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}")


class BackendError(Exception):
    """A failure the client should see with this gRPC status code (e.g. UNAVAILABLE after retries ran out)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@runtime_checkable
class Backend(Protocol):
    """What the router calls. One instance serves every request of one router, from one event loop.

    `status()` returns a dict shaped like the StatusResponse message (the router adds its own fields):
        {"model": str,
         "prefill": [replica, ...], "decode": [replica, ...]}
        replica = {"id": str, "state": one of REPLICA_STATES, "node": str, "accelerator": str,
                   "mesh": {"tp": int, "cp": int, "pp": int, "ep": int},
                   "load": {"num_queued": int, "num_running": int},
                   "kv_blocks": {"num_free": int, "num_total": int}}
    """

    @property
    def model_info(self) -> ModelInfo: ...

    def generate(self, spec: RequestSpec) -> AsyncIterator[TokenEvent | FinishEvent]:
        """Stream the request's tokens; typically an async generator function (called without await).

        Promises: zero or more TokenEvents, then exactly one FinishEvent, then the iterator ends; or raises
        BackendError. Respects spec.params (max_tokens, stop_token_ids, eos unless ignore_eos) and
        spec.deadline. The router may stop iterating at any time and call `aclose()` (stop string matched),
        or its task may be cancelled while awaiting the next event (client gone, deadline): either way the
        backend must cancel the request on every replica and free its resources (KV blocks, queue slots).
        """
        ...

    async def status(self) -> dict: ...
