"""The usage ledger's edge: what each caller used, summed on the peer that admitted it and
committed to the replicated ledger (cluster/usage.py) at a bounded rate; its routes.

`LedgerGate` wraps the access gate (aivailable/api/inference.py's Gate): where Metered
charges a request, it also books the engine's counts (peer/usage.py's Usage, read from a
forwarded answer's trailer when another peer ran it) under the caller's key, the model and
the UTC day. Only the entry peer books: a host serving a forwarded request leaves it to the
peer its caller reached, so each request is counted once.

Routes: `GET /cluster/usage` (admin: every key; `?key=ID&since=YYYY-MM-DD`) and
`GET /v1/usage` (any key: its own rows only). Both read the committed ledger, so every peer
answers the same (`?consistent=1` first runs the Raft read barrier).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime
from typing import Any

from aiohttp import web

from aivailable.access.errors import AccessError
from aivailable.access.guard import KEY_RECORD
from aivailable.cluster.keys import stamp
from aivailable.cluster.usage import (
    ANONYMOUS,
    MAX_ROWS_PER_COMMAND,
    UsageRow,
    UsageState,
    encode_usage_add,
)
from peer.auth import FORWARDED_HEADER

log = logging.getLogger(__name__)


def utc_day(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).date().isoformat()


class UsageBook:
    """This peer's use not yet committed, and the one batch on its way to the log."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self._clock = clock
        self._pending: dict[tuple[str, str, str], list[int]] = {}
        self._inflight: bytes | None = None  # a stamped command: retried as it is

    def book(self, key: str, model: str, prompt: int, completion: int) -> None:
        at = (key, model, utc_day(self._clock()))
        sums = self._pending.setdefault(at, [0, 0, 0])
        sums[0] += 1
        sums[1] += prompt
        sums[2] += completion

    def pending(self) -> list[UsageRow]:
        return [UsageRow(*at, *sums) for at, sums in sorted(self._pending.items())]

    async def flush(self, propose: Callable[[bytes], Awaitable[Any]]) -> bool:
        """One proposal: the batch that failed last time (same id: if it did commit, it
        applies once), else the pending sums. True when the log took it."""
        if self._inflight is None:
            if not self._pending:
                return True
            taken = sorted(self._pending)[:MAX_ROWS_PER_COMMAND]
            rows = [UsageRow(*at, *self._pending.pop(at)) for at in taken]
            self._inflight = stamp(encode_usage_add(rows))
        try:
            await propose(self._inflight)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # no leader now, a timeout: the next tick tries again
            log.warning("usage not committed yet (%s); retrying", exc)
            return False
        self._inflight = None
        return True

    async def run(self, propose: Callable[[bytes], Awaitable[Any]], every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            await self.flush(propose)


class LedgerGate:
    """The access gate, with every charge booked in the usage ledger too."""

    def __init__(self, gate: Any, book: UsageBook):
        self._gate = gate
        self._book = book

    def admit(self, request: web.Request, parsed) -> None:
        self._gate.admit(request, parsed)

    def charge(self, request: web.Request, parsed, usage) -> None:
        if FORWARDED_HEADER not in request.headers:  # the entry peer books it, once
            record = request.get(KEY_RECORD)
            prompt = usage.prompt_tokens if usage is not None else 0
            completion = usage.completion_tokens if usage is not None else 0
            key = record.id if record is not None else ANONYMOUS
            self._book.book(key, parsed.model, prompt, completion)
        self._gate.charge(request, parsed, usage)

    def visible(self, request: web.Request, model: str) -> bool:
        return self._gate.visible(request, model)


def _since(request: web.Request) -> str | None:
    value = request.query.get("since")
    if value is None:
        return None
    try:
        return date.fromisoformat(value).isoformat()
    except ValueError:
        raise AccessError(400, "'since' must be a date, YYYY-MM-DD", param="since") from None


def usage_report(rows: list[UsageRow], names: dict[str, str]) -> dict:
    """Rows with each key's name, and totals per key and per model."""
    by_key: dict[str, dict] = {}
    by_model: dict[str, dict] = {}
    for row in rows:
        for table, at in ((by_key, row.key), (by_model, row.model)):
            sums = table.setdefault(at, {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0})
            sums["requests"] += row.requests
            sums["prompt_tokens"] += row.prompt_tokens
            sums["completion_tokens"] += row.completion_tokens
    return {
        "object": "usage",
        "data": [{**r.to_json(), "key_name": names.get(r.key, "")} for r in rows],
        "by_key": [
            {"key": k, "key_name": names.get(k, ""), **v} for k, v in sorted(by_key.items())
        ],
        "by_model": [{"model": m, **v} for m, v in sorted(by_model.items())],
    }


class UsageApi:
    """`ledger()` is the replicated ledger (ClusterState.usage); `names()` key id -> name."""

    def __init__(
        self,
        ledger: Callable[[], UsageState],
        names: Callable[[], dict[str, str]],
        barrier: Callable[[], Awaitable[None]] | None = None,
    ):
        self._ledger = ledger
        self._names = names
        self._barrier = barrier

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/cluster/usage", self.cluster_usage), web.get("/v1/usage", self.own)]

    async def _read(self, request: web.Request, key: str | None) -> web.Response:
        since = _since(request)
        if request.query.get("consistent") in ("1", "true") and self._barrier is not None:
            await self._barrier()
        rows = self._ledger().query(key, since)
        return web.json_response(usage_report(rows, self._names()))

    async def cluster_usage(self, request: web.Request) -> web.Response:
        """Admin (access/policy.py: /cluster/ is admin's)."""
        return await self._read(request, request.query.get("key") or None)

    async def own(self, request: web.Request) -> web.Response:
        """The caller's own key's use (auth off: the anonymous rows)."""
        record = request.get(KEY_RECORD)
        return await self._read(request, record.id if record is not None else ANONYMOUS)
