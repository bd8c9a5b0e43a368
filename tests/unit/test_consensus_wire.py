"""The Raft wire format: msgpack batches with a protocol version and append-only type numbers."""

from __future__ import annotations

import msgpack
import pytest

from consensus import Entry, Message, Snapshot
from consensus.types import MESSAGE_TYPES, ConfState
from consensus.wire import (
    ENTRY_KIND_NUMBERS,
    MESSAGE_TYPE_NUMBERS,
    WireError,
    decode_batch,
    encode_batch,
)


def test_every_message_type_round_trips():
    snap = Snapshot(7, 3, ConfState(("a", "b"), ("c",)), b"\x00state")
    messages = [
        Message(
            t,
            "a",
            "b",
            term=5,
            log_term=4,
            index=9,
            entries=(Entry(4, 10, "cmd", b"x"), Entry(5, 11, "noop"), Entry(5, 12, "conf", b"{}")),
            commit=8,
            reject=True,
            reject_hint=3,
            snapshot=snap,
            force=True,
            context=b"read-1",
        )
        for t in MESSAGE_TYPES
    ]
    messages.append(Message("heartbeat", "a", "c", term=1))  # all defaults
    src, decoded = decode_batch(encode_batch("a", messages))
    assert src == "a" and decoded == messages


def test_type_numbers_are_append_only():
    # Renumbering breaks mixed-version clusters: only ever add new numbers.
    assert MESSAGE_TYPE_NUMBERS == {
        "vote": 1,
        "vote_resp": 2,
        "pre_vote": 3,
        "pre_vote_resp": 4,
        "app": 5,
        "app_resp": 6,
        "heartbeat": 7,
        "heartbeat_resp": 8,
        "snap": 9,
        "timeout_now": 10,
        "read_index": 11,
        "read_index_resp": 12,
    }
    assert ENTRY_KIND_NUMBERS == {"cmd": 1, "noop": 2, "conf": 3}


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # not msgpack
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"v": 2, "src": "a", "m": []}),
        msgpack.packb({"v": 1, "src": 5, "m": []}),
        msgpack.packb({"v": 1, "src": "a", "m": [{"t": 99, "d": "b", "term": 1}]}),
        msgpack.packb({"v": 1, "src": "a", "m": [{"t": 5, "d": "b"}]}),
    ],
)
def test_malformed_batches_raise_wire_error(body):
    with pytest.raises(WireError):
        decode_batch(body)
