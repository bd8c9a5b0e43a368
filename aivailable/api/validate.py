"""Check OpenAI-style request bodies and turn them into engine requests.

Pure: takes the decoded JSON, returns frozen requests, raises ApiError with the
parameter at fault. Unknown extra fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aivailable.api.errors import bad_request
from aivailable.backends.base import ChatRequest, CompletionRequest, SamplingParams

ROLES = ("system", "user", "assistant", "tool", "developer")


@dataclass(frozen=True)
class Parsed:
    model: str
    request: ChatRequest | CompletionRequest
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk carries usage


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value):
        raise bad_request(f"'{name}' must be a number", param=name)
    if not low <= value <= high:
        raise bad_request(f"'{name}' must be between {low} and {high}, got {value}", param=name)
    return float(value)


def _max_tokens(body: dict, limit: int) -> int:
    name = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    value = body.get(name)
    if value is None:
        return limit
    if not isinstance(value, int) or isinstance(value, bool):
        raise bad_request(f"'{name}' must be an integer", param=name)
    if value < 1:
        raise bad_request(f"'{name}' must be at least 1, got {value}", param=name)
    if value > limit:
        raise bad_request(f"'{name}' must be at most {limit}, got {value}", param=name)
    return value


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list) and all(isinstance(s, str) for s in value) and len(value) <= 4:
        return tuple(s for s in value if s)
    raise bad_request("'stop' must be a string or a list of at most 4 strings", param="stop")


def _seed(body: dict) -> int | None:
    value = body.get("seed")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise bad_request("'seed' must be an integer", param="seed")
    return value & 0xFFFFFFFF  # llama.cpp takes a 32-bit seed


def _common(body: Any, max_tokens_limit: int) -> tuple[str, SamplingParams, bool, bool]:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required and must be a non-empty string", param="model")
    n = body.get("n", 1)
    if n != 1:
        raise bad_request("only n=1 is supported", param="n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", param="stream_options")
    params = SamplingParams(
        max_tokens=_max_tokens(body, max_tokens_limit),
        temperature=_number(body, "temperature", 0.8, 0.0, 2.0),
        top_p=_number(body, "top_p", 0.95, 0.0, 1.0),
        stop=_stop(body),
        seed=_seed(body),
    )
    return model, params, stream, bool(stream and options.get("include_usage"))


def _content_text(content: Any, index: int) -> str:
    """A message's content: a string, or a list of text parts (images are not supported)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise bad_request(
                    "only text content parts are supported", param=f"messages[{index}].content"
                )
            if not isinstance(part.get("text"), str):
                raise bad_request(
                    "a text part needs a string 'text'", param=f"messages[{index}].content"
                )
            texts.append(part["text"])
        return "".join(texts)
    if content is None:
        return ""
    raise bad_request("'content' must be a string or a list of parts", param=f"messages[{index}]")


def parse_chat(body: Any, max_tokens_limit: int) -> Parsed:
    model, params, stream, include_usage = _common(body, max_tokens_limit)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' is required and must be a non-empty list", param="messages")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request("each message must be an object", param=f"messages[{i}]")
        role = message.get("role")
        if role not in ROLES:
            raise bad_request(
                f"'role' must be one of {', '.join(ROLES)}", param=f"messages[{i}].role"
            )
        role = "system" if role == "developer" else role
        clean.append({"role": role, "content": _content_text(message.get("content"), i)})
    return Parsed(model, ChatRequest(tuple(clean), params), stream, include_usage)


def parse_completion(body: Any, max_tokens_limit: int) -> Parsed:
    model, params, stream, include_usage = _common(body, max_tokens_limit)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad_request("'prompt' is required and must be a string", param="prompt")
    return Parsed(model, CompletionRequest(prompt, params), stream, include_usage)
