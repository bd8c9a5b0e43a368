"""The Responses API's shapes for what the engine produced: the response object, its output
items (a message, or function calls), its usage, and the event stream's events.

No I/O; ids are random (uuid4), as structured.py's tool call ids are.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from aivailable.api import structured
from aivailable.api.responses_parse import ResponsesCall
from aivailable.backends.base import Finished


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def skeleton(call: ResponsesCall, rid: str, created: int) -> dict:
    """The response object before any output: what response.created carries."""
    body, params = call.body, call.parsed.request.params
    fmt = (body.get("text") or {}).get("format") or {"type": "text"}
    return {
        "id": rid,
        "object": "response",
        "created_at": created,
        "status": "in_progress",
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": call.parsed.model,
        "output": [],
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": call.previous_response_id,
        "store": call.store,
        "temperature": params.temperature,
        "text": {"format": fmt},
        "tool_choice": body.get("tool_choice") or "auto",
        "tools": body.get("tools") or [],
        "top_p": params.top_p,
        "truncation": "disabled",
        "usage": None,
        "user": body.get("user"),
        "metadata": call.metadata,
    }


def message_item(item_id: str, text: str, status: str = "completed") -> dict:
    content = [text_part(text)] if status == "completed" else []
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": content,
    }


def text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def function_items(text: str, call: ResponsesCall) -> list[dict] | None:
    """The function_call items the answer makes, or None when it is plain text."""
    if not call.parsed.functions:
        return None
    calls = structured.tool_calls_in(text, list(call.parsed.functions))
    if not calls:
        return None
    return [
        {
            "type": "function_call",
            "id": new_id("fc"),
            "call_id": c["id"],
            "name": c["function"]["name"],
            "arguments": c["function"]["arguments"],
            "status": "completed",
        }
        for c in calls
    ]


def output_items(text: str, call: ResponsesCall) -> list[dict]:
    return function_items(text, call) or [message_item(new_id("msg"), text)]


def usage(finished: Finished) -> dict:
    """Usage in the Responses shape, from the engine's counts."""
    return {
        "input_tokens": finished.prompt_tokens,
        "input_tokens_details": {"cached_tokens": finished.cached_tokens},
        "output_tokens": finished.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": finished.prompt_tokens + finished.completion_tokens,
    }


def finished(response: dict, items: list[dict], done: Finished) -> dict:
    """The response once the engine is done: completed, or incomplete at max_output_tokens."""
    cut = done.finish_reason == "length" and not any(i["type"] == "function_call" for i in items)
    return {
        **response,
        "status": "incomplete" if cut else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "output": items,
        "usage": usage(done),
    }


def history(call: ResponsesCall, response: dict) -> list[dict]:
    """The conversation a later `previous_response_id` continues: this call's items and its
    output, as input items (instructions are not carried over, as OpenAI does)."""
    out = list(call.items)
    for item in response["output"]:
        if item["type"] == "message":
            text = "".join(p["text"] for p in item["content"])
            out.append({"type": "message", "role": "assistant", "content": text})
        else:
            out.append({k: item[k] for k in ("type", "call_id", "name", "arguments")})
    return out


class EventStream:
    """The Responses API's server-sent events, numbered in order."""

    def __init__(self) -> None:
        self.sequence = 0

    def event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()

    def message_start(self, index: int, item_id: str) -> bytes:
        item = message_item(item_id, "", status="in_progress")
        return self.event("response.output_item.added", output_index=index, item=item) + (
            self.event(
                "response.content_part.added",
                item_id=item_id,
                output_index=index,
                content_index=0,
                part=text_part(""),
            )
        )

    def text_delta(self, index: int, item_id: str, delta: str) -> bytes:
        return self.event(
            "response.output_text.delta",
            item_id=item_id,
            output_index=index,
            content_index=0,
            delta=delta,
            logprobs=[],
        )

    def message_end(self, index: int, item: dict) -> bytes:
        text = item["content"][0]["text"]
        common = {"item_id": item["id"], "output_index": index, "content_index": 0}
        return (
            self.event("response.output_text.done", **common, text=text, logprobs=[])
            + self.event("response.content_part.done", **common, part=text_part(text))
            + self.event("response.output_item.done", output_index=index, item=item)
        )

    def function_call(self, index: int, item: dict) -> bytes:
        """A whole call: added, its arguments as one delta, done (the grammar made it whole
        before it could be known to be a call)."""
        started = {**item, "arguments": "", "status": "in_progress"}
        common = {"item_id": item["id"], "output_index": index}
        return (
            self.event("response.output_item.added", output_index=index, item=started)
            + self.event(
                "response.function_call_arguments.delta", **common, delta=item["arguments"]
            )
            + self.event(
                "response.function_call_arguments.done",
                **common,
                name=item["name"],
                arguments=item["arguments"],
            )
            + self.event("response.output_item.done", output_index=index, item=item)
        )

    def item(self, index: int, item: dict) -> bytes:
        """A whole output item, streamed at once (a held answer)."""
        if item["type"] == "function_call":
            return self.function_call(index, item)
        return self.message_start(index, item["id"]) + (
            self.text_delta(index, item["id"], item["content"][0]["text"])
            + self.message_end(index, item)
        )
