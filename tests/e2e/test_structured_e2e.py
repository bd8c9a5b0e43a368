"""Structured output, tool calls, logprobs and n > 1 from a real peer, through the official
openai client and langchain-openai, as an agent framework would use them."""

import asyncio
import json
import urllib.error
import urllib.request

import jsonschema
import openai
import pytest
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from aivailable.local_peers import PeerProcess

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

MODEL = "smollm2-135m"
CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "population": {"type": "integer", "minimum": 0},
    },
    "required": ["city", "population"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 16}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    peer = PeerProcess(tmp_path_factory.mktemp("structured"), "solo", "--no-mdns").start()
    try:
        peer.wait_healthy()
        peer.wait_model_ready()
        yield peer
    finally:
        peer.stop()


@pytest.fixture
def client(peer):
    return openai.OpenAI(base_url=peer.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_json_schema_answers_parse_and_validate(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    for seed in range(3):
        reply = client.chat.completions.create(
            model=MODEL,
            messages=ask("A city as JSON."),
            response_format=fmt,
            seed=seed,
            temperature=0.7,
            max_tokens=100,
        )
        jsonschema.validate(json.loads(reply.choices[0].message.content), CITY)


def test_json_object_mode_streams_an_object(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=ask("Reply with a JSON object with the keys name and age of a cat."),
            response_format={"type": "json_object"},
            max_tokens=300,
            temperature=0,
            stream=True,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop", text
    assert isinstance(json.loads(text), dict)


def test_a_required_tool_call_comes_back_as_tool_calls(client):
    reply = client.chat.completions.create(
        model=MODEL,
        messages=ask("What is the weather in Oslo?"),
        tools=[WEATHER],
        tool_choice="required",
        max_tokens=60,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    # The tool's result goes back in; the model answers in text.
    follow = client.chat.completions.create(
        model=MODEL,
        messages=[
            *ask("What is the weather in Oslo?"),
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"},
        ],
        tools=[WEATHER],
        max_tokens=30,
        temperature=0,
    )
    assert follow.choices[0].message.content or follow.choices[0].message.tool_calls


def test_a_named_tool_call_streams(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=ask("Weather in Rome?"),
            tools=[WEATHER],
            stream=True,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=60,
        )
    )
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls and calls[0].function.name == "get_weather"
    json.loads(calls[0].function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_logprobs_and_two_choices(client):
    reply = client.chat.completions.create(
        model=MODEL,
        messages=ask("Say hi."),
        max_tokens=6,
        logprobs=True,
        top_logprobs=2,
        n=2,
        temperature=1.0,
        seed=3,
    )
    assert [c.index for c in reply.choices] == [0, 1]
    for choice in reply.choices:
        entries = choice.logprobs.content
        assert entries and all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in entries)
    # Every generated token has its entry (an end-of-generation token is not counted).
    assert reply.usage.completion_tokens == sum(len(c.logprobs.content) for c in reply.choices)


def test_the_second_turn_reuses_the_first_from_the_prefix_cache(client):
    first = ask("Name a planet.")
    reply = client.chat.completions.create(
        model=MODEL, messages=first, max_tokens=12, temperature=0
    )
    second = [*first, {"role": "assistant", "content": reply.choices[0].message.content}]
    second.append({"role": "user", "content": "And a star?"})
    again = client.chat.completions.create(
        model=MODEL, messages=second, max_tokens=4, temperature=0
    )
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached >= reply.usage.prompt_tokens and again.usage.prompt_tokens - cached < 25


def test_an_8_mib_body_gets_413_while_a_stream_beside_it_finishes(peer):
    async def stream_one():
        async with openai.AsyncOpenAI(base_url=peer.url + "/v1", api_key="x", max_retries=0) as c:
            chunks = await c.chat.completions.create(
                model=MODEL,
                messages=ask("Count to twenty."),
                max_tokens=40,
                stream=True,
                temperature=0,
            )
            return [ch async for ch in chunks]

    def huge():
        body = json.dumps({"model": MODEL, "messages": ask("x" * (8 << 20))}).encode()
        request = urllib.request.Request(
            peer.url + "/v1/chat/completions",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        try:
            urllib.request.urlopen(request, timeout=60)
        except urllib.error.HTTPError as e:
            return e.code
        except (ConnectionError, urllib.error.URLError):
            return "reset"  # the server may close a connection whose body it refused
        return 200

    async def main():
        streaming = asyncio.ensure_future(stream_one())
        code = await asyncio.to_thread(huge)
        return code, await streaming

    code, chunks = asyncio.run(main())
    assert code in (413, "reset")
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()


class City(BaseModel):
    city: str = Field(max_length=16)
    population: int = Field(ge=0)


@tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    return "sunny"


def test_langchain_structured_output_and_bind_tools(peer):
    llm = ChatOpenAI(
        base_url=peer.url + "/v1",
        api_key="unused",
        model=MODEL,
        max_tokens=80,
        temperature=0.2,
        max_retries=0,
    )
    city = llm.with_structured_output(City, method="json_schema").invoke("A big city, please.")
    assert isinstance(city, City) and city.population >= 0
    forced = llm.bind_tools([get_weather], tool_choice="get_weather")
    message = forced.invoke("What's the weather in Paris?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"
    assert isinstance(message.tool_calls[0]["args"]["city"], str)
