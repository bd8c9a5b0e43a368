"""W3C Trace Context (`traceparent`): the one header that follows a request across peers.

`00-<32 hex trace id>-<16 hex parent span id>-<2 hex flags>`. A client's valid header is kept;
otherwise the entry peer starts a trace of its own (not sampled), so the access log of every
peer a request crosses carries one trace id even when nobody exports spans. The forwarder
(peer/forward.py) sends `request[TRACEPARENT_KEY]` on every hop: the client's, or the span
the entry peer is in when spans are exported (aivailable/api/tracing.py).
"""

from __future__ import annotations

import re
import secrets

TRACEPARENT_HEADER = "traceparent"
_FORM = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def parse(value: str | None) -> tuple[str, str, str] | None:
    """(trace id, parent span id, flags) of a valid header; None otherwise (W3C: all-zero
    ids and version ff are invalid)."""
    match = _FORM.match((value or "").strip().lower())
    if match is None:
        return None
    version, trace_id, span_id, flags = match.groups()
    if version == "ff" or trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return trace_id, span_id, flags


def make(trace_id: str, span_id: str, sampled: bool) -> str:
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


def accepted_or_new(value: str | None) -> str:
    """The client's traceparent when it is valid, else a new unsampled trace's."""
    parsed = parse(value)
    if parsed is not None:
        return make(parsed[0], parsed[1], parsed[2] == "01")
    return make(secrets.token_hex(16), secrets.token_hex(8), False)


def trace_id(value: str | None) -> str:
    parsed = parse(value)
    return parsed[0] if parsed is not None else "-"
