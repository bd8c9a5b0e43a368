"""msgpack encoding of gossip messages, compound packets and push-pull state (pure).

A packet is a msgpack map {"v": protocol version, "m": [message maps]}; each message map
has "t", its type number (append-only, never reused). decode_* raise DecodeError and
nothing else, whatever the bytes: a peer's bad packet is counted, never a crash.
"""

from __future__ import annotations

from typing import Any

import msgpack

from peer.messages import (
    STATES,
    Ack,
    Alive,
    AppData,
    Dead,
    IndirectPing,
    MemberRecord,
    Message,
    Nack,
    Ping,
    Suspect,
)

PROTOCOL_VERSION = 1
# Message type numbers: append-only.
PING, INDIRECT_PING, ACK, NACK, ALIVE, SUSPECT, DEAD = 1, 2, 3, 4, 5, 6, 7
APP_DATA = 8
MAX_APP_BODY = 1200  # an AppData body: one datagram's worth
# Bytes the encryption envelope adds around a packet (crypto.py checks it stays below).
ENVELOPE_OVERHEAD = 48
# Bytes the compound wrapper {"v": 1, "m": [...]} adds around its messages (upper bound).
COMPOUND_OVERHEAD = 12
MAX_ID_LEN = 128
MAX_ADDR_LEN = 255
MAX_U64 = (1 << 64) - 1
MAX_STATE_BYTES = 4 << 20


class DecodeError(ValueError):
    """The bytes are not a valid packet of this protocol version."""


def message_to_map(msg: Message | AppData) -> dict[str, Any]:
    match msg:
        case AppData():
            return {"t": APP_DATA, "c": msg.channel, "b": msg.body}
        case Ping():
            return {"t": PING, "s": msg.seq, "n": msg.target, "f": msg.source}
        case IndirectPing():
            return {
                "t": INDIRECT_PING,
                "s": msg.seq,
                "n": msg.target,
                "a": msg.target_addr,
                "p": msg.target_port,
                "f": msg.source,
                "k": msg.nack,
            }
        case Ack():
            return {"t": ACK, "s": msg.seq}
        case Nack():
            return {"t": NACK, "s": msg.seq}
        case Alive():
            out = {"t": ALIVE, "n": msg.node, "i": msg.incarnation, "a": msg.addr, "p": msg.port}
            if msg.payload is not None:
                out["d"] = msg.payload
            return out
        case Suspect():
            return {"t": SUSPECT, "n": msg.node, "i": msg.incarnation, "f": msg.sender}
        case Dead():
            return {"t": DEAD, "n": msg.node, "i": msg.incarnation, "f": msg.sender}
    raise TypeError(f"not a gossip message: {msg!r}")


def _str(m: dict, key: str, limit: int = MAX_ID_LEN) -> str:
    value = m.get(key)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise DecodeError(f"field {key!r} must be a non-empty string of at most {limit}")
    return value


def _uint(m: dict, key: str, limit: int = MAX_U64) -> int:
    value = m.get(key)
    if type(value) is not int or not 0 <= value <= limit:
        raise DecodeError(f"field {key!r} must be an integer in 0..{limit}")
    return value


def _payload(m: dict, key: str) -> dict[str, Any] | None:
    value = m.get(key)
    if value is not None and not isinstance(value, dict):
        raise DecodeError(f"field {key!r} must be a map")
    return value


def message_from_map(m: Any) -> Message | AppData:
    if not isinstance(m, dict):
        raise DecodeError("message must be a map")
    kind = m.get("t")
    if kind == PING:
        return Ping(_uint(m, "s"), _str(m, "n"), _str(m, "f"))
    if kind == INDIRECT_PING:
        nack = m.get("k")
        if not isinstance(nack, bool):
            raise DecodeError("field 'k' must be a boolean")
        return IndirectPing(
            _uint(m, "s"),
            _str(m, "n"),
            _str(m, "a", MAX_ADDR_LEN),
            _uint(m, "p", 65535),
            _str(m, "f"),
            nack,
        )
    if kind == ACK:
        return Ack(_uint(m, "s"))
    if kind == NACK:
        return Nack(_uint(m, "s"))
    if kind == ALIVE:
        return Alive(
            _str(m, "n"),
            _uint(m, "i"),
            _str(m, "a", MAX_ADDR_LEN),
            _uint(m, "p", 65535),
            _payload(m, "d"),
        )
    if kind == SUSPECT:
        return Suspect(_str(m, "n"), _uint(m, "i"), _str(m, "f"))
    if kind == DEAD:
        return Dead(_str(m, "n"), _uint(m, "i"), _str(m, "f"))
    if kind == APP_DATA:
        body = m.get("b")
        if not isinstance(body, bytes) or len(body) > MAX_APP_BODY:
            raise DecodeError(f"field 'b' must be bytes of at most {MAX_APP_BODY}")
        return AppData(_uint(m, "c", 255), body)
    raise DecodeError(f"unknown message type {kind!r}")


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(data: bytes, limit: int) -> Any:
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) > limit:
        raise DecodeError("packet too large or not bytes")
    try:
        return msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises many kinds; all mean "malformed"
        raise DecodeError(f"malformed msgpack: {type(exc).__name__}") from None


def normalize(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload as it will arrive elsewhere (tuples become lists), so compares are fair."""
    return msgpack.unpackb(_pack(payload), raw=False, strict_map_key=True)


def encoded_size(msg: Message) -> int:
    return len(_pack(message_to_map(msg)))


def encode_packet(messages: list[Message] | tuple[Message, ...]) -> bytes:
    return _pack({"v": PROTOCOL_VERSION, "m": [message_to_map(m) for m in messages]})


def decode_packet(data: bytes) -> list[Message]:
    top = _unpack(data, 65535)
    if not isinstance(top, dict) or top.get("v") != PROTOCOL_VERSION:
        raise DecodeError("not a packet of protocol version 1")
    items = top.get("m")
    if not isinstance(items, list) or not items:
        raise DecodeError("packet has no messages")
    return [message_from_map(item) for item in items]


def record_to_map(r: MemberRecord) -> dict[str, Any]:
    out = {"n": r.node, "a": r.addr, "p": r.port, "i": r.incarnation, "s": r.state}
    if r.payload is not None:
        out["d"] = r.payload
    return out


def record_from_map(m: Any) -> MemberRecord:
    if not isinstance(m, dict):
        raise DecodeError("member record must be a map")
    state = m.get("s")
    if state not in STATES:
        raise DecodeError(f"unknown member state {state!r}")
    return MemberRecord(
        _str(m, "n"),
        _str(m, "a", MAX_ADDR_LEN),
        _uint(m, "p", 65535),
        _uint(m, "i"),
        state,
        _payload(m, "d"),
    )


def encode_state(sender: str, records: list[MemberRecord], join: bool) -> bytes:
    return _pack(
        {"v": PROTOCOL_VERSION, "f": sender, "j": join, "r": [record_to_map(r) for r in records]}
    )


def decode_state(data: bytes) -> tuple[str, list[MemberRecord], bool]:
    """(sender id, records, join flag) from a push-pull body."""
    top = _unpack(data, MAX_STATE_BYTES)
    if not isinstance(top, dict) or top.get("v") != PROTOCOL_VERSION:
        raise DecodeError("not a push-pull state of protocol version 1")
    items = top.get("r")
    join = top.get("j", False)
    if not isinstance(items, list) or not isinstance(join, bool):
        raise DecodeError("push-pull state has no record list")
    return _str(top, "f"), [record_from_map(item) for item in items], join
