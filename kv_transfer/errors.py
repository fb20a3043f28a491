"""Exceptions of the KV-transfer layer.

Callers (the decode and prefill replicas) only need to tell apart two things:
- `TransferAborted`: one request's KV did not (fully) arrive; the request fails or is retried, the transport
  itself is fine. After it is raised on the receiving side, nothing more is written into that request's blocks.
- `TransportError`: a connection-level problem (peer unreachable, refused, died, misuse of the transport).
"""

from __future__ import annotations


class KVTransferError(Exception):
    """Base class of every error raised by kv_transfer."""


class TransportError(KVTransferError):
    """A connection could not be made or broke (peer down, refused, protocol misuse)."""


class AuthenticationError(TransportError):
    """The peer refused our cluster token, or we refused theirs."""


class UnknownTransportError(KVTransferError, ValueError):
    """`get_transport(name)` was given a name that no transport registered."""


class TransferAborted(KVTransferError):
    """A transfer ended without all of its KV landing.

    `reason` says why in words a log reader can act on (abort, lease expiry, peer failure, layout mismatch,
    checksum mismatch). Raised by `KVReceiver.wait_complete` only once no late write can land anymore.
    """

    def __init__(self, request_id: str | None, reason: str):
        self.request_id = request_id
        self.reason = reason
        where = f"KV transfer of request {request_id!r}" if request_id is not None else "KV transfer"
        super().__init__(f"{where} aborted: {reason}")


class CancelIncomplete(TransportError):
    """A cancel could not confirm that in-flight writes stopped within its bound.

    The destination memory of that transfer may still be written by the network: the caller must NOT reuse
    those KV blocks (quarantine them) and should report the replica unhealthy.
    """
