"""What goes on the wire: the 64-bit message tags of KV chunks and the connection handshake.

Tag layout (UCX tag matching is per process, across all connections, so the tag alone must say where a
message goes):

    bits 63..56  kind        0x4B ("K"): a KV chunk. The receiver probes for this kind with a mask, so no other
                             message of this process may use it.
    bits 55..32  transfer id 24 bits, chosen by the receiver per reservation (unique among its live ones)
    bits 31..20  layer       12 bits
    bits 19..0   chunk       20 bits: index of the message within the layer (see layout.chunk_plan)

Handshake (one per connection, active messages): the client sends `HELLO_PREFIX + json({"token", "peer"})`;
the server answers `ACCEPT` or `REFUSE_PREFIX + reason` and then closes. The token is compared in constant
time; it keeps foreign or misconfigured peers out, it is not encryption.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

KV_KIND = 0x4B
KIND_SHIFT = 56
KIND_MASK = 0xFF << KIND_SHIFT
TRANSFER_BITS = 24
LAYER_BITS = 12
CHUNK_BITS = 20
MAX_TRANSFER_ID = (1 << TRANSFER_BITS) - 1
MAX_LAYERS = 1 << LAYER_BITS
MAX_CHUNKS_PER_LAYER = 1 << CHUNK_BITS

HELLO_PREFIX = b"PDKV/1 HELLO "
ACCEPT = b"PDKV/1 ACCEPT"
REFUSE_PREFIX = b"PDKV/1 REFUSE "


@dataclass(frozen=True)
class ChunkKey:
    """Which message of which transfer: (transfer id, layer, chunk index within the layer)."""

    transfer_id: int
    layer: int
    chunk: int


def encode_tag(key: ChunkKey) -> int:
    if not 0 <= key.transfer_id <= MAX_TRANSFER_ID:
        raise ValueError(f"transfer id {key.transfer_id} outside [0, {MAX_TRANSFER_ID}]")
    if not 0 <= key.layer < MAX_LAYERS:
        raise ValueError(f"layer {key.layer} outside [0, {MAX_LAYERS})")
    if not 0 <= key.chunk < MAX_CHUNKS_PER_LAYER:
        raise ValueError(f"chunk {key.chunk} outside [0, {MAX_CHUNKS_PER_LAYER}) (too many block runs in one layer)")
    return (
        (KV_KIND << KIND_SHIFT)
        | (key.transfer_id << (LAYER_BITS + CHUNK_BITS))
        | (key.layer << CHUNK_BITS)
        | key.chunk
    )


def decode_tag(tag: int) -> ChunkKey | None:
    """The chunk a tag names, or None when the tag is not a KV chunk tag."""
    if (tag & KIND_MASK) != (KV_KIND << KIND_SHIFT):
        return None
    return ChunkKey(
        transfer_id=(tag >> (LAYER_BITS + CHUNK_BITS)) & MAX_TRANSFER_ID,
        layer=(tag >> CHUNK_BITS) & (MAX_LAYERS - 1),
        chunk=tag & (MAX_CHUNKS_PER_LAYER - 1),
    )


def encode_hello(token: str, peer_name: str) -> bytes:
    return HELLO_PREFIX + json.dumps({"token": token, "peer": peer_name}).encode()


def decode_hello(message: bytes) -> tuple[str, str]:
    """(token, peer name) of a hello; ValueError when the bytes are not a hello of this protocol version."""
    if not message.startswith(HELLO_PREFIX):
        raise ValueError(f"not a PDKV/1 hello (starts with {message[:16]!r})")
    body = json.loads(message[len(HELLO_PREFIX) :].decode())
    if not isinstance(body, dict) or not isinstance(body.get("token"), str):
        raise ValueError("hello without a token")
    return body["token"], str(body.get("peer", "?"))


def encode_refuse(reason: str) -> bytes:
    return REFUSE_PREFIX + reason.encode()


def decode_reply(message: bytes) -> str | None:
    """None when the server accepted; the refusal reason otherwise."""
    if message == ACCEPT:
        return None
    if message.startswith(REFUSE_PREFIX):
        return message[len(REFUSE_PREFIX) :].decode(errors="replace")
    return f"unexpected handshake reply {message[:32]!r}"
