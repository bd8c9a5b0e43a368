"""/cluster/keys for admins, and the first admin key of a new cluster.

A key's secret is made on the peer that creates it, returned once in the answer and never
stored: the Raft log carries only its hash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from aivailable.access.errors import AccessError
from aivailable.access.limits import RateLimiter
from aivailable.cluster.keys import (
    MAX_MODELS_PER_KEY,
    MAX_NAME,
    ROLES,
    AccessCommandError,
    AccessState,
    KeyRecord,
    encode_key_create,
    encode_key_revoke,
    hash_secret,
    new_key_id,
    new_secret,
    parse_expires,
)
from peer.errors import ServiceError

log = logging.getLogger(__name__)
ADMIN_KEY_FILE = "admin.key"
MAX_LIMIT = 1 << 40


def parse_create(body: Any, now_ms: int) -> KeyRecord:
    """A create request {"role", "models"?, "rpm"?, "tpm"?, "expires"?, "name"?} -> the key
    (without its hash). 400 on anything malformed."""
    if not isinstance(body, dict):
        raise AccessError.bad_request("the request body must be a JSON object")
    role = body.get("role", "user")
    if role not in ROLES:
        raise AccessError.bad_request(f"'role' must be one of {', '.join(ROLES)}", "role")
    models = body.get("models") or []
    if isinstance(models, str):
        models = [m.strip() for m in models.split(",") if m.strip()]
    if (
        not isinstance(models, list)
        or len(models) > MAX_MODELS_PER_KEY
        or not all(isinstance(m, str) and 0 < len(m) <= 128 for m in models)
    ):
        raise AccessError.bad_request("'models' must be a list of model names", "models")
    if models and role != "user":
        raise AccessError.bad_request("only user keys are limited to models", "models")
    limits = {}
    for field in ("rpm", "tpm"):
        value = body.get(field) or 0
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < MAX_LIMIT:
            raise AccessError.bad_request(
                f"'{field}' must be a non-negative integer (0: unlimited)", field
            )
        limits[field] = value
    name = body.get("name") or ""
    if not isinstance(name, str) or len(name) > MAX_NAME:
        raise AccessError.bad_request(
            f"'name' must be text of at most {MAX_NAME} characters", "name"
        )
    expires_ms = 0
    if body.get("expires"):
        if not isinstance(body["expires"], str):
            raise AccessError.bad_request(
                "'expires' must be a date or a duration like 30d", "expires"
            )
        try:
            expires_ms = parse_expires(body["expires"], now_ms)
        except AccessCommandError as exc:
            raise AccessError.bad_request(str(exc), "expires") from exc
        if expires_ms <= now_ms:
            raise AccessError.bad_request("'expires' is in the past", "expires")
    return KeyRecord(
        new_key_id(), "", role, name, tuple(models), expires_ms=expires_ms, created_ms=now_ms,
        **limits,
    )  # fmt: skip


class KeysApi:
    """`propose(bytes)` commits a command through Raft (ClusterNode.propose)."""

    def __init__(
        self,
        access: Callable[[], AccessState],
        propose: Callable[[bytes], Awaitable[Any]],
        limiter: RateLimiter,
        clock: Callable[[], float] = time.time,
    ):
        self._access = access
        self._propose = propose
        self._limiter = limiter
        self._clock = clock

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/cluster/keys", self.list),
            web.post("/cluster/keys", self.create),
            web.delete("/cluster/keys/{id}", self.revoke),
        ]

    def listing(self) -> list[dict]:
        now = self._clock()
        out = []
        for record in sorted(self._access().keys.values(), key=lambda r: r.created_ms):
            req, tok = self._limiter.usage(record.id, now)
            out.append({**record.public(), "requests_1m": req, "tokens_1m": tok})
        return out

    async def list(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": self.listing()})

    async def create(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError as exc:
            raise AccessError.bad_request(f"the request body is not valid JSON: {exc}") from exc
        record = parse_create(body, int(self._clock() * 1000))
        secret = new_secret()
        record = KeyRecord(**{**record.__dict__, "hash": hash_secret(secret)})
        await self._propose(encode_key_create(record))
        if record.id not in self._access().keys:
            raise AccessError(500, "the key was not stored; try again", type="server_error")
        # The only time the secret is shown: the cluster keeps its hash alone.
        return web.json_response({**record.public(), "key": secret}, status=201)

    async def revoke(self, request: web.Request) -> web.Response:
        key_id = request.match_info["id"]
        if key_id not in self._access().keys:
            raise AccessError.not_found(
                f"no key with id '{key_id}'", param="id", code="key_not_found"
            )
        await self._propose(encode_key_revoke(key_id))
        return web.json_response({"id": key_id, "revoked": True})


def write_key_file(path: Path, secret: str) -> None:
    """Create `path` holding the secret, readable by its owner only (0600 from the start)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")


async def bootstrap_admin_key(
    path: Path,
    access: Callable[[], AccessState],
    founded: Callable[[], bool],
    propose: Callable[[bytes], Awaitable[Any]],
    announce: Callable[[str], None],
    clock: Callable[[], float] = time.time,
) -> None:
    """Once the cluster exists and this peer leads it (`founded()`), make sure it has a first
    admin key: the one in `path`, created there (0600) if absent. Should two peers try (a
    leader change meanwhile), the first commit wins and the other removes the file it made."""
    while not founded():  # noqa: ASYNC110 - the state is applied by Raft, no event to await
        await asyncio.sleep(0.2)
    if access().bootstrapped:
        return
    created = not await asyncio.to_thread(path.exists)
    if created:
        await asyncio.to_thread(write_key_file, path, new_secret())
    secret = (await asyncio.to_thread(path.read_text)).strip()
    digest = hash_secret(secret)
    record = KeyRecord(
        new_key_id(), digest, "admin", "first admin key", created_ms=int(clock() * 1000)
    )
    while not access().bootstrapped:
        try:
            await propose(encode_key_create(record, bootstrap=True))
            break  # applied: ours, or another peer's first key came first
        except ServiceError as exc:  # no leader yet: keep trying
            log.info("first admin key not committed yet: %s", exc.message)
            await asyncio.sleep(1)
    if digest in access().by_hash:
        announce(
            f"auth is on: the admin key is in {path} (mode 0600); "
            f"use it with: export AIVAILABLE_API_KEY=$(cat {path})"
        )
    elif created:  # another peer's key came first
        with contextlib.suppress(OSError):
            await asyncio.to_thread(path.unlink)
