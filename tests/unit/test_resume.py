"""Resuming a stream: whole SSE events only, and the request that asks for the rest."""

import json

import pytest

from peer.resume import SseText, continuation


def chunk(text: str) -> bytes:
    return f"data: {json.dumps({'choices': [{'delta': {'content': text}}]})}\n\n".encode()


def test_only_whole_events_pass_and_the_text_is_kept():
    sse = SseText(chat=True)
    one, two = chunk("Hel"), chunk("lo")
    assert sse.feed(one[:7]) == b""
    assert sse.feed(one[7:] + two[:5]) == one
    assert sse.feed(two[5:] + b"data: [DONE]\n\n") == two + b"data: [DONE]\n\n"
    assert (sse.text, sse.tokens, sse.done) == ("Hello", 2, True)
    assert sse.leftover() == b""


def test_unread_events_are_read_in_batches_so_their_bytes_stay_bounded():
    sse = SseText(chat=True, fold_bytes=200)
    for i in range(50):
        sse.feed(chunk(str(i % 10)))
        assert sse._unread_size <= 200 + len(chunk("0"))  # read once past the bound
    sse.feed(chunk("!"))  # asked only now: what was not read yet is read then
    assert sse.text == "".join(str(i % 10) for i in range(50)) + "!"
    assert (sse.tokens, sse.done) == (51, False)
    assert sse._unread == []


def test_events_without_text_count_for_nothing():
    sse = SseText(chat=True)
    role = b'data: {"choices": [{"delta": {"role": "assistant"}}]}\n\n'
    sse.feed(role + b"data: not json\n\n" + b": comment\n\n")
    assert (sse.text, sse.tokens, sse.done) == ("", 0, False)


def test_a_chat_continues_the_partial_assistant_message_with_the_tokens_left():
    request = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    rest = continuation("/v1/chat/completions", {**request, "max_completion_tokens": 5}, "Hi", 2)
    assert rest["messages"][-1] == {"role": "assistant", "content": "Hi"}
    assert rest["max_completion_tokens"] == 3 and rest["continue_final_message"] is True
    assert request["messages"] == [{"role": "user", "content": "hi"}]  # not mutated


@pytest.mark.parametrize(
    "path, request_body, tokens",
    [
        ("/v1/embeddings", {"input": "x", "stream": True}, 0),
        ("/v1/completions", {"prompt": ["a", "b"], "stream": True}, 1),
        ("/v1/completions", {"prompt": "a", "stream": True, "n": 2}, 1),
        ("/v1/completions", {"prompt": "a", "stream": True, "max_tokens": 3}, 3),
        ("/v1/completions", {"prompt": "a"}, 1),
        ("/v1/chat/completions", {"messages": "x", "stream": True}, 1),
    ],
)
def test_what_cannot_or_need_not_be_resumed(path, request_body, tokens):
    assert continuation(path, request_body, "text", tokens) is None
