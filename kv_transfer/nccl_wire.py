"""The control channel of the `nccl` transport: framing, its JSON messages, and the rule that cuts a layer's
granted chunks into process-group messages.

Connection (TCP, one per client/server pair): length-prefixed frames (4-byte big-endian length, then the bytes).

    client -> server   hello        kv_transfer.wire.encode_hello(token, peer name)
    server -> client   ACCEPT | REFUSE_PREFIX + reason   (kv_transfer.wire; the server closes after a refusal)
    server -> client   session      {"store_port": P, "session": "<random hex>"}
    client -> server   group        {"op": "group", "backend": "nccl" | "gloo"}       (once, before any layer)
    server -> client   group reply  {"op": "group", "ok": true} | {"op": "group", "ok": false, "reason": "..."}
    client -> server   layer        {"op": "layer", "seq": n, "t": transfer id, "l": layer, "sizes": RLE}
    server -> client   grant        {"op": "grant", "seq": n, "go": "all" | "none" | "1011..."}

Both sides then build the 2-rank process group (server rank 0, client rank 1) on the server's TCPStore under
the prefix `pdkv/<session>`. For every layer header the server decides, per chunk, whether it still wants it
(kv_transfer.recv_table), posts the process-group receives for the wanted ones and answers with the grant; the
client sends exactly the granted chunks. Point-to-point operations are matched in the order they are issued, so
both sides cut the granted chunks into messages with the same rule (`group_messages`) and issue them in
header order.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Sequence
from typing import Any

from kv_transfer.errors import TransportError
from kv_transfer.wire import MAX_CHUNKS_PER_LAYER

SCHEME = "nccl://"
MAX_FRAME_BYTES = 1 << 20  # a layer header of MAX_CHUNKS_PER_LAYER distinct sizes fits
_LENGTH = struct.Struct(">I")

# Chunks this large travel as their own message, straight into their destination. Smaller ones (a fragmented
# block table: one message per block) are packed into bundles: one message instead of thousands, received into
# a staging buffer and scattered into their blocks on the receiving GPU (HBM copies are ~10x faster than the
# link, while every point-to-point message costs tens of microseconds of host time).
DIRECT_MIN_BYTES = 4 << 20
BUNDLE_MAX_BYTES = 64 << 20


def parse_address(address: str) -> tuple[str, int]:
    if not address.startswith(SCHEME):
        raise TransportError(f"not an NCCL transport address: {address!r} (expected {SCHEME}<host>:<port>)")
    host, _, port = address[len(SCHEME) :].rpartition(":")
    if not host or not port.isdigit():
        raise TransportError(f"malformed NCCL transport address {address!r} (expected {SCHEME}<host>:<port>)")
    return host.strip("[]"), int(port)


def format_address(host: str, port: int) -> str:
    return f"{SCHEME}[{host}]:{port}" if ":" in host else f"{SCHEME}{host}:{port}"


# --- framing ---------------------------------------------------------------------------------------------------


def write_frame(writer: asyncio.StreamWriter, payload: bytes) -> None:
    """Queue one frame (no await: frames of concurrent senders never interleave)."""
    writer.write(_LENGTH.pack(len(payload)) + payload)


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    """The next frame; `asyncio.IncompleteReadError` at end of stream, `TransportError` if oversized."""
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if length > MAX_FRAME_BYTES:
        raise TransportError(f"control frame of {length} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    return await reader.readexactly(length)


def encode_message(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def decode_message(payload: bytes) -> dict[str, Any]:
    try:
        message = json.loads(payload.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TransportError(f"malformed control message: {error}") from None
    if not isinstance(message, dict):
        raise TransportError("malformed control message: not a JSON object")
    return message


# --- layer headers and grants ------------------------------------------------------------------------------------


def encode_sizes(sizes: Sequence[int]) -> list[list[int]]:
    """Run-length encoding: most chunks of a layer have the same size (one block, or whole runs)."""
    runs: list[list[int]] = []
    for size in sizes:
        if runs and runs[-1][0] == size:
            runs[-1][1] += 1
        else:
            runs.append([int(size), 1])
    return runs


def decode_sizes(runs: Any) -> list[int]:
    if not isinstance(runs, list):
        raise TransportError("layer header: sizes must be a list of [size, count] runs")
    sizes: list[int] = []
    for run in runs:
        if (not isinstance(run, list) or len(run) != 2 or not all(isinstance(x, int) for x in run)
                or run[0] < 1 or run[1] < 1):
            raise TransportError(f"layer header: bad size run {run!r}")
        if len(sizes) + run[1] > MAX_CHUNKS_PER_LAYER:
            raise TransportError(f"layer header: more than {MAX_CHUNKS_PER_LAYER} chunks")
        sizes.extend([run[0]] * run[1])
    if not sizes:
        raise TransportError("layer header without chunks")
    return sizes


def encode_grant(is_wanted: Sequence[bool]) -> str:
    if all(is_wanted):
        return "all"
    if not any(is_wanted):
        return "none"
    return "".join("1" if wanted else "0" for wanted in is_wanted)


def decode_grant(go: Any, num_chunks: int) -> list[bool]:
    if go == "all":
        return [True] * num_chunks
    if go == "none":
        return [False] * num_chunks
    if not isinstance(go, str) or len(go) != num_chunks or set(go) - {"0", "1"}:
        raise TransportError(f"grant does not match the {num_chunks} chunks of its layer header")
    return [bit == "1" for bit in go]


def group_messages(sizes: Sequence[int]) -> list[list[int]]:
    """Cut the granted chunks of one layer (their byte sizes, in chunk order) into process-group messages: lists
    of positions into `sizes`. Both sides apply this same rule, so their operations match one to one.
    A message of one chunk is received straight into that chunk's destination."""
    messages: list[list[int]] = []
    bundle: list[int] = []
    bundle_bytes = 0
    for position, size in enumerate(sizes):
        if size >= DIRECT_MIN_BYTES:
            messages.append([position])
            continue
        if bundle and bundle_bytes + size > BUNDLE_MAX_BYTES:
            messages.append(bundle)
            bundle, bundle_bytes = [], 0
        bundle.append(position)
        bundle_bytes += size
    if bundle:
        messages.append(bundle)
    return messages
