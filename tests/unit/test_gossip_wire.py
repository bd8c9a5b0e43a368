"""The msgpack codec: round trips, and no exception but DecodeError for any bytes."""

import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peer import wire
from peer.messages import (
    Ack,
    Alive,
    AppData,
    Dead,
    IndirectPing,
    MemberRecord,
    Nack,
    Ping,
    Suspect,
)

ids = st.text(min_size=1, max_size=20)
u64 = st.integers(0, 2**64 - 1)
ports = st.integers(0, 65535)
payloads = st.none() | st.dictionaries(
    st.text(max_size=5), st.integers(-5, 5) | st.text(max_size=5), max_size=4
)
messages = st.one_of(
    st.builds(Ping, u64, ids, ids),
    st.builds(IndirectPing, u64, ids, ids, ports, ids, st.booleans()),
    st.builds(Ack, u64),
    st.builds(Nack, u64),
    st.builds(Alive, ids, u64, ids, ports, payloads),
    st.builds(Suspect, ids, u64, ids),
    st.builds(Dead, ids, u64, ids),
    st.builds(AppData, st.integers(0, 255), st.binary(max_size=wire.MAX_APP_BODY)),
)


@settings(max_examples=200)
@given(st.lists(messages, min_size=1, max_size=6))
def test_packets_round_trip(msgs):
    assert wire.decode_packet(wire.encode_packet(msgs)) == msgs


@settings(max_examples=50)
@given(
    st.lists(
        st.builds(
            MemberRecord,
            ids,
            ids,
            ports,
            u64,
            st.sampled_from(["alive", "suspect", "dead", "left"]),
            payloads,
        ),
        max_size=5,
    ),
    st.booleans(),
)
def test_push_pull_state_round_trips(records, join):
    assert wire.decode_state(wire.encode_state("me", records, join)) == ("me", records, join)


def _decode_or_reject(data: bytes) -> None:
    with contextlib.suppress(wire.DecodeError):
        wire.decode_packet(data)
    with contextlib.suppress(wire.DecodeError):
        wire.decode_state(data)


@settings(max_examples=400)
@given(st.binary(max_size=300))
def test_random_bytes_never_raise_anything_but_decode_error(data):
    _decode_or_reject(data)


@settings(max_examples=400)
@given(
    st.lists(messages, min_size=1, max_size=4),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(0, 50),
)
def test_mutated_packets_never_raise_anything_but_decode_error(msgs, flips, cut):
    data = bytearray(wire.encode_packet(msgs))
    for pos, value in flips:
        data[pos % len(data)] = value
    _decode_or_reject(bytes(data[: max(0, len(data) - cut)]))


structured = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300)
@given(
    st.dictionaries(
        st.sampled_from(["v", "m", "t", "s", "n", "f", "r", "j", "x"]), structured, max_size=5
    ),
    st.lists(
        st.dictionaries(
            st.sampled_from(["t", "s", "n", "f", "a", "p", "i", "d", "k"]), structured, max_size=7
        ),
        max_size=3,
    ),
)
def test_well_formed_msgpack_of_the_wrong_shape_is_rejected_cleanly(top, inner):
    _decode_or_reject(msgpack.packb(top))
    _decode_or_reject(msgpack.packb({"v": 1, "m": inner}))
    _decode_or_reject(msgpack.packb({"v": 1, "f": "x", "r": inner}))


def test_deeply_nested_input_is_rejected_cleanly():
    data = b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(wire.DecodeError):
        wire.decode_packet(data)
    with pytest.raises(wire.DecodeError):
        wire.decode_packet(b"")
    with pytest.raises(wire.DecodeError):
        wire.decode_packet(msgpack.packb({"v": 2, "m": [{"t": 3, "s": 1}]}))


def test_an_app_datagram_body_over_its_bound_or_not_bytes_is_refused():
    for body in (b"z" * (wire.MAX_APP_BODY + 1), "text"):
        packet = msgpack.packb({"v": 1, "m": [{"t": wire.APP_DATA, "c": 1, "b": body}]})
        with pytest.raises(wire.DecodeError):
            wire.decode_packet(packet)
