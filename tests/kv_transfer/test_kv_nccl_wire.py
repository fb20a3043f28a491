"""The nccl transport's control-channel rules (pure functions, no process group)."""

from __future__ import annotations

import pytest

from kv_transfer import TransportError
from kv_transfer.nccl_wire import (
    BUNDLE_MAX_BYTES,
    DIRECT_MIN_BYTES,
    decode_grant,
    decode_sizes,
    encode_grant,
    encode_sizes,
    format_address,
    group_messages,
    parse_address,
)


def test_addresses_round_trip_and_reject_other_schemes():
    assert parse_address(format_address("10.0.0.7", 4100)) == ("10.0.0.7", 4100)
    assert parse_address(format_address("fe80::1", 80)) == ("fe80::1", 80)
    for bad in ("ucx://10.0.0.7:4100", "nccl://10.0.0.7", "nccl://:12"):
        with pytest.raises(TransportError):
            parse_address(bad)


def test_sizes_are_run_length_encoded_and_validated():
    sizes = [4096] * 5 + [8192, 4096, 4096]
    assert encode_sizes(sizes) == [[4096, 5], [8192, 1], [4096, 2]]
    assert decode_sizes(encode_sizes(sizes)) == sizes
    for bad in ([], [[0, 1]], [[4096, 0]], [[4096]], "4096", [[4096, 2**21]]):
        with pytest.raises(TransportError):
            decode_sizes(bad)


def test_grants_name_exactly_the_wanted_chunks():
    assert encode_grant([True, True]) == "all"
    assert encode_grant([False, False]) == "none"
    assert decode_grant(encode_grant([True, False, True]), 3) == [True, False, True]
    assert decode_grant("all", 2) == [True, True]
    with pytest.raises(TransportError, match="does not match"):
        decode_grant("10", 3)


def test_group_messages_sends_large_chunks_alone_and_bundles_small_ones_in_order():
    small, large = 64 << 10, DIRECT_MIN_BYTES
    sizes = [small, small, large, small, large + 1]
    # Large chunks go out alone as they come; the small ones form one bundle, sent after them.
    assert group_messages(sizes) == [[2], [4], [0, 1, 3]]


def test_bundles_stay_under_their_byte_bound():
    chunk = 1 << 20
    sizes = [chunk] * (2 * BUNDLE_MAX_BYTES // chunk + 3)
    messages = group_messages(sizes)
    assert all(sum(sizes[p] for p in m) <= BUNDLE_MAX_BYTES for m in messages)
    assert [p for m in messages for p in m] == list(range(len(sizes)))  # order kept
    assert len(messages) == 3
