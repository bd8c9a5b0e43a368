"""A text delta's SSE event spliced into a pre-encoded chunk is byte for byte the event
that encoding the whole chunk gives (chat and completion shapes, any text)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from aivailable.api.openai_api import TextEvents, _sse


def chunk_builder(is_chat: bool, model: str):
    base = {"id": "chatcmpl-abc", "object": "chat.completion.chunk", "created": 1, "model": model}

    def chunk(index, delta, text, finish, lps=()):
        if is_chat:
            choice = {"index": index, "delta": delta or {}, "logprobs": None}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None}
        return {**base, "choices": [{**choice, "finish_reason": finish}]}

    return chunk


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(),
    index=st.integers(0, 7),
    is_chat=st.booleans(),
    model=st.sampled_from(["smollm2-135m", 'a "quoted" \u00e9 name', "mark\x00\x01in it"]),
)
def test_spliced_event_equals_the_whole_encoding(text, index, is_chat, model):
    chunk = chunk_builder(is_chat, model)
    events = TextEvents(chunk)
    expected = _sse(chunk(index, {"content": text}, text, None))
    assert events(index, text) == expected
    assert events(index, text + "!") == _sse(
        chunk(index, {"content": text + "!"}, text + "!", None)
    )
