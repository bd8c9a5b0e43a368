"""Resuming a streamed answer on another replica when its host dies mid-stream. Pure.

`SseText` follows an OpenAI server-sent-event stream event by event: it passes on whole
events only (so a stream cut mid-event never leaves half an event at the client) and keeps
the text sent so far. `continuation` builds the request that asks another replica for the
rest: the prompt plus that text, and the tokens that remain of max_tokens.

Exact for /v1/completions (the prompt is text). For /v1/chat/completions the partial answer
is sent as a final assistant message with `continue_final_message` (vLLM's name for it), so a
server that honours it continues that message; one that does not starts a fresh answer after
it, which the client still receives as one stream.
"""

from __future__ import annotations

import json
from typing import Any

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
RESUMABLE_PATHS = (CHAT_PATH, COMPLETIONS_PATH)


class SseText:
    def __init__(self, chat: bool) -> None:
        self._chat = chat
        self._buffer = b""
        self.parts: list[str] = []
        self.tokens = 0  # content events: a server sends one per token
        self.done = False  # "[DONE]" seen

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def feed(self, chunk: bytes) -> bytes:
        """The whole events in `chunk` (and what was buffered before it), to pass on."""
        self._buffer += chunk
        end = self._buffer.rfind(b"\n\n")
        if end < 0:
            return b""
        ready, self._buffer = self._buffer[: end + 2], self._buffer[end + 2 :]
        for event in ready.split(b"\n\n"):
            self._note(event)
        return ready

    def leftover(self) -> bytes:
        """Bytes after the last whole event (an answer that did not end with one); clears."""
        out, self._buffer = self._buffer, b""
        return out

    def _note(self, event: bytes) -> None:
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                self.done = True
                continue
            try:
                choice = json.loads(data)["choices"][0]
                piece = choice["delta"].get("content") if self._chat else choice.get("text")
            except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                continue
            if isinstance(piece, str) and piece:
                self.parts.append(piece)
                self.tokens += 1


def continuation(path: str, request: Any, text: str, tokens: int) -> dict | None:
    """The request body that asks for the rest of an answer, or None when it cannot be
    resumed (another endpoint, several choices, a prompt that is not text) or nothing
    remains of max_tokens."""
    if path not in RESUMABLE_PATHS or not isinstance(request, dict):
        return None
    if request.get("n", 1) != 1 or not request.get("stream"):
        return None
    body = dict(request)
    for key in ("max_tokens", "max_completion_tokens"):
        limit = body.get(key)
        if isinstance(limit, int) and not isinstance(limit, bool):
            if limit - tokens <= 0:
                return None
            body[key] = limit - tokens
    if path == COMPLETIONS_PATH:
        if not isinstance(body.get("prompt"), str):
            return None
        body["prompt"] = body["prompt"] + text
        return body
    messages = body.get("messages")
    if not isinstance(messages, list) or not text:
        return body if isinstance(messages, list) else None
    body["messages"] = [*messages, {"role": "assistant", "content": text}]
    body["continue_final_message"] = True
    body["add_generation_prompt"] = False
    return body
