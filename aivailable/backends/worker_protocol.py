"""The protocol between a peer (`llama_engine`) and its model workers (`llama_worker`).

A frame is a 4-byte big-endian body length and a msgpack map
`{"v": PROTOCOL_VERSION, "type": N, <field>: <value>, ...}`. Every message is a frozen
dataclass below; its fields travel by name, and a field equal to its default is left
out, so defaults live once, in the dataclass (SamplingParams' too: it travels as itself).
Type numbers are append-only. `encode` refuses a frame over MAX_FRAME; `decode` and the
readers refuse anything malformed with ProtocolError (a ValueError) and nothing else.

Version 3 (from 2): frames are checked against these dataclasses field by field, an
error carries `code` (an ErrorCode) instead of `kind`, `DONE` drops `finish_reason`
(it was `finish_reasons[0]`), and `DELTAS` items are maps.
Within version 3, `DONE` gained `prefill_ns` and `decode_ns` (defaults 0, left out when
0, so a frame without them reads as before).
"""

from __future__ import annotations

import asyncio
import struct
import types
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from enum import StrEnum
from typing import Any, BinaryIO, Literal, Union, get_args, get_origin, get_type_hints

import msgpack

from aivailable.backends.base import SamplingParams

PROTOCOL_VERSION = 3
HEADER = struct.Struct(">I")  # the body's length, big-endian
# Bytes of a body; a bigger length means a corrupt stream. The HTTP API refuses bodies far
# below this (413), and encode() refuses to build a bigger frame, so any admitted request
# fits.
MAX_FRAME = 64 << 20


class ProtocolError(ValueError):
    """The bytes are not a valid frame of this protocol version."""


class FrameTooLarge(ProtocolError):
    def __init__(self, size: int):
        super().__init__(f"a frame of {size} bytes is over the limit of {MAX_FRAME}")
        self.size = size


class ErrorCode(StrEnum):
    """Why the worker refused or failed a request (or its load); the engine maps each to
    an EngineError subclass."""

    LOAD_FAILED = "load_failed"
    CONTEXT_OVERFLOW = "context_overflow"
    BAD_REQUEST = "bad_request"
    QUEUE_FULL = "queue_full"
    INTERNAL = "internal"


# --- parent -> worker -------------------------------------------------------------------


@dataclass(frozen=True)
class Generate:
    id: int
    kind: Literal["chat", "completion"]
    params: SamplingParams = SamplingParams()
    messages: tuple[dict, ...] = ()  # chat: OpenAI-style messages
    prompt: str = ""  # completion
    tools: tuple[dict, ...] = ()
    continue_final_message: bool = False


@dataclass(frozen=True)
class Cancel:
    id: int


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class Embed:
    id: int
    inputs: tuple[str, ...]


# --- worker -> parent -------------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    pid: int
    n_ctx: int
    n_parallel: int
    n_gpu_layers: int
    n_threads: int


@dataclass(frozen=True)
class Done:
    id: int
    finish_reasons: tuple[str, ...]  # per choice: "stop" | "length"
    prompt_tokens: int
    completion_tokens: int  # of all choices together
    cached_tokens: int = 0
    # Nanoseconds from a slot taking the request to its first sampled token (the prefill),
    # and from then to this frame (the decode); the engine dates them by this frame's
    # arrival, so no clock is shared between the processes. 0: not measured. Measurements,
    # so left out of equality.
    prefill_ns: int = field(default=0, compare=False)
    decode_ns: int = field(default=0, compare=False)
    restored_tokens: int = 0  # of cached_tokens, restored from the host-memory prompt cache


@dataclass(frozen=True)
class Error:
    id: int | None  # None: the model did not load
    code: ErrorCode
    message: str


@dataclass(frozen=True)
class Cancelled:
    """The request was stopped (or dropped before it started)."""

    id: int


@dataclass(frozen=True)
class Delta:
    """Text (and logprobs, when asked for) of one choice of one request in one step."""

    id: int
    choice: int
    text: str
    logprobs: dict | None = None


@dataclass(frozen=True)
class Deltas:
    """One decode step's output, of every sequence that produced some."""

    items: tuple[Delta, ...]


@dataclass(frozen=True)
class Embeddings:
    id: int
    vectors: tuple[tuple[float, ...], ...]
    prompt_tokens: int


Message = (
    Generate | Cancel | Shutdown | Embed | Ready | Done | Error | Cancelled | Deltas | Embeddings
)

# Message type numbers: append-only. 11 was DELTA (one sequence's text, protocol 1).
TYPES: dict[int, type] = {
    1: Generate,
    2: Cancel,
    3: Shutdown,
    4: Embed,
    10: Ready,
    12: Done,
    13: Error,
    14: Cancelled,
    15: Deltas,
    16: Embeddings,
}

# --- the codec, built once from the dataclasses' annotations ----------------------------

Codec = tuple[Callable[[Any], Any], Callable[[Any], Any]]  # (to wire, from wire)


def _same(value: Any) -> Any:
    return value


def _checked(kinds: tuple[type, ...], name: str, convert=_same) -> Callable[[Any], Any]:
    def decode(value: Any) -> Any:
        if type(value) not in kinds:  # exact: a bool is no int here
            raise ProtocolError(f"expected {name}, got {type(value).__name__}")
        return convert(value)

    return decode


def _codec(hint: Any) -> Codec:
    """(to wire, from wire) for one annotation. A TypeError here is a message with a field
    this protocol cannot carry: it fails at import, never on a live stream."""
    if hint is bool:
        return _same, _checked((bool,), "a bool")
    if hint is int:
        return _same, _checked((int,), "an int")
    if hint is float:
        return _same, _checked((float, int), "a number", float)
    if hint is str:
        return _same, _checked((str,), "a string")
    if hint is dict:  # client-shaped maps (messages, tools, logprobs): not looked into
        return dict, _checked((dict,), "a map")
    if isinstance(hint, type) and issubclass(hint, StrEnum):
        return _enum_codec(hint)
    if is_dataclass(hint):
        return _struct_codec(hint)
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return _literal_codec(args)
    if origin in (Union, types.UnionType) and len(args) == 2 and type(None) in args:
        return _optional_codec(_codec(next(a for a in args if a is not type(None))))
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _sequence_codec(args[0])
    if origin is tuple:
        return _fixed_tuple_codec(args)
    raise TypeError(f"no wire form for {hint!r}")


def _enum_codec(enum: type[StrEnum]) -> Codec:
    def decode(value: Any) -> Any:
        try:
            return enum(value)
        except ValueError:
            raise ProtocolError(f"{value!r:.40} is not a {enum.__name__}") from None

    return (lambda member: member.value), decode


def _literal_codec(allowed: tuple) -> Codec:
    def decode(value: Any) -> Any:
        if value not in allowed or type(value) is not type(allowed[0]):
            raise ProtocolError(f"{value!r:.40} is not one of {allowed}")
        return value

    return _same, decode


def _optional_codec(inner: Codec) -> Codec:
    to_wire, from_wire = inner
    return (
        lambda value: None if value is None else to_wire(value),
        lambda value: None if value is None else from_wire(value),
    )


def _sequence_codec(item_hint: Any) -> Codec:
    to_wire, from_wire = _codec(item_hint)
    if to_wire is _same:  # scalars: msgpack writes them as they are
        encode = list
    else:

        def encode(values):
            return [to_wire(v) for v in values]

    def decode(value: Any) -> tuple:
        if type(value) is not list:
            raise ProtocolError(f"expected an array, got {type(value).__name__}")
        return tuple(from_wire(v) for v in value)

    return encode, decode


def _fixed_tuple_codec(hints: tuple) -> Codec:
    codecs = [_codec(h) for h in hints]

    def decode(value: Any) -> tuple:
        if type(value) is not list or len(value) != len(codecs):
            raise ProtocolError(f"expected an array of {len(codecs)}, got {value!r:.40}")
        return tuple(c[1](v) for c, v in zip(codecs, value, strict=True))

    return (lambda values: [c[0](v) for c, v in zip(codecs, values, strict=True)]), decode


def _struct_codec(cls: type) -> Codec:
    """A dataclass as a map of its fields by name; a field equal to its default is left
    out, and a missing one takes the default again on decoding."""
    hints = get_type_hints(cls)
    specs = []  # (name, has a default, the default, codec)
    for f in fields(cls):
        if f.default_factory is not MISSING:
            raise TypeError(f"{cls.__name__}.{f.name}: the wire needs a plain default")
        specs.append((f.name, f.default is not MISSING, f.default, _codec(hints[f.name])))
    known = {name for name, *_ in specs}
    required = {name for name, has_default, *_ in specs if not has_default}
    by_name = {name: codec[1] for name, _, _, codec in specs}

    def encode(value: Any) -> dict:
        out = {}
        for name, has_default, default, (to_wire, _) in specs:
            v = getattr(value, name)
            if not (has_default and type(v) is type(default) and v == default):
                out[name] = to_wire(v)
        return out

    def decode(value: Any) -> Any:
        if type(value) is not dict:
            raise ProtocolError(f"{cls.__name__}: expected a map, got {type(value).__name__}")
        if unknown := value.keys() - known:
            raise ProtocolError(f"{cls.__name__}: unknown fields {sorted(map(str, unknown))}")
        if missing := required - value.keys():
            raise ProtocolError(f"{cls.__name__}: missing fields {sorted(missing)}")
        kwargs = {}
        for name, v in value.items():
            try:
                kwargs[name] = by_name[name](v)
            except ProtocolError as e:
                raise ProtocolError(f"{cls.__name__}.{name}: {e}") from None
        return cls(**kwargs)

    return encode, decode


_CODECS = {cls: _struct_codec(cls) for cls in TYPES.values()}
_NUMBERS = {cls: number for number, cls in TYPES.items()}
assert not any({"v", "type"} & {f.name for f in fields(c)} for c in TYPES.values())

# --- frames -----------------------------------------------------------------------------


def _check_length(size: int) -> None:
    """The one bound on a frame, for both directions and both sides."""
    if size > MAX_FRAME:
        raise FrameTooLarge(size)


def encode(message: Message) -> bytes:
    """One frame: header and body. FrameTooLarge if it would be refused on arrival."""
    number = _NUMBERS.get(type(message))
    if number is None:
        raise TypeError(f"not a worker protocol message: {message!r:.100}")
    body = {"v": PROTOCOL_VERSION, "type": number, **_CODECS[type(message)][0](message)}
    data = msgpack.packb(body, use_bin_type=True)
    _check_length(len(data))
    return HEADER.pack(len(data)) + data


def decode(body: bytes) -> Message:
    """The message in one frame's body (without its header)."""
    _check_length(len(body))
    try:
        top = msgpack.unpackb(body, raw=False)
    except (msgpack.UnpackException, ValueError, TypeError) as e:
        raise ProtocolError(f"not msgpack: {e}") from None
    if type(top) is not dict:
        raise ProtocolError(f"a frame must be a map, not {type(top).__name__}")
    top = dict(top)
    version, number = top.pop("v", None), top.pop("type", None)
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r:.20}, expected {PROTOCOL_VERSION}")
    cls = TYPES.get(number) if type(number) is int else None
    if cls is None:
        raise ProtocolError(f"unknown message type {number!r:.20}")
    return _CODECS[cls][1](top)


def body_length(header: bytes) -> int:
    """The body length a header announces; FrameTooLarge if over the bound."""
    (size,) = HEADER.unpack(header)
    _check_length(size)
    return size


def read_frame(stream: BinaryIO) -> Message | None:
    """Blocking read of one message (the worker's side); None at a clean end of stream,
    ProtocolError on a truncated or malformed frame."""
    header = stream.read(HEADER.size)
    if not header:
        return None
    if len(header) < HEADER.size:
        raise ProtocolError(f"truncated header: {len(header)} of {HEADER.size} bytes")
    size = body_length(header)
    body = stream.read(size)
    if len(body) < size:
        raise ProtocolError(f"truncated frame: {len(body)} of {size} bytes")
    return decode(body)


async def read_frame_async(reader: asyncio.StreamReader) -> Message | None:
    """read_frame for the engine's side, from an asyncio stream."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise ProtocolError(f"truncated header: {len(e.partial)} of {HEADER.size} bytes") from None
    size = body_length(header)
    try:
        body = await reader.readexactly(size)
    except asyncio.IncompleteReadError as e:
        raise ProtocolError(f"truncated frame: {len(e.partial)} of {size} bytes") from None
    return decode(body)
