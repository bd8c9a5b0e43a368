"""Model files between peers: a peer that lacks a model's file copies it from a peer that has
it (over the LAN, checked against its sha256), else gets it from its source (the store).

- `LocalModels`: the files this peer holds, by checksum and by source; its `resolve(source)`
  is the resolver to give `Instances`, so a file copied from a peer is found by its source.
- `ModelTransferApi(local).routes()`: `GET /internal/models/{sha256}` streams a held file.
- `fetch_from_peer(session, addr, sha256, dest)`: download, verify, write atomically.
- `ModelFetcher.ensure(record)`: local copy, else a peer's, else the source.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiohttp
from aiohttp import web

from aivailable.models import sources, store

log = logging.getLogger(__name__)

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20
MIB = 1 << 20


class TransferError(Exception):
    """A copy from a peer failed: unreachable, refused, cut short or the wrong bytes."""


class Wanted(Protocol):
    """What this module needs of a deployed model (cluster.state.ModelRecord has it): the
    models floor never imports the cluster's state."""

    @property
    def name(self) -> str: ...

    @property
    def source(self) -> str: ...

    @property
    def sha256(self) -> str | None: ...  # recorded at deploy; None when not known yet


def expected_sha256(record: Wanted) -> str | None:
    """The checksum the file must have: recorded in the cluster state, or a built-in's."""
    builtin = store.builtin(record.source)
    return record.sha256 or (builtin.sha256 if builtin is not None else None)


@dataclass(frozen=True)
class Held:
    sha256: str
    size: int
    source: str
    path: Path


class LocalModels:
    """The model files this peer holds. Thread-safe: Instances resolves in a worker thread."""

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else store.default_cache_dir()
        self._lock = threading.Lock()
        self._by_sha: dict[str, Held] = {}
        self._by_source: dict[str, Held] = {}

    def add(self, sha256: str, size: int, source: str, path: Path) -> Held:
        held = Held(sha256, size, source, Path(path))
        with self._lock:
            self._by_sha[sha256] = held
            self._by_source[source] = held
        return held

    def _valid(self, held: Held | None) -> Held | None:
        """The entry if its file is still there at its size (someone may have deleted it)."""
        try:
            if held is not None and held.path.stat().st_size == held.size:
                return held
        except OSError:
            pass
        return None

    def by_sha(self, sha256: str) -> Held | None:
        with self._lock:
            held = self._by_sha.get(sha256)
        return self._valid(held)

    def by_source(self, source: str) -> Held | None:
        with self._lock:
            held = self._by_source.get(source)
        return self._valid(held)

    def local_path(self, record: Wanted) -> Path | None:
        """The file of `record` if held here (the controller reads its GGUF header)."""
        sha = expected_sha256(record)
        held = self.by_sha(sha) if sha else self.by_source(record.source)
        return held.path if held is not None else None

    def files(self) -> list[tuple[str, int, str]]:
        """(sha256, size, source) of every file held: gossiped so peers know whom to ask."""
        with self._lock:
            entries = sorted(self._by_sha.values(), key=lambda h: h.sha256)
        return [(h.sha256, h.size, h.source) for h in entries if self._valid(h)]

    def dest_for(self, record: Wanted, sha256: str) -> Path:
        """Where a copy from a peer goes: a built-in where the store keeps it (so the store
        finds it later without a download), anything else under its checksum."""
        builtin = store.builtin(record.source)
        name = Path(builtin.member).name if builtin is not None else f"{sha256}.gguf"
        return self.cache_dir / "models" / name

    def held_locally(self, source: str) -> bool:
        """Whether the store can resolve `source` without a download."""
        builtin = store.builtin(source)
        if builtin is not None:
            return (self.cache_dir / "models" / Path(builtin.member).name).is_file()
        if source.startswith(store.BUILTIN_PREFIX):
            return False
        if sources.is_remote(source):  # downloaded before, into the cache
            return store.cached(source, self.cache_dir) is not None
        return Path(source).expanduser().is_file()

    def resolve(self, source: str) -> Path:
        """Blocking (run it in a thread): the resolver for Instances."""
        held = self.by_source(source)
        if held is not None:
            return held.path
        return self.resolve_with_store(source).path

    def resolve_with_store(self, source: str) -> Held:
        """Blocking: the store verifies (and for a built-in may download) the file."""
        mf = store.resolve(source, self.cache_dir)
        return self.add(mf.sha256, mf.size, source, mf.path)


class ModelTransferApi:
    def __init__(self, local: LocalModels):
        self._local = local

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/internal/models/{sha256}", self.serve)]

    async def serve(self, request: web.Request) -> web.StreamResponse:
        sha = request.match_info["sha256"]
        if not SHA256_HEX.match(sha):
            return web.Response(status=400, text="expected a lowercase hex sha256")
        held = self._local.by_sha(sha)
        if held is None:  # answered, not raised: this floor raises only its own errors
            return web.Response(status=404, text=f"no model file with sha256 {sha} here")
        return web.FileResponse(
            held.path,
            chunk_size=CHUNK,
            headers={"Content-Type": "application/octet-stream", "X-Sha256": held.sha256},
        )


async def fetch_from_peer(
    session: aiohttp.ClientSession,
    addr: str,
    sha256: str,
    dest: Path,
    *,
    log_every_s: float = 2.0,
    read_timeout_s: float = 30.0,
) -> int:
    """Copy the file with checksum `sha256` from the peer at `addr` ("host:port") to `dest`.

    Written to a temp file beside `dest`, checked, fsynced and renamed: `dest` appears whole
    or not at all. Returns the size; raises TransferError (nothing left behind) otherwise.
    """
    url = f"http://{addr}/internal/models/{sha256}"
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=read_timeout_s)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    digest, done = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out:
            async with session.get(url, timeout=timeout) as resp:
                if resp.status != 200:
                    raise TransferError(f"{addr} answered {resp.status} for {sha256[:12]}")
                total = resp.content_length
                started = last_log = time.monotonic()
                async for chunk in resp.content.iter_chunked(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    done += len(chunk)
                    now = time.monotonic()
                    if now - last_log >= log_every_s:
                        last_log = now
                        log.info(
                            "fetching %s from %s: %d/%s MiB (%.0f MiB/s)",
                            sha256[:12],
                            addr,
                            done // MIB,
                            total // MIB if total else "?",
                            done / MIB / max(now - started, 1e-6),
                        )
            if total is not None and done != total:
                raise TransferError(f"{addr} sent {done} of {total} bytes")
            if digest.hexdigest() != sha256:
                raise TransferError(
                    f"checksum mismatch from {addr}: got {digest.hexdigest()}, expected {sha256}"
                )
            out.flush()
            await asyncio.to_thread(os.fsync, out.fileno())
        os.replace(tmp_name, dest)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        if isinstance(exc, aiohttp.ClientError | asyncio.TimeoutError):
            raise TransferError(f"cannot fetch {sha256[:12]} from {addr}: {exc!r}") from exc
        raise
    log.info("fetched %s (%d MiB) from %s", sha256[:12], done // MIB, addr)
    return done


# (node id, "host:port", sha256s it holds) for every alive peer but this one.
PeerFiles = Callable[[], Iterable[tuple[str, str, Iterable[str]]]]


class ModelFetcher:
    """Makes a model's file local. `session` is the peer's signed ClientSession."""

    def __init__(self, local: LocalModels, session: aiohttp.ClientSession, peers: PeerFiles):
        self.local = local
        self._session = session
        self._peers = peers
        self._locks: dict[str, asyncio.Lock] = {}
        self._unusable: set[str] = set()  # local sources that failed the store's checks

    async def ensure(self, record: Wanted) -> Path:
        """The local path of `record`'s file: held already; else the local source when it
        is here and matches; else copied from a peer that has it; else from the source.
        Raises (store.ModelSourceError or TransferError) when none works."""
        async with self._locks.setdefault(record.source, asyncio.Lock()):
            return await self._ensure(record)

    async def _ensure(self, record: Wanted) -> Path:
        sha = expected_sha256(record)
        held = self.local.by_sha(sha) if sha else self.local.by_source(record.source)
        if held is not None:
            return held.path
        if self.local.held_locally(record.source):
            held = await asyncio.to_thread(self.local.resolve_with_store, record.source)
            if sha is None or held.sha256 == sha:
                return held.path
            log.warning(
                "%s here is not the deployed file (sha256 %s, want %s): asking peers",
                record.source,
                held.sha256[:12],
                sha[:12],
            )
        if sha is not None:
            dest = self.local.dest_for(record, sha)
            for node, addr, shas in self._peers():
                if sha not in set(shas):
                    continue
                try:
                    size = await fetch_from_peer(self._session, addr, sha, dest)
                except TransferError as exc:
                    log.warning("copy of %s from %s failed: %s", record.name, node, exc)
                    continue
                return self.local.add(sha, size, record.source, dest).path
        held = await asyncio.to_thread(self.local.resolve_with_store, record.source)
        if sha is not None and held.sha256 != sha:
            raise TransferError(
                f"{record.source} has sha256 {held.sha256}, but the deployed file is {sha}"
            )
        return held.path

    async def discover(self, records: Iterable[Wanted]) -> None:
        """Check the local sources of models whose checksum the cluster does not know yet
        (a GGUF path deployed through a peer that lacks it): once held, the file is gossiped,
        the leader records its checksum, and the node it is placed on can copy it from here."""
        for record in records:
            source = record.source
            if record.sha256 is not None or source in self._unusable:
                continue
            if self.local.by_source(source) is not None or not self.local.held_locally(source):
                continue
            async with self._locks.setdefault(source, asyncio.Lock()):
                try:
                    held = await asyncio.to_thread(self.local.resolve_with_store, source)
                except Exception as exc:  # unusable or gone meanwhile: never the peer's end
                    log.warning("local copy of %s is unusable: %s", source, exc)
                    self._unusable.add(source)
                    continue
            log.info("holding %s (sha256 %s) for the cluster", source, held.sha256[:12])
