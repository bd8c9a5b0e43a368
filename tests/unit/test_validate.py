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
        (chat(n=9), "n"),
        (chat(n=0), "n"),
        (chat(top_logprobs=3), "top_logprobs"),
        (chat(logprobs=1), "logprobs"),
        (chat(top_k=-1), "top_k"),
        (chat(presence_penalty=3), "presence_penalty"),
        (chat(response_format={"type": "xml"}), "response_format"),
        (
            chat(response_format={"type": "json_schema", "json_schema": 3}),
            "response_format.json_schema",
        ),
        (chat(tool_choice="required"), "tool_choice"),
        (chat(tools=[{"type": "function", "function": {}}]), "tools[0].function.name"),
        (chat(tools="x"), "tools"),
        (chat(logit_bias={"x": 1}), "logit_bias"),
        (chat(continue_final_message=True), "continue_final_message"),  # the last is a user's
        (chat(continue_final_message="yes"), "continue_final_message"),
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


def test_sampling_fields_reach_the_engine_request():
    parsed = parse_chat(
        chat(
            n=2,
            top_k=40,
            min_p=0.05,
            presence_penalty=0.5,
            frequency_penalty=0.25,
            logit_bias={"42": -100, "7": 2},
            logprobs=True,
            top_logprobs=3,
        ),
        LIMIT,
    )
    p = parsed.request.params
    assert (p.n, p.top_k, p.min_p, p.presence_penalty, p.frequency_penalty) == (
        2,
        40,
        0.05,
        0.5,
        0.25,
    )
    assert dict(p.logit_bias)[7] == 2.0 and dict(p.logit_bias)[42] < -1e29  # -100 bans it
    assert (p.logprobs, p.top_logprobs) == (True, 3)
    assert p.grammar is None


def test_response_format_and_required_tools_become_grammars():
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    grammar = parse_chat(chat(response_format=rf), LIMIT).request.params.grammar
    assert "city" in grammar and "root ::=" in grammar
    assert (
        "root ::="
        in parse_chat(chat(response_format={"type": "json_object"}), LIMIT).request.params.grammar
    )
    assert parse_chat(chat(response_format={"type": "text"}), LIMIT).request.params.grammar is None
    tool = {"type": "function", "function": {"name": "weather", "parameters": schema}}
    forced = parse_chat(chat(tools=[tool], tool_choice="required"), LIMIT)
    assert forced.tool_mode == "required" and "weather" in forced.request.params.grammar
    assert forced.request.messages[0]["role"] == "system"  # the tools, described
    assert "weather" in forced.request.messages[0]["content"]
    auto = parse_chat(chat(tools=[tool]), LIMIT)
    assert auto.tool_mode is None and auto.request.params.grammar is None and auto.functions
    none = parse_chat(chat(tools=[tool], tool_choice="none"), LIMIT)
    assert not none.functions and len(none.request.messages) == 1


def test_earlier_tool_calls_and_results_are_kept_in_the_history():
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    parsed = parse_chat(
        chat(
            messages=[
                {"role": "user", "content": "go"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"},
            ]
        ),
        LIMIT,
    )
    assert parsed.request.messages[1] == {
        "role": "assistant",
        "content": '{"name": "f", "arguments": {"a": 1}}',
    }
    assert parsed.request.messages[2] == {"role": "tool", "content": "42"}
