"""Constrained output: `response_format` and `tools` turned into llama.cpp grammars.

The JSON-schema-to-GBNF converter is llama.cpp's own (the Python port that
llama-cpp-python ships); llama.cpp's grammar sampler in the worker then guarantees the
answer parses. Tools are described to the model in a system message; when a call is
required (`tool_choice` "required" or a named function) a grammar built from the tools'
parameter schemas makes the answer one valid call. No I/O, but not pure: the converter
is llama.cpp's, and a tool call's id is random (uuid4).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from aivailable.api.errors import bad_request

MAX_SCHEMA_BYTES = 64 << 10  # a schema this size already yields a grammar of thousands of rules


def schema_grammar(schema: Any, param: str) -> str:
    """GBNF for a JSON schema; 400 if the converter cannot take it."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    if not isinstance(schema, dict):
        raise bad_request("a JSON schema must be an object", param=param)
    text = json.dumps(schema)
    if len(text) > MAX_SCHEMA_BYTES:
        raise bad_request(f"the schema is over {MAX_SCHEMA_BYTES} bytes", param=param)
    try:
        return json_schema_to_gbnf(text)
    except RecursionError as e:
        raise bad_request("the schema nests too deeply", param=param) from e
    except Exception as e:  # the converter's own complaint is the clearest message
        raise bad_request(f"unsupported JSON schema: {e}", param=param) from e


def response_format_grammar(value: Any) -> str | None:
    """`response_format`: text (None), json_object or json_schema."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in (
        "text",
        "json_object",
        "json_schema",
    ):
        raise bad_request(
            "'response_format.type' must be 'text', 'json_object' or 'json_schema'",
            param="response_format",
        )
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return schema_grammar({"type": "object"}, "response_format")
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise bad_request(
            "'response_format.json_schema' must be an object with a 'schema'",
            param="response_format.json_schema",
        )
    return schema_grammar(spec.get("schema") or {"type": "object"}, "response_format.json_schema")


def parse_tools(tools: Any, choice: Any) -> tuple[list[dict], str | None]:
    """Checks `tools` and `tool_choice`; returns the function specs and the forced mode:
    None (the model may answer in text or call), "required", or a function's name."""
    if tools is None:
        if choice not in (None, "none", "auto"):
            raise bad_request("'tool_choice' needs 'tools'", param="tool_choice")
        return [], None
    if not isinstance(tools, list) or not tools:
        raise bad_request("'tools' must be a non-empty list", param="tools")
    functions = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise bad_request(
                "each tool must be {'type': 'function', 'function': {...}}", f"tools[{i}]"
            )
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad_request("a function needs a 'name'", param=f"tools[{i}].function.name")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise bad_request("'parameters' must be a JSON schema", f"tools[{i}].function")
        functions.append(
            {"name": fn["name"], "description": fn.get("description") or "", "parameters": params}
        )
    names = [f["name"] for f in functions]
    if choice in (None, "auto"):
        return functions, None
    if choice == "none":
        return [], None
    if choice == "required":
        return functions, "required"
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if named not in names:
        raise bad_request(
            f"'tool_choice' must be none, auto, required or one of {names}", "tool_choice"
        )
    return functions, named


def tools_system_message(functions: list[dict]) -> dict:
    listing = json.dumps(functions, separators=(",", ":"))
    return {
        "role": "system",
        "content": (
            "You can call these functions:\n" + listing + "\nTo call one, answer with only a "
            'JSON object: {"name": <function name>, "arguments": <arguments object>}.'
        ),
    }


def tool_call_grammar(functions: list[dict], forced: str) -> str:
    """One call of any tool ("required") or of the named one, arguments per its schema."""
    chosen = [f for f in functions if forced == "required" or f["name"] == forced]
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
            "required": ["name", "arguments"],
        }
        for f in chosen
    ]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return schema_grammar(schema, "tools")


def tool_calls_in(text: str, functions: list[dict]) -> list[dict] | None:
    """The OpenAI `tool_calls` an answer makes, or None if it is plain text."""
    try:
        value = json.loads(text.strip().removeprefix("<tool_call>").removesuffix("</tool_call>"))
    except (json.JSONDecodeError, ValueError):
        return None
    calls = value if isinstance(value, list) else [value]
    names = {f["name"] for f in functions}
    out = []
    for call in calls:
        if not isinstance(call, dict) or call.get("name") not in names:
            return None
        arguments = call.get("arguments", {})
        out.append(
            {
                "id": "call_" + uuid.uuid4().hex[:24],
                "type": "function",
                "function": {"name": call["name"], "arguments": json.dumps(arguments)},
            }
        )
    return out


def history_message(message: dict, content: str) -> dict:
    """A message of the conversation for the chat template: an assistant's earlier tool
    calls become the JSON it answered with; a tool's result keeps its role."""
    calls = message.get("tool_calls")
    if message.get("role") == "assistant" and isinstance(calls, list) and calls:
        rendered = []
        for call in calls:
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                try:
                    arguments = json.loads(fn.get("arguments") or "{}")
                except (TypeError, json.JSONDecodeError):
                    arguments = fn.get("arguments")
                rendered.append({"name": fn.get("name"), "arguments": arguments})
        content = json.dumps(rendered[0] if len(rendered) == 1 else rendered)
    return {"role": message["role"], "content": content}
