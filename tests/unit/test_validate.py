"""Request validation: every bad input names its parameter; good input becomes an engine request."""

import pytest

from aivailable.api.errors import ApiError
from aivailable.api.validate import parse_chat, parse_completion
from aivailable.backends.base import ChatRequest, CompletionRequest

LIMIT = 512


def chat(**kw):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    body.update(kw)
    return body


def test_a_minimal_chat_request_gets_defaults():
    parsed = parse_chat(chat(), LIMIT)
    assert parsed.model == "m" and not parsed.stream and not parsed.include_usage
    assert isinstance(parsed.request, ChatRequest)
    assert parsed.request.messages == ({"role": "user", "content": "hi"},)
    assert parsed.request.params.max_tokens == LIMIT


def test_sampling_parameters_pass_through():
    parsed = parse_chat(
        chat(
            temperature=0,
            top_p=0.5,
            max_tokens=7,
            stop="\n",
            seed=42,
            stream=True,
            stream_options={"include_usage": True},
        ),
        LIMIT,
    )
    p = parsed.request.params
    assert (p.temperature, p.top_p, p.max_tokens, p.stop, p.seed) == (0.0, 0.5, 7, ("\n",), 42)
    assert parsed.stream and parsed.include_usage


def test_text_parts_are_joined_and_developer_is_system():
    parsed = parse_chat(
        chat(
            messages=[
                {
                    "role": "developer",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
            ]
        ),
        LIMIT,
    )
    assert parsed.request.messages == ({"role": "system", "content": "ab"},)


@pytest.mark.parametrize(
    "body, param",
    [
        (chat(model=None), "model"),
        (chat(model=3), "model"),
        (chat(messages=[]), "messages"),
        (chat(messages="hi"), "messages"),
        (chat(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
        (chat(messages=[{"role": "user", "content": 5}]), "messages[0]"),
        (
            chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
            "messages[0].content",
        ),
        (chat(max_tokens=-1), "max_tokens"),
        (chat(max_tokens=0), "max_tokens"),
        (chat(max_tokens="10"), "max_tokens"),
        (chat(max_tokens=LIMIT + 1), "max_tokens"),
        (chat(temperature="hot"), "temperature"),
        (chat(temperature=3), "temperature"),
        (chat(top_p=1.5), "top_p"),
        (chat(stop=[1, 2]), "stop"),
        (chat(seed=1.5), "seed"),
        (chat(stream="yes"), "stream"),
        (chat(n=2), "n"),
    ],
)
def test_bad_chat_input_is_a_400_naming_the_parameter(body, param):
    with pytest.raises(ApiError) as info:
        parse_chat(body, LIMIT)
    assert info.value.status == 400
    assert info.value.param == param
    assert info.value.body()["error"]["type"] == "invalid_request_error"


def test_a_body_that_is_not_an_object_is_rejected():
    with pytest.raises(ApiError) as info:
        parse_chat([1, 2], LIMIT)
    assert info.value.status == 400


def test_completion_takes_a_prompt_string_or_a_list_of_one():
    assert isinstance(
        parse_completion({"model": "m", "prompt": "x"}, LIMIT).request, CompletionRequest
    )
    assert parse_completion({"model": "m", "prompt": ["y"]}, LIMIT).request.prompt == "y"
    with pytest.raises(ApiError) as info:
        parse_completion({"model": "m"}, LIMIT)
    assert info.value.param == "prompt"
