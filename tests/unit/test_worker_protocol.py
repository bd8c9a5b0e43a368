"""The worker protocol: every frame round-trips, and malformed input of any kind is
refused with ProtocolError (and nothing else), on the blocking and the asyncio reader."""

from __future__ import annotations

import asyncio
import contextlib
import io
import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aivailable.backends import worker_protocol as wire
from aivailable.backends.base import SamplingParams
from aivailable.backends.worker_protocol import (
    Cancel,
    Cancelled,
    Delta,
    Deltas,
    Done,
    Embed,
    Embeddings,
    Error,
    ErrorCode,
    FrameTooLarge,
    Generate,
    ProtocolError,
    Ready,
    Shutdown,
)

CHAT = ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"})
TOOL = {"type": "function", "function": {"name": "f", "parameters": {}}}
LOGPROBS = {"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": []}
SAMPLES = [
    Generate(1, "completion", prompt="Once upon a time"),
    Generate(
        2,
        "chat",
        SamplingParams(max_tokens=8, temperature=0.0, stop=("\n",), logit_bias=((5, -100.0),)),
        messages=CHAT,
        tools=(TOOL,),
        continue_final_message=True,
    ),
    Cancel(3),
    Shutdown(),
    Embed(4, ("a", "b c")),
    Ready(pid=123, n_ctx=512, n_parallel=4, n_gpu_layers=-1, n_threads=2),
    Done(5, ("stop", "length"), prompt_tokens=10, completion_tokens=7, cached_tokens=3),
    Error(6, ErrorCode.CONTEXT_OVERFLOW, "the prompt has 600 tokens"),
    Error(None, ErrorCode.LOAD_FAILED, "bad file"),
    Cancelled(7),
    Deltas((Delta(1, 0, "he"), Delta(2, 1, "", LOGPROBS))),
    Embeddings(8, ((0.6, 0.8), (1.0, 0.0)), prompt_tokens=3),
]


def body(**top) -> bytes:
    return msgpack.packb(top, use_bin_type=True)


def read_sync(data: bytes):
    return wire.read_frame(io.BytesIO(data))


def read_async(data: bytes):
    async def go():
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await wire.read_frame_async(reader)

    return asyncio.run(go())


READERS = [read_sync, read_async]


def test_the_samples_cover_every_message_type():
    assert {type(m) for m in SAMPLES} == set(wire.TYPES.values())


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("read", READERS, ids=["sync", "async"])
def test_every_message_round_trips(message, read):
    frame = wire.encode(message)
    assert wire.decode(frame[wire.HEADER.size :]) == message
    assert read(frame) == message


def test_type_numbers_are_the_append_only_ones():
    numbers = {cls.__name__: n for n, cls in wire.TYPES.items()}
    assert numbers == {
        "Generate": 1,
        "Cancel": 2,
        "Shutdown": 3,
        "Embed": 4,
        "Ready": 10,
        "Done": 12,
        "Error": 13,
        "Cancelled": 14,
        "Deltas": 15,
        "Embeddings": 16,
    }
    assert 11 not in wire.TYPES  # protocol 1's DELTA: never reused


def test_defaults_stay_off_the_wire():
    top = msgpack.unpackb(wire.encode(Generate(1, "completion"))[4:])
    assert top == {"v": wire.PROTOCOL_VERSION, "type": 1, "id": 1, "kind": "completion"}
    greedy = Generate(1, "completion", SamplingParams(temperature=0.0))
    assert msgpack.unpackb(wire.encode(greedy)[4:])["params"] == {"temperature": 0.0}


def test_an_error_code_travels_as_its_name():
    top = msgpack.unpackb(wire.encode(Error(1, ErrorCode.QUEUE_FULL, "full"))[4:])
    assert top["code"] == "queue_full"
    assert wire.decode(body(v=3, type=13, id=1, code="queue_full", message="x")).code is (
        ErrorCode.QUEUE_FULL
    )


finite = st.floats(allow_nan=False, allow_infinity=False)
i64 = st.integers(-(2**63), 2**63 - 1)
sampling = st.builds(
    SamplingParams,
    max_tokens=st.none() | st.integers(1, 1 << 20),
    temperature=finite,
    top_p=finite,
    stop=st.lists(st.text(max_size=8), max_size=4).map(tuple),
    seed=st.none() | i64,
    top_k=i64,
    min_p=finite,
    presence_penalty=finite,
    frequency_penalty=finite,
    repeat_penalty=finite,
    logit_bias=st.lists(st.tuples(st.integers(0, 1 << 20), finite), max_size=4).map(tuple),
    logprobs=st.booleans(),
    top_logprobs=st.integers(0, 20),
    n=st.integers(1, 8),
    grammar=st.none() | st.text(max_size=40),
)


@settings(max_examples=300)
@given(sampling, st.sampled_from(["chat", "completion"]), st.text(max_size=40))
def test_sampling_params_round_trip(params, kind, prompt):
    message = Generate(9, kind, params, prompt=prompt)
    assert wire.decode(wire.encode(message)[4:]) == message


@settings(max_examples=300)
@given(st.binary(max_size=64))
def test_any_bytes_decode_or_give_protocol_error(data):
    with contextlib.suppress(ProtocolError):
        wire.decode(data)


@pytest.mark.parametrize(
    ("top", "why"),
    [
        ({"type": 2, "id": 1}, "protocol version None"),
        ({"v": 2, "type": 2, "id": 1}, "protocol version 2"),
        ({"v": 3.0, "type": 2, "id": 1}, "protocol version 3.0"),
        ({"v": 3, "type": 11, "id": 1}, "unknown message type 11"),
        ({"v": 3, "type": 99, "id": 1}, "unknown message type 99"),
        ({"v": 3, "type": "2", "id": 1}, "unknown message type '2'"),
        ({"v": 3, "id": 1}, "unknown message type None"),
        ({"v": 3, "type": 2}, r"Cancel: missing fields \['id'\]"),
        ({"v": 3, "type": 2, "id": 1, "extra": 0}, r"Cancel: unknown fields \['extra'\]"),
        ({"v": 3, "type": 2, "id": "1"}, "Cancel.id: expected an int, got str"),
        ({"v": 3, "type": 2, "id": True}, "Cancel.id: expected an int, got bool"),
        ({"v": 3, "type": 13, "id": 1, "code": "oops", "message": ""}, "not a ErrorCode"),
        ({"v": 3, "type": 1, "id": 1, "kind": "edit"}, "Generate.kind: 'edit' is not one of"),
        ({"v": 3, "type": 1, "id": 1, "kind": "chat", "messages": "hi"}, "expected an array"),
        (
            {"v": 3, "type": 1, "id": 1, "kind": "chat", "params": {"temp": 1.0}},
            r"Generate.params: SamplingParams: unknown fields \['temp'\]",
        ),
        (
            {"v": 3, "type": 1, "id": 1, "kind": "chat", "params": {"logit_bias": [[1]]}},
            "logit_bias: expected an array of 2",
        ),
        ({"v": 3, "type": 15, "items": [[1, 0, "a", None]]}, "Delta: expected a map"),
    ],
)
def test_malformed_frames_are_refused_clearly(top, why):
    with pytest.raises(ProtocolError, match=why):
        wire.decode(body(**top))


@pytest.mark.parametrize(
    "data", [b"\xc1", b"hello", msgpack.packb([3, 2, 1]), msgpack.packb({1: 2}) + b"x"]
)
def test_a_body_that_is_not_a_msgpack_map_is_refused(data):
    with pytest.raises(ProtocolError):
        wire.decode(data)


@pytest.mark.parametrize("read", READERS, ids=["sync", "async"])
def test_an_oversized_length_is_refused_before_reading_the_body(read):
    header = wire.HEADER.pack(wire.MAX_FRAME + 1)
    with pytest.raises(FrameTooLarge, match=f"{wire.MAX_FRAME + 1} bytes"):
        read(header)  # no body follows: the header alone is enough to refuse it


def test_a_frame_over_the_bound_is_never_built(monkeypatch):
    monkeypatch.setattr(wire, "MAX_FRAME", 100)
    wire.encode(Embed(1, ("x" * 50,)))
    with pytest.raises(FrameTooLarge) as info:
        wire.encode(Embed(1, ("x" * 100,)))
    assert info.value.size > 100


@pytest.mark.parametrize("read", READERS, ids=["sync", "async"])
def test_a_truncated_frame_is_an_error_and_a_clean_end_is_none(read):
    frame = wire.encode(Done(1, ("stop",), 2, 3))
    assert read(b"") is None
    with pytest.raises(ProtocolError, match="truncated header: 2 of 4 bytes"):
        read(frame[:2])
    with pytest.raises(ProtocolError, match=f"truncated frame: 3 of {len(frame) - 4} bytes"):
        read(frame[:7])


def test_two_frames_in_one_stream_come_out_in_order():
    stream = io.BytesIO(wire.encode(Cancel(1)) + wire.encode(Shutdown()))
    assert wire.read_frame(stream) == Cancel(1)
    assert wire.read_frame(stream) == Shutdown()
    assert wire.read_frame(stream) is None


def test_only_protocol_messages_are_encoded():
    with pytest.raises(TypeError):
        wire.encode({"type": 2, "id": 1})
    with pytest.raises(TypeError):
        wire.encode(Delta(1, 0, "a"))  # a part of a frame, not a frame


def test_the_header_is_a_big_endian_length():
    frame = wire.encode(Cancel(1))
    assert struct.unpack(">I", frame[:4])[0] == len(frame) - 4


values = st.recursive(
    st.none() | st.booleans() | i64 | finite | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)


@settings(max_examples=500)
@given(st.sampled_from(sorted(wire.TYPES)), st.data())
def test_right_names_with_wrong_values_give_protocol_error(number, data):
    """Fields of the right message with any values: decoded, or refused with ProtocolError."""
    cls = wire.TYPES[number]
    names = list(cls.__dataclass_fields__)
    top = data.draw(st.dictionaries(st.sampled_from(names), values)) if names else {}
    if cls is Generate and "params" in top and data.draw(st.booleans()):
        fields = list(SamplingParams.__dataclass_fields__)
        top["params"] = data.draw(st.dictionaries(st.sampled_from(fields), values))
    with contextlib.suppress(ProtocolError):
        wire.decode(body(v=wire.PROTOCOL_VERSION, type=number, **top))
