"""What every inference route does around its engine call, in one place.

A route parses its body once into the typed request (`validate.Parsed`: model, kind, the
bounded max tokens, stream); `Metered` then asks the gate (the access layer, handed in by the
wiring) whether this caller may use that model and spend that bound, and charges what the
engine counted once the answer is over: a local engine's `Finished` or embeddings, or the
usage trailer a host sent back for a forwarded answer (peer/usage.py). A listing of models
goes through `visible_models`, the one filter for a scoped key. No route reads a body twice,
and nothing here reads a response's JSON to learn what it cost.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from aiohttp import web

from aivailable.api.validate import Parsed
from peer.auth import FORWARDED_HEADER
from peer.forward import FORWARDED_USAGE_KEY, HeadersWithFirstChunk
from peer.usage import USAGE_TRAILER_HEADER, Usage, encode_trailer


class Gate(Protocol):
    """Access decisions from the typed request alone (aivailable/access/guard.py is one)."""

    def admit(self, request: web.Request, parsed: Parsed) -> None:
        """Raises (403, 429) when this caller may not run `parsed`; else reserves its bound."""

    def charge(self, request: web.Request, parsed: Parsed, usage: Usage | None) -> None:
        """What the request cost; None when nobody knows (a host died mid-answer)."""

    def visible(self, request: web.Request, model: str) -> bool:
        """Whether this caller may see (and so use) `model`."""


class OpenGate:
    """No access control: auth off, or a peer's own request."""

    def admit(self, request: web.Request, parsed: Parsed) -> None:
        return None

    def charge(self, request: web.Request, parsed: Parsed, usage: Usage | None) -> None:
        return None

    def visible(self, request: web.Request, model: str) -> bool:
        return True


def visible_models(gate: Gate, request: web.Request, names: Iterable[str]) -> list[str]:
    """The one listing filter: /v1/models, /v1/models/{m}, /api/tags, /api/ps, /api/show."""
    return sorted(n for n in set(names) if gate.visible(request, n))


class Metered:
    """One inference request's accounting: admitted on entry, charged on exit.

    Use as `async with Metered(gate, request, parsed) as meter:`; the local path calls
    `meter.used(...)` with the engine's counts. A forwarded answer's cost comes from the
    trailer the forwarder read. Answering a forwarded request itself, this peer adds the
    trailer (`headers()`, `trailer()`, `json_body()`) so the entry peer can charge it.
    """

    def __init__(self, gate: Gate, request: web.Request, parsed: Parsed):
        self._gate = gate
        self._request = request
        self.parsed = parsed
        self.usage: Usage | None = None
        # A peer's signed request: the entry peer charges its caller from our trailer.
        self.for_peer = FORWARDED_HEADER in request.headers

    async def __aenter__(self) -> Metered:
        self._gate.admit(self._request, self.parsed)
        return self

    async def __aexit__(self, *exc) -> None:
        usage = self.usage or self._request.get(FORWARDED_USAGE_KEY)
        self._gate.charge(self._request, self.parsed, usage)

    def used(self, prompt_tokens: int, completion_tokens: int = 0) -> None:
        self.usage = Usage(prompt_tokens, completion_tokens)

    def headers(self) -> dict[str, str]:
        return {USAGE_TRAILER_HEADER: "1"} if self.for_peer else {}

    def trailer(self) -> bytes:
        if not self.for_peer or self.usage is None:
            return b""
        return encode_trailer(self.usage)

    def sse_response(self) -> web.StreamResponse:
        """A text/event-stream answer (not yet prepared), announcing the trailer to a peer."""
        return HeadersWithFirstChunk(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                **self.headers(),
            }
        )

    def json_response(self, payload: dict) -> web.Response:
        """A JSON answer, with the trailer after it for a peer."""
        response = web.json_response(payload, headers=self.headers())
        if self.for_peer:
            response.body = response.body + self.trailer()
        return response
