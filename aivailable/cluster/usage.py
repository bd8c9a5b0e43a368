"""The usage ledger, replicated: per API key, model and UTC day, the requests and the prompt
and completion tokens the engines counted. Pure: no clock (the day travels in the command).

Each peer sums what its callers used and proposes the sums at a bounded rate
(access/ledger.py), one `usage_add` command for all of them, so the log grows with the
flush interval, not with the request rate. Applying adds; a retried proposal keeps its id and
applies once (ClusterState's proposal ids), so nothing is counted twice. Every peer applies
the same commands, so every peer reads the same ledger, and the Raft log and its snapshots
keep it across restarts.

Bounded: rows older than `RETENTION_DAYS` before the newest day seen leave (decided by the
commands' days, so every peer drops the same rows), and at most `MAX_ROWS` rows are kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import msgpack

USAGE_ADD = 48  # add per-(key, model, day) sums to the ledger
TYPE_NAMES = {USAGE_ADD: "usage_add"}

RETENTION_DAYS = 400  # a year and a bit: an admin compares this term with the last one
MAX_ROWS = 200_000  # 10,000 keys (cluster/keys.py) x a few models x some days, at most
MAX_ROWS_PER_COMMAND = 4096  # one flush; more waits for the next one
DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
MAX_FIELD = 200  # key ids are 12 hex digits, model names 128 characters
ANONYMOUS = "-"  # the key of requests made with auth off


class UsageCommandError(ValueError):
    """A usage command that is not well formed."""


@dataclass(frozen=True)
class UsageRow:
    key: str
    model: str
    day: str  # YYYY-MM-DD, UTC
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_json(self) -> dict:
        return {
            "key": self.key,
            "model": self.model,
            "day": self.day,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_FIELD:
        raise UsageCommandError(f"{what} must be a string of 1 to {MAX_FIELD} characters")
    return value


def _count(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 62:
        raise UsageCommandError(f"{what} must be a non-negative integer")
    return value


def _day(value: Any) -> str:
    if not isinstance(value, str) or not DAY.match(value):
        raise UsageCommandError("day must be YYYY-MM-DD")
    date.fromisoformat(value)  # a real date, or ValueError
    return value


def row_from_wire(item: Any) -> UsageRow:
    if not isinstance(item, list | tuple) or len(item) != 6:
        raise UsageCommandError("a usage row is [key, model, day, requests, prompt, completion]")
    key, model, day, requests, prompt, completion = item
    return UsageRow(
        _text(key, "key"),
        _text(model, "model"),
        _day(day),
        _count(requests, "requests"),
        _count(prompt, "prompt_tokens"),
        _count(completion, "completion_tokens"),
    )


def row_to_wire(row: UsageRow) -> list:
    return [
        row.key,
        row.model,
        row.day,
        row.requests,
        row.prompt_tokens,
        row.completion_tokens,
    ]


def encode_usage_add(rows: list[UsageRow]) -> bytes:
    # v 1: ClusterState's command protocol (cluster/state.py PROTOCOL)
    wire = [row_to_wire(r) for r in rows]
    return msgpack.packb({"v": 1, "t": USAGE_ADD, "rows": wire}, use_bin_type=True)


class UsageState:
    """The ledger: (key, model, day) -> UsageRow."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str, str], UsageRow] = {}
        self.version = 0  # bumps on every applied usage_add

    def apply(self, cmd: dict) -> bool:
        items = cmd.get("rows")
        if not isinstance(items, list) or len(items) > MAX_ROWS_PER_COMMAND:
            raise UsageCommandError(f"rows must be a list of at most {MAX_ROWS_PER_COMMAND}")
        rows = [row_from_wire(item) for item in items]  # all checked before any applies
        for row in rows:
            self._add(row)
        self._trim()
        self.version += 1
        return bool(rows)

    def _add(self, row: UsageRow) -> None:
        at = (row.key, row.model, row.day)
        old = self.rows.get(at)
        if old is None and len(self.rows) >= MAX_ROWS:
            return  # full: the oldest days leave in _trim; a flood of new rows is dropped
        if old is not None:
            row = UsageRow(
                row.key,
                row.model,
                row.day,
                old.requests + row.requests,
                old.prompt_tokens + row.prompt_tokens,
                old.completion_tokens + row.completion_tokens,
            )
        self.rows[at] = row

    def _trim(self) -> None:
        if not self.rows:
            return
        newest = max(day for _, _, day in self.rows)
        oldest = (date.fromisoformat(newest) - timedelta(days=RETENTION_DAYS)).isoformat()
        for at in [at for at in self.rows if at[2] < oldest]:
            del self.rows[at]

    def query(self, key: str | None = None, since: str | None = None) -> list[UsageRow]:
        """Rows of one key (or all), from `since` (a YYYY-MM-DD day) on, in order."""
        return [
            self.rows[at]
            for at in sorted(self.rows)
            if (key is None or at[0] == key) and (since is None or at[2] >= since)
        ]

    def to_wire(self) -> dict:
        return {
            "rows": [row_to_wire(self.rows[at]) for at in sorted(self.rows)],
            "version": self.version,
        }

    @classmethod
    def from_wire(cls, data: Any) -> UsageState:
        fresh = cls()
        if data is None:  # a snapshot from before the ledger
            return fresh
        if not isinstance(data, dict):
            raise UsageCommandError("usage state must be a map")
        for item in data.get("rows", []):
            row = row_from_wire(item)
            fresh.rows[(row.key, row.model, row.day)] = row
        version = data.get("version", 0)
        fresh.version = version if isinstance(version, int) else 0
        return fresh
