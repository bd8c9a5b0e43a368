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
RESPONSES_PATH = "/v1/responses"  # not resumed: docs/forward.md
COMPLETIONS_PATH = "/v1/completions"
RESUMABLE_PATHS = (CHAT_PATH, COMPLETIONS_PATH)


class SseText:
    """The events of one stream: passed on whole, and read for their text only when a resume
    asks (`text`, `tokens`, `done`). Parsing every event's JSON as it passed cost a relaying
    peer more per token than the relay itself, for an answer that almost never breaks; the
    unread events are kept as bytes, and read in batches of `fold_bytes` to bound them."""

    def __init__(self, chat: bool, fold_bytes: int = 256 * 1024) -> None:
        self._chat = chat
        self._fold_bytes = fold_bytes
        self._buffer = b""
        self._unread: list[bytes] = []  # whole events passed on but not read yet
        self._unread_size = 0
        self._parts: list[str] = []
        self._tokens = 0  # content events: a server sends one per token
        self._done = False  # "[DONE]" seen

    @property
    def text(self) -> str:
        self._read()
        return "".join(self._parts)

    @property
    def tokens(self) -> int:
        self._read()
        return self._tokens

    @property
    def done(self) -> bool:
        self._read()
        return self._done

    def feed(self, chunk: bytes) -> bytes:
        """The whole events in `chunk` (and what was buffered before it), to pass on."""
        self._buffer += chunk
        end = self._buffer.rfind(b"\n\n")
        if end < 0:
            return b""
        ready, self._buffer = self._buffer[: end + 2], self._buffer[end + 2 :]
        self._unread.append(ready)
        self._unread_size += len(ready)
        if self._unread_size > self._fold_bytes:
            self._read()
        return ready

    def leftover(self) -> bytes:
        """Bytes after the last whole event (an answer that did not end with one); clears."""
        out, self._buffer = self._buffer, b""
        return out

    def _read(self) -> None:
        unread, self._unread, self._unread_size = self._unread, [], 0
        for ready in unread:
            for event in ready.split(b"\n\n"):
                self._note(event)

    def _note(self, event: bytes) -> None:
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                self._done = True
                continue
            try:
                choice = json.loads(data)["choices"][0]
                piece = choice["delta"].get("content") if self._chat else choice.get("text")
            except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                continue
            if isinstance(piece, str) and piece:
                self._parts.append(piece)
                self._tokens += 1


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
