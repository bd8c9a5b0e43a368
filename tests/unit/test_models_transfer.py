"""Model files between peers: the endpoint, the checked atomic copy, and the fetch order."""

import asyncio
import hashlib
import os
import struct
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from aivailable.cluster.state import ModelRecord
from aivailable.models import store
from aivailable.models.transfer import (
    LocalModels,
    ModelFetcher,
    ModelTransferApi,
    TransferError,
    fetch_from_peer,
)


def tiny_gguf(path: Path, body: bytes) -> tuple[str, int]:
    """A GGUF file the store accepts (no tensors), with `body` making its checksum unique."""
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 0) + b"\0" * 8 + body
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest(), len(data)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*.part")) if directory.exists() else []


class Peer:
    """A peer's LocalModels served over HTTP on loopback."""

    def __init__(self, root: Path, name: str):
        self.local = LocalModels(root / name / "cache")
        self.root = root / name
        self.server: TestServer | None = None

    async def __aenter__(self):
        app = web.Application()
        app.add_routes(ModelTransferApi(self.local).routes())
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        return self

    async def __aexit__(self, *exc):
        await self.server.close()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def hold(self, filename: str, body: bytes, source: str | None = None) -> tuple[str, int, Path]:
        path = self.root / "files" / filename
        sha, size = tiny_gguf(path, body)
        self.local.add(sha, size, source or str(path), path)
        return sha, size, path


async def test_the_endpoint_streams_a_held_file_and_refuses_others(tmp_path):
    async with Peer(tmp_path, "a") as a, aiohttp.ClientSession() as s:
        sha, size, path = a.hold("m.gguf", b"x" * 5000)
        async with s.get(f"http://{a.addr}/internal/models/{sha}") as r:
            assert r.status == 200 and await r.read() == path.read_bytes()
        async with s.get(f"http://{a.addr}/internal/models/{'0' * 64}") as r:
            assert r.status == 404
        async with s.get(f"http://{a.addr}/internal/models/not-a-checksum") as r:
            assert r.status == 400
        path.unlink()  # deleted behind our back: no longer offered
        async with s.get(f"http://{a.addr}/internal/models/{sha}") as r:
            assert r.status == 404
        assert a.local.files() == []


async def test_fetch_from_peer_copies_and_verifies(tmp_path):
    async with Peer(tmp_path, "a") as a, aiohttp.ClientSession() as s:
        sha, size, path = a.hold("m.gguf", os.urandom(3 << 20))
        dest = tmp_path / "b" / "models" / "m.gguf"
        assert await fetch_from_peer(s, a.addr, sha, dest) == size
        assert dest.read_bytes() == path.read_bytes()
        assert leftovers(dest.parent) == []


async def test_a_checksum_mismatch_leaves_nothing_behind(tmp_path):
    async with Peer(tmp_path, "a") as a, aiohttp.ClientSession() as s:
        sha, size, path = a.hold("m.gguf", b"the real bytes")
        tiny_gguf(path, b"bytes that rotted on disk!")  # same size class, other content
        a.local.add(sha, path.stat().st_size, "x", path)  # the index still claims the old sum
        dest = tmp_path / "b" / "models" / "m.gguf"
        with pytest.raises(TransferError, match="checksum mismatch"):
            await fetch_from_peer(s, a.addr, sha, dest)
        assert not dest.exists() and leftovers(dest.parent) == []


async def test_missing_unreachable_and_cut_short_are_transfer_errors(tmp_path):
    async def cut_short(request):
        resp = web.StreamResponse(headers={"Content-Length": "100000"})
        await resp.prepare(request)
        await resp.write(b"x" * 1000)
        request.transport.close()
        return resp

    app = web.Application()
    app.add_routes([web.get("/internal/models/{sha256}", cut_short)])
    async with (
        Peer(tmp_path, "a") as a,
        TestServer(app, host="127.0.0.1") as broken,
        aiohttp.ClientSession() as s,
    ):
        dest = tmp_path / "b" / "m.gguf"
        with pytest.raises(TransferError, match="404"):
            await fetch_from_peer(s, a.addr, "1" * 64, dest)
        with pytest.raises(TransferError):
            await fetch_from_peer(s, f"127.0.0.1:{broken.port}", "1" * 64, dest)
        port = broken.port
    async with aiohttp.ClientSession() as s:
        with pytest.raises(TransferError):
            await fetch_from_peer(s, f"127.0.0.1:{port}", "1" * 64, dest)  # nobody listens now
    assert not dest.exists() and leftovers(dest.parent) == []


async def test_ensure_prefers_a_held_file_then_a_peer_then_the_source(tmp_path, caplog):
    async with Peer(tmp_path, "a") as a, Peer(tmp_path, "bad") as bad, aiohttp.ClientSession() as s:
        sha, size, src_path = a.hold("m.gguf", b"model bytes" * 100, source="/elsewhere/m.gguf")
        # "bad" claims to hold it but serves other bytes: skipped after the checksum check.
        _, _, bad_path = bad.hold("m.gguf", b"model bytes" * 100)
        tiny_gguf(bad_path, b"other bytes" * 100)
        bad.local.add(sha, bad_path.stat().st_size, "/elsewhere/m.gguf", bad_path)
        peers = [("bad", bad.addr, [sha]), ("a", a.addr, [sha]), ("c", "127.0.0.1:1", ["f" * 64])]
        b = LocalModels(tmp_path / "b" / "cache")
        fetcher = ModelFetcher(b, s, lambda: peers)
        record = ModelRecord("m", "/elsewhere/m.gguf", sha256=sha)
        path = await fetcher.ensure(record)
        assert path.read_bytes() == src_path.read_bytes() and path.parent == b.cache_dir / "models"
        assert any(
            "from bad failed" in r.getMessage() and "checksum" in r.getMessage()
            for r in caplog.records
        )
        # Now held: found by checksum and by source (the resolver Instances uses).
        assert b.files() == [(sha, size, "/elsewhere/m.gguf")]
        assert b.resolve("/elsewhere/m.gguf") == path == b.local_path(record)
        peers.clear()
        assert await fetcher.ensure(record) == path


async def test_ensure_uses_the_local_source_unless_its_checksum_differs(tmp_path):
    async with Peer(tmp_path, "a") as a, aiohttp.ClientSession() as s:
        local_file = tmp_path / "b" / "files" / "m.gguf"
        here_sha, _ = tiny_gguf(local_file, b"version 1")
        b = LocalModels(tmp_path / "b" / "cache")
        fetcher = ModelFetcher(b, s, lambda: [])
        assert await fetcher.ensure(ModelRecord("m", str(local_file))) == local_file.resolve()
        assert (
            b.local_path(ModelRecord("m", str(local_file), sha256=here_sha)) == local_file.resolve()
        )
        # The cluster deployed version 2 of that path; a peer has it.
        deployed_sha, _, _ = a.hold("m2.gguf", b"version 2", source=str(local_file))
        peers = [("a", a.addr, [deployed_sha])]
        fetcher = ModelFetcher(b, s, lambda: peers)
        path = await fetcher.ensure(ModelRecord("m", str(local_file), sha256=deployed_sha))
        assert hashlib.sha256(path.read_bytes()).hexdigest() == deployed_sha
        # Nobody has it and the source is the wrong version: a clear error.
        peers.clear()
        with pytest.raises(TransferError, match="deployed file"):
            await fetcher.ensure(ModelRecord("m", str(local_file), sha256="e" * 64))


async def test_ensure_without_peers_or_source_raises(tmp_path):
    async with aiohttp.ClientSession() as s:
        fetcher = ModelFetcher(LocalModels(tmp_path), s, lambda: [])
        with pytest.raises(store.ModelSourceError):
            await fetcher.ensure(ModelRecord("m", str(tmp_path / "missing.gguf")))


async def test_concurrent_ensures_of_one_model_fetch_it_once(tmp_path):
    async with Peer(tmp_path, "a") as a, aiohttp.ClientSession() as s:
        sha, _, _ = a.hold("m.gguf", os.urandom(1 << 20), source="/x/m.gguf")
        calls = []

        def peers():
            calls.append(1)
            return [("a", a.addr, [sha])]

        fetcher = ModelFetcher(LocalModels(tmp_path / "b"), s, peers)
        record = ModelRecord("m", "/x/m.gguf", sha256=sha)
        paths = await asyncio.gather(*(fetcher.ensure(record) for _ in range(3)))
        assert len(set(paths)) == 1 and len(calls) == 1


async def test_the_embedded_model_copied_from_a_peer_is_found_by_the_store(
    tmp_path, embedded_model
):
    builtin = store.BUILTINS["smollm2-135m"]
    async with Peer(tmp_path, "a") as a, aiohttp.ClientSession() as s:
        held = await asyncio.to_thread(a.local.resolve_with_store, str(embedded_model))
        assert held.sha256 == builtin.sha256
        b = LocalModels(tmp_path / "b")
        fetcher = ModelFetcher(b, s, lambda: [("a", a.addr, [held.sha256])])
        path = await fetcher.ensure(ModelRecord("smollm2-135m", "builtin:smollm2-135m"))
        # It lands where the store keeps the built-in, so the store resolves it offline.
        assert path == b.cache_dir / "models" / Path(builtin.member).name
        resolved = await asyncio.to_thread(store.resolve, "builtin:smollm2-135m", b.cache_dir)
        assert resolved.path == path and resolved.sha256 == builtin.sha256


async def test_discover_offers_local_sources_whose_checksum_nobody_knows(tmp_path):
    good = tmp_path / "files" / "good.gguf"
    sha, size = tiny_gguf(good, b"weights")
    bad = tmp_path / "files" / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    local = LocalModels(tmp_path / "cache")
    async with aiohttp.ClientSession() as s:
        fetcher = ModelFetcher(local, s, lambda: [])
        records = [
            ModelRecord("good", str(good)),
            ModelRecord("bad", str(bad)),
            ModelRecord("elsewhere", str(tmp_path / "missing.gguf")),
            ModelRecord("known", str(good), sha256="c" * 64),  # the cluster knows it: skipped
        ]
        await fetcher.discover(records)
        assert local.files() == [(sha, size, str(good))]
        await fetcher.discover(records)  # nothing new, and the bad file is not re-read
        assert local.files() == [(sha, size, str(good))]
