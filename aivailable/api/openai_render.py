"""OpenAI's response shapes for what the engine produced: messages, tool calls, logprobs,
usage. Pure functions, shared by the whole and the streamed answers."""

from __future__ import annotations

import base64
import struct
from typing import TYPE_CHECKING

from aivailable.api import structured
from aivailable.backends.base import Finished, SamplingParams

if TYPE_CHECKING:
    from aivailable.api.validate import Parsed


def chat_message(text: str, finish_reason: str, parsed: Parsed) -> tuple[dict, str]:
    """The assistant message for a choice's text, and its finish reason: a tool call
    when the text is one (always when a call was required: the grammar made it one)."""
    if parsed.functions:
        calls = structured.tool_calls_in(text, list(parsed.functions))
        if calls:
            return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
    return {"role": "assistant", "content": text}, finish_reason


def stream_delta(message: dict) -> dict:
    """A whole message as one streamed delta (tool calls carry their index)."""
    if message.get("tool_calls"):
        calls = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
        return {"tool_calls": calls}
    return {"content": message.get("content") or ""}


def chat_logprobs(entries: list[dict], params: SamplingParams) -> dict | None:
    if not params.logprobs:
        return None
    return {"content": [_entry(e, params.top_logprobs) for e in entries]}


def _entry(entry: dict, top: int) -> dict:
    alternatives = entry.get("top_logprobs", [])[:top]
    return {
        "token": entry["token"],
        "logprob": entry["logprob"],
        "bytes": entry["bytes"],
        "top_logprobs": [{k: a[k] for k in ("token", "logprob", "bytes")} for a in alternatives],
    }


def completion_logprobs(entries: list[dict], params: SamplingParams) -> dict | None:
    """The legacy completions shape: parallel lists, with text offsets."""
    if not params.logprobs:
        return None
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [
            {a["token"]: a["logprob"] for a in e.get("top_logprobs", [])[: params.top_logprobs]}
            for e in entries
        ],
        "text_offset": offsets,
    }


def usage(finished: Finished) -> dict:
    return {
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": finished.completion_tokens,
        "total_tokens": finished.prompt_tokens + finished.completion_tokens,
        # Prompt tokens served from the prefix cache: a chat's second turn evaluates only
        # its new tokens (OpenAI reports its own prompt caching the same way).
        "prompt_tokens_details": {"cached_tokens": finished.cached_tokens},
    }


def embedding(vector: tuple[float, ...], encoding: str) -> list[float] | str:
    """A vector as JSON floats, or as OpenAI's base64 of little-endian float32."""
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return list(vector)
