"""KV transfer between the prefill and decode tiers: layouts, transports (by name), per-request sessions.

Entry points: `get_transport(name)` (kv_transfer.transport), `KVReceiver` / `KVSender` / `ReservationInfo`
(kv_transfer.session), the errors in kv_transfer.errors. Importing this package never imports ucxx.
"""

from kv_transfer.errors import (
    AuthenticationError,
    CancelIncomplete,
    KVTransferError,
    TransferAborted,
    TransportError,
    UnknownTransportError,
)
from kv_transfer.session import KVReceiver, KVSender, ReservationInfo
from kv_transfer.transport import (
    KVClient,
    KVServer,
    TransferStats,
    Transport,
    TransportOptions,
    get_transport,
    known_transports,
    register_transport,
)

__all__ = [
    "AuthenticationError",
    "CancelIncomplete",
    "KVClient",
    "KVReceiver",
    "KVSender",
    "KVServer",
    "KVTransferError",
    "ReservationInfo",
    "TransferAborted",
    "TransferStats",
    "Transport",
    "TransportError",
    "TransportOptions",
    "UnknownTransportError",
    "get_transport",
    "known_transports",
    "register_transport",
]
