"""The function tool the Responses API tests call, and the fake model's reply that echoes
what it saw, shared by the in-process and the forwarded tests."""

from __future__ import annotations

from aivailable.backends.base import ChatRequest

WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "the weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def replies(request: ChatRequest) -> str:
    """Echoes what the model saw, so a test can tell which history reached it; with the
    weather tool offered it calls it, and it answers with what the tool said."""
    last = request.messages[-1]
    if last["role"] == "tool":
        return f"tool said {last['content']}"
    if any("get_weather" in m["content"] for m in request.messages if m["role"] == "system"):
        return '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    return f"turns {len(request.messages)} last {last['content']}"
