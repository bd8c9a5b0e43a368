"""Stored responses (`store`, `previous_response_id`, GET/DELETE /v1/responses/{id}).

Where they live, and why: on the peer that answered, and the response id is the pointer
(`resp_<hex of that node's name>_<random>`). Every peer can find a response by its id alone,
with one signed GET to that peer (`/internal/responses/{id}`), and a response costs nothing
on the Raft log: a conversation's turns are many, large (whole transcripts) and only ever
read by their owner, which would make the replicated state grow with every chat and every
peer apply every turn. The price: a response is lost with its peer (a restart included), so
a client must then resend the conversation, as OpenAI's own expiry asks of it anyway.

Bounded: at most `max_items` responses and `max_bytes` of them per peer, the oldest leave
first, and each expires `ttl_s` after it was stored. A response belongs to the key that made
it (`owner`: a hash of the presented key); another key gets a 404, as for an unknown id. An
admin key may read and delete any (GET|DELETE /v1/responses/{id}), never continue another
key's conversation (`previous_response_id`: the owner's only). Peers' `/internal/` calls are
signed (peer/auth.py refuses any other), and the peer the client called checks the owner.
"""

from __future__ import annotations

import collections
import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from aivailable.access.policy import presented_key

INTERNAL_PATH = "/internal/responses/{id}"


@dataclass(frozen=True)
class StoreConfig:
    max_items: int = 10_000  # responses kept per peer; a class of 100 keeps 100 turns each
    max_bytes: int = 256 << 20  # of their JSON: bounds the peer's memory whatever they hold
    ttl_s: float = 7 * 86400.0  # a week: a conversation resumed the next day still works
    max_record_bytes: int = 8 << 20  # one transcript: the largest request body (access)


def response_id(node: str, random_hex: str) -> str:
    return f"resp_{node.encode().hex()}_{random_hex}"


def node_of(rid: str) -> str | None:
    """The node that stored `rid`, or None when it is no id of ours."""
    if not rid.startswith("resp_") or len(rid) > 300:
        return None
    node_hex, sep, rest = rid[5:].partition("_")
    if not sep or not rest:
        return None
    try:
        return bytes.fromhex(node_hex).decode()
    except (ValueError, UnicodeDecodeError):
        return None


def owner_of(headers: Mapping[str, str]) -> str:
    """Whose a response is: a hash of the presented key ('' without one, auth off). The host
    of a forwarded request sees the same key, as the forwarder passes it on."""
    key = presented_key(headers)
    return hashlib.sha256(key.encode()).hexdigest()[:32] if key else ""


class ResponseStore:
    """This peer's stored responses: id -> {"owner", "response", "items"}."""

    def __init__(self, config: StoreConfig | None = None, clock: Callable[[], float] = time.time):
        self.config = config or StoreConfig()
        self._clock = clock
        self._records: collections.OrderedDict[str, tuple[float, int, dict]] = (
            collections.OrderedDict()
        )
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._records)

    def put(self, rid: str, record: dict) -> bool:
        """Keeps `record`; False when it alone is over the bound (it is not kept)."""
        size = len(json.dumps(record, separators=(",", ":")))
        if size > self.config.max_record_bytes:
            return False
        self.delete(rid)
        self._records[rid] = (self._clock() + self.config.ttl_s, size, record)
        self._bytes += size
        self._evict()
        return True

    def get(self, rid: str) -> dict | None:
        entry = self._records.get(rid)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            self.delete(rid)
            return None
        return entry[2]

    def delete(self, rid: str) -> bool:
        entry = self._records.pop(rid, None)
        if entry is None:
            return False
        self._bytes -= entry[1]
        return True

    def _evict(self) -> None:
        now = self._clock()
        while self._records and (
            len(self._records) > self.config.max_items
            or self._bytes > self.config.max_bytes
            or next(iter(self._records.values()))[0] <= now
        ):
            self.delete(next(iter(self._records)))


class PeerResponses:
    """Reads and deletes a response stored on another peer, over the signed peer session."""

    def __init__(self, session: Any, addresses: Callable[[], Mapping[str, str]]):
        self._session = session
        self._addresses = addresses

    async def call(self, method: str, node: str, rid: str) -> dict | None:
        """The record (GET) or {"deleted": True} (DELETE); None when that peer does not have
        it or cannot be reached (its responses went with it)."""
        addr = self._addresses().get(node)
        if addr is None:
            return None
        url = f"http://{addr}{INTERNAL_PATH.format(id=rid)}"
        try:
            async with self._session.request(method, url) as resp:
                if resp.status != 200:
                    return None
                return await resp.json()
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            return None  # a peer that is gone took its responses with it
