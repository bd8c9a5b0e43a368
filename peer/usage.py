"""The usage trailer: how a host peer tells the entry peer what a forwarded answer cost. Pure.

The entry peer admitted the request against its caller's key, so it is the one that must
charge the tokens; only the host's engine knows them, and only once the answer is over, after
a stream's headers left long ago. So a host answering a forwarded (signed) inference request
says so in a header (`USAGE_TRAILER_HEADER`) and ends the body with one trailer: a NUL byte,
then `{"prompt_tokens": P, "completion_tokens": C}`. JSON text (an SSE event, an NDJSON line,
a JSON answer) never holds a raw NUL, so the first NUL is the trailer's start, found without
holding any byte back from the client. The entry peer strips it before the client sees it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

USAGE_TRAILER_HEADER = "X-Aivailable-Usage-Trailer"
MARK = b"\x00"
MAX_TRAILER = 256  # bytes: two integers in JSON; anything longer is not ours


@dataclass(frozen=True)
class Usage:
    """Tokens one request cost, as the engine counted them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
        )


def encode_trailer(usage: Usage) -> bytes:
    body = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
    return MARK + json.dumps(body, separators=(",", ":")).encode()


def decode_trailer(data: bytes) -> Usage | None:
    """The usage in a trailer's bytes (after the mark), or None when they are not one."""
    if len(data) > MAX_TRAILER:
        return None
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict):
        return None
    values = [body.get("prompt_tokens"), body.get("completion_tokens")]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        return None
    return Usage(values[0], values[1])


class TrailerSplitter:
    """Splits a relayed body into what the client gets and the trailer at its end."""

    def __init__(self) -> None:
        self._tail: bytearray | None = None  # bytes after the mark, once seen
        self.overflow = False

    def feed(self, chunk: bytes) -> bytes:
        """The part of `chunk` to pass on to the client."""
        if self._tail is not None:
            self._take(chunk)
            return b""
        at = chunk.find(MARK)
        if at < 0:
            return chunk
        self._tail = bytearray()
        self._take(chunk[at + 1 :])
        return chunk[:at]

    def _take(self, data: bytes) -> None:
        assert self._tail is not None
        if len(self._tail) + len(data) > MAX_TRAILER:
            self.overflow = True  # bounded: a broken host cannot make us buffer its stream
            return
        self._tail += data

    def usage(self) -> Usage | None:
        """The trailer's usage once the body ended; None when there was none (a host that
        died mid-answer) or it was malformed."""
        if self._tail is None or self.overflow:
            return None
        return decode_trailer(bytes(self._tail))
