"""Raft messages on the wire: msgpack maps with a protocol version.

A batch (one HTTP POST body) is {"v": 1, "src": node_id, "m": [message, ...]}. A message is a
map with short keys; fields at their default are left out. Message type and entry kind numbers
are append-only: never renumber, only add.
"""

from __future__ import annotations

import msgpack

from .types import (
    APP,
    APP_RESP,
    CMD,
    CONF,
    HEARTBEAT,
    HEARTBEAT_RESP,
    NOOP,
    PRE_VOTE,
    PRE_VOTE_RESP,
    READ_INDEX,
    READ_INDEX_RESP,
    SNAP,
    TIMEOUT_NOW,
    VOTE,
    VOTE_RESP,
    ConfState,
    Entry,
    Message,
    Snapshot,
)

PROTOCOL_VERSION = 1

MESSAGE_TYPE_NUMBERS = {  # append-only
    VOTE: 1,
    VOTE_RESP: 2,
    PRE_VOTE: 3,
    PRE_VOTE_RESP: 4,
    APP: 5,
    APP_RESP: 6,
    HEARTBEAT: 7,
    HEARTBEAT_RESP: 8,
    SNAP: 9,
    TIMEOUT_NOW: 10,
    READ_INDEX: 11,
    READ_INDEX_RESP: 12,
}
ENTRY_KIND_NUMBERS = {CMD: 1, NOOP: 2, CONF: 3}  # append-only

_TYPE_BY_NUMBER = {v: k for k, v in MESSAGE_TYPE_NUMBERS.items()}
_KIND_BY_NUMBER = {v: k for k, v in ENTRY_KIND_NUMBERS.items()}


class WireError(ValueError):
    """A batch that is not valid msgpack or not a valid Raft message batch."""


def _encode_message(m: Message) -> dict:
    out: dict = {"t": MESSAGE_TYPE_NUMBERS[m.type], "d": m.dst, "term": m.term}
    if m.log_term:
        out["lt"] = m.log_term
    if m.index:
        out["i"] = m.index
    if m.entries:
        out["e"] = [[e.term, e.index, ENTRY_KIND_NUMBERS[e.kind], e.data] for e in m.entries]
    if m.commit:
        out["c"] = m.commit
    if m.reject:
        out["r"] = True
    if m.reject_hint:
        out["rh"] = m.reject_hint
    if m.force:
        out["f"] = True
    if m.context:
        out["ctx"] = m.context
    if m.snapshot is not None:
        s = m.snapshot
        out["s"] = [s.index, s.term, list(s.conf.voters), list(s.conf.learners), s.data]
    return out


def encode_batch(src: str, messages: list[Message]) -> bytes:
    return msgpack.packb(
        {"v": PROTOCOL_VERSION, "src": src, "m": [_encode_message(m) for m in messages]},
        use_bin_type=True,
    )


def _decode_message(src: str, x: dict) -> Message:
    snapshot = None
    if "s" in x:
        index, term, voters, learners, data = x["s"]
        snapshot = Snapshot(int(index), int(term), ConfState(tuple(voters), tuple(learners)), data)
    entries = tuple(
        Entry(int(t), int(i), _KIND_BY_NUMBER[k], bytes(d)) for t, i, k, d in x.get("e", ())
    )
    return Message(
        type=_TYPE_BY_NUMBER[x["t"]],
        src=src,
        dst=str(x["d"]),
        term=int(x["term"]),
        log_term=int(x.get("lt", 0)),
        index=int(x.get("i", 0)),
        entries=entries,
        commit=int(x.get("c", 0)),
        reject=bool(x.get("r", False)),
        reject_hint=int(x.get("rh", 0)),
        snapshot=snapshot,
        force=bool(x.get("f", False)),
        context=bytes(x.get("ctx", b"")),
    )


def decode_batch(data: bytes) -> tuple[str, list[Message]]:
    try:
        obj = msgpack.unpackb(data, raw=False)
        if not isinstance(obj, dict) or obj.get("v") != PROTOCOL_VERSION:
            raise WireError(f"unsupported raft protocol version {obj.get('v')!r}")
        src = obj["src"]
        if not isinstance(src, str):
            raise WireError("src must be a string")
        return src, [_decode_message(src, x) for x in obj["m"]]
    except WireError:
        raise
    except Exception as exc:  # any malformed field: the sender is wrong, not us
        raise WireError(f"malformed raft batch: {exc!r}") from exc
