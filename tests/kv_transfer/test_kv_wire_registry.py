"""Message tags, handshake messages and the transport registry."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kv_transfer import transport as transport_module
from kv_transfer.errors import UnknownTransportError
from kv_transfer.transport import Transport, get_transport, known_transports, register_transport
from kv_transfer.wire import (
    MAX_CHUNKS_PER_LAYER,
    MAX_LAYERS,
    MAX_TRANSFER_ID,
    ChunkKey,
    decode_hello,
    decode_reply,
    decode_tag,
    encode_hello,
    encode_refuse,
    encode_tag,
    ACCEPT,
)


@given(
    transfer_id=st.integers(0, MAX_TRANSFER_ID),
    layer=st.integers(0, MAX_LAYERS - 1),
    chunk=st.integers(0, MAX_CHUNKS_PER_LAYER - 1),
)
def test_tag_round_trip_is_exact_and_unique(transfer_id, layer, chunk):
    key = ChunkKey(transfer_id=transfer_id, layer=layer, chunk=chunk)
    tag = encode_tag(key)
    assert 0 <= tag < 2**64
    assert decode_tag(tag) == key


def test_tags_of_neighbouring_keys_differ():
    keys = [ChunkKey(transfer_id=t, layer=l, chunk=c) for t in (0, 1) for l in (0, 1) for c in (0, 1)]
    assert len({encode_tag(k) for k in keys}) == len(keys)


def test_non_kv_tags_are_not_decoded_and_limits_are_enforced():
    assert decode_tag(0x1234) is None
    with pytest.raises(ValueError, match="layer"):
        encode_tag(ChunkKey(transfer_id=0, layer=MAX_LAYERS, chunk=0))
    with pytest.raises(ValueError, match="too many block runs"):
        encode_tag(ChunkKey(transfer_id=0, layer=0, chunk=MAX_CHUNKS_PER_LAYER))
    with pytest.raises(ValueError, match="transfer id"):
        encode_tag(ChunkKey(transfer_id=MAX_TRANSFER_ID + 1, layer=0, chunk=0))


def test_handshake_messages():
    assert decode_hello(encode_hello("tok", "prefill-0")) == ("tok", "prefill-0")
    with pytest.raises(ValueError, match="not a PDKV/1 hello"):
        decode_hello(b"GET / HTTP/1.1")
    assert decode_reply(ACCEPT) is None
    assert decode_reply(encode_refuse("wrong cluster token")) == "wrong cluster token"
    assert "unexpected" in decode_reply(b"garbage")


def test_unknown_transport_names_the_known_ones():
    with pytest.raises(UnknownTransportError, match="unknown KV transport 'nixl'.*known transports: local, nccl, ucx"):
        get_transport("nixl")


def test_builtin_transports_load_lazily():
    assert get_transport("local").name == "local"
    assert get_transport("ucx").name == "ucx"
    assert get_transport("nccl").name == "nccl"
    assert {"local", "ucx"} <= set(known_transports())


def test_register_transport_refuses_a_second_owner_of_a_name(monkeypatch):
    monkeypatch.setattr(transport_module, "_REGISTRY", dict(transport_module._REGISTRY))

    @register_transport("fake-for-test")
    class Fake(Transport):
        @classmethod
        def make_server(cls, *, token, options=None):
            raise NotImplementedError

        @classmethod
        def make_client(cls, *, token, options=None):
            raise NotImplementedError

    assert get_transport("fake-for-test") is Fake
    with pytest.raises(ValueError, match="already registered"):
        register_transport("fake-for-test")(type("Other", (Fake,), {}))
