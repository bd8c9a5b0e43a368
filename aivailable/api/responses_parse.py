"""OpenAI's Responses API request (`POST /v1/responses`) as the one typed request, Parsed.

A Responses body is translated into the chat body it means (instructions as a system
message, input items as messages, function calls and their outputs as tool calls and tool
messages, `text.format` as `response_format`, `max_output_tokens` as `max_tokens`) and then
parsed by validate.parse_chat, so access, grammars and tools run exactly as for chat. A field
this server does not implement is a 400 that names it, never silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aivailable.api.errors import ApiError, bad_request
from aivailable.api.validate import Parsed, parse_chat

# Fields taken as they are meant. Anything else is refused (400 naming it).
SUPPORTED = frozenset(
    {
        "model",
        "input",
        "instructions",
        "stream",
        "tools",
        "tool_choice",
        "text",
        "max_output_tokens",
        "temperature",
        "top_p",
        "store",
        "previous_response_id",
        "metadata",
        "user",
        "parallel_tool_calls",
    }
)
# Fields accepted only at the value that asks for nothing (what the openai client may send).
NEUTRAL = {
    "truncation": (None, "disabled"),
    "service_tier": (None, "auto", "default"),
    "background": (None, False),
    "include": (None, []),
    "reasoning": (None, {}),
    "stream_options": (None, {}),
}
MAX_METADATA = 16  # OpenAI's own bound: 16 pairs, keys of 64, values of 512 characters
TEXT_PARTS = ("input_text", "output_text", "text")
# Chat's parameter names, said in the Responses API's words.
PARAM_NAMES = {
    "max_tokens": "max_output_tokens",
    "response_format": "text.format",
    "response_format.json_schema": "text.format.schema",
    "messages": "input",
}


@dataclass(frozen=True)
class ResponsesCall:
    """A parsed Responses request: the Parsed that runs, and what the answer echoes back."""

    parsed: Parsed
    body: dict  # the client's body, as sent
    items: tuple[dict, ...]  # the conversation in Responses items: history, then this input
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict = field(default_factory=dict)


def _refuse_unsupported(body: dict) -> None:
    for name, value in body.items():
        if name in SUPPORTED:
            continue
        if name in NEUTRAL and value in NEUTRAL[name]:
            continue
        raise bad_request(
            f"'{name}' is not supported by this server's Responses API",
            param=name,
            code="unsupported_parameter",
        )


def input_items(value: Any) -> list[dict]:
    """`input` as a list of items (a string is one user message)."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise bad_request("'input' must be a string or a non-empty list of items", "input")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise bad_request("each input item must be an object", param=f"input[{i}]")
    return value


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request("'content' must be a string or a list of parts", param=where)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in TEXT_PARTS:
            raise bad_request(
                "only text content parts (input_text, output_text) are supported",
                param=f"{where}[{j}]",
            )
        if not isinstance(part.get("text"), str):
            raise bad_request("a text part needs a string 'text'", param=f"{where}[{j}].text")
        texts.append(part["text"])
    return "".join(texts)


def _message_of(item: dict, i: int) -> dict:
    """One Responses input item as a chat message."""
    kind = item.get("type", "message")
    where = f"input[{i}]"
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise bad_request(
                "'role' must be user, assistant, system or developer", f"{where}.role"
            )
        return {"role": role, "content": _text_of(item.get("content"), f"{where}.content")}
    if kind == "function_call":
        name, arguments = item.get("name"), item.get("arguments", "{}")
        if not isinstance(name, str) or not name or not isinstance(arguments, str):
            raise bad_request(
                "a function_call needs a 'name' and 'arguments' (a JSON string)", where
            )
        call = {"id": item.get("call_id"), "type": "function"}
        call["function"] = {"name": name, "arguments": arguments}
        return {"role": "assistant", "content": None, "tool_calls": [call]}
    if kind == "function_call_output":
        output = item.get("output")
        if not isinstance(output, str):
            output = json.dumps(output)
        if not isinstance(item.get("call_id"), str):
            raise bad_request("a function_call_output needs its 'call_id'", f"{where}.call_id")
        return {"role": "tool", "content": output, "tool_call_id": item["call_id"]}
    raise bad_request(
        f"input items of type '{kind}' are not supported (message, function_call, "
        "function_call_output are)",
        param=f"{where}.type",
    )


def _tools(value: Any) -> list[dict] | None:
    """Responses tools (`{"type": "function", "name", "parameters"}`) in chat's shape."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise bad_request("'tools' must be a list", param="tools")
    out = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise bad_request(
                f"only function tools are supported, not {kind!r}", param=f"tools[{i}].type"
            )
        spec = {k: tool[k] for k in ("name", "description", "parameters") if k in tool}
        out.append({"type": "function", "function": spec})
    return out or None


def _tool_choice(value: Any) -> Any:
    if isinstance(value, dict) and value.get("type") == "function":
        return {"type": "function", "function": {"name": value.get("name")}}
    if value is None or value in ("auto", "none", "required"):
        return value
    raise bad_request(
        "'tool_choice' must be auto, none, required or {'type': 'function', 'name': ...}",
        param="tool_choice",
    )


def _response_format(text: Any) -> dict | None:
    """`text.format` as chat's `response_format` (the same grammar path)."""
    if text is None:
        return None
    if not isinstance(text, dict) or set(text) - {"format", "verbosity"}:
        raise bad_request("'text' may hold only 'format'", param="text")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise bad_request("'text.format' must be an object", param="text.format")
    if fmt.get("type") == "json_schema":
        spec = {"name": fmt.get("name"), "schema": fmt.get("schema") or {"type": "object"}}
        return {"type": "json_schema", "json_schema": spec}
    return {"type": fmt.get("type")}


def _metadata(value: Any) -> dict:
    if value is None:
        return {}
    if (
        not isinstance(value, dict)
        or len(value) > MAX_METADATA
        or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
            for k, v in value.items()
        )
    ):
        raise bad_request(
            f"'metadata' maps at most {MAX_METADATA} keys (64 chars) to strings (512 chars)",
            param="metadata",
        )
    return value


def _flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be a boolean", param=name)
    return value


def previous_id(body: Any) -> str | None:
    """The `previous_response_id` of a body, checked."""
    value = body.get("previous_response_id") if isinstance(body, dict) else None
    if value is not None and (not isinstance(value, str) or not value or len(value) > 300):
        raise bad_request("'previous_response_id' must be a response id", "previous_response_id")
    return value


def parse_responses(
    body: Any, max_tokens_limit: int, history: tuple[dict, ...] = ()
) -> ResponsesCall:
    """A /v1/responses body (and the items of the response it continues) as a call."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    _refuse_unsupported(body)
    previous = previous_id(body)
    items = [*history, *input_items(body.get("input"))]
    messages = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise bad_request("'instructions' must be a string", param="instructions")
        messages.append({"role": "system", "content": instructions})
    messages += [_message_of(item, i) for i, item in enumerate(items)]
    chat = {
        "model": body.get("model"),
        "messages": messages,
        "stream": body.get("stream", False),
        "tools": _tools(body.get("tools")),
        "tool_choice": _tool_choice(body.get("tool_choice")),
        "response_format": _response_format(body.get("text")),
        "max_tokens": body.get("max_output_tokens"),
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
    }
    _flag(body, "parallel_tool_calls", True)
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad_request("'user' must be a string", param="user")
    try:
        parsed = parse_chat({k: v for k, v in chat.items() if v is not None}, max_tokens_limit)
    except ApiError as exc:
        for chat_name, name in PARAM_NAMES.items():  # say it in the caller's words
            exc.message = exc.message.replace(f"'{chat_name}'", f"'{name}'")
        exc.param = _responses_param(exc.param)
        raise
    return ResponsesCall(
        parsed,
        body,
        tuple(items),
        store=_flag(body, "store", True),
        previous_response_id=previous,
        metadata=_metadata(body.get("metadata")),
    )


def _responses_param(param: str | None) -> str | None:
    """A chat parameter's name as the Responses API calls it."""
    if param is None:
        return None
    for chat, responses in PARAM_NAMES.items():
        if param == chat or param.startswith(chat + "["):
            return responses + param[len(chat) :]
    return param
