"""An IMITATION of Hugging Face's file endpoints, on 127.0.0.1, for tests (no internet here).

It answers what huggingface_hub (which the store speaks through) asks the real one, the way
the real one answers:
- `HEAD|GET /{org}/{repo}/resolve/{rev}/{path}`: 302 to a CDN URL on another host name
  (`localhost`, the same server), with `X-Repo-Commit`, `X-Linked-Etag: "<sha256>"`,
  `X-Linked-Size` and the git blob's `ETag`; 401 (`X-Error-Code: GatedRepo` or
  `RepoNotFound`) for a gated repo without the right token, 404 (`EntryNotFound`) for a
  missing file.
- `GET /api/models/{org}/{repo}/revision/{rev}?blobs=true`: the repo's info, its files
  (`siblings`) with `lfs.sha256` and `lfs.size` (what HfApi.model_info reads).
- `GET /api/models/{org}/{repo}/tree/{rev}?recursive=true`: the file list with `lfs.oid`
  and `lfs.size`, a few files a page with an absolute `Link: <...>; rel="next"` header.
- `GET /cdn/{sha256}`: the bytes, honouring `Range: bytes=N-` with a 206; `cut_next` makes
  the next answers stop after that many bytes and drop the connection.
Everything it received is in `requests`, so a test can check what was asked and sent.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.test_utils import TestServer


@dataclass
class Repo:
    files: dict[str, bytes]
    gated: bool = False
    lie_sha256: dict[str, str] = field(default_factory=dict)  # path -> a wrong checksum


COMMIT = "5a6f0e1c2b3d4e5f60718293a4b5c6d7e8f90a1b"  # the one commit every repo here is at


@functools.lru_cache(maxsize=64)
def sha256_of(data: bytes) -> str:
    """Remembered: a real model's bytes are hashed once, not on every request."""
    return hashlib.sha256(data).hexdigest()


@dataclass
class Seen:
    method: str
    path: str
    range: str | None
    authorization: str | None
    host: str


class ImitationHub:
    def __init__(self, token: str = "hf_right_token", page_size: int = 2):
        self.repos: dict[str, Repo] = {}
        self.token = token
        self.page_size = page_size
        self.cut_next: list[int] = []  # byte counts: each CDN answer takes the first one
        self.ignore_range = False  # answer 200 with the whole file, as some servers do
        self.requests: list[Seen] = []
        self.server: TestServer | None = None

    async def __aenter__(self) -> ImitationHub:
        app = web.Application()
        app.add_routes(
            [
                web.get("/api/models/{org}/{repo}/tree/{rev}", self.tree),
                web.get("/api/models/{org}/{repo}/revision/{rev}", self.info),
                web.get("/cdn/{sha}", self.cdn),
                web.get("/cdn/{sha}/{name}", self.cdn),  # a plain web server's file URL
                web.get("/{org}/{repo}/resolve/{rev}/{path:.+}", self.resolve),
            ]
        )
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.server.close()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def served(self, path_prefix: str) -> list[Seen]:
        return [r for r in self.requests if r.path.startswith(path_prefix)]

    def _seen(self, request: web.Request) -> None:
        self.requests.append(
            Seen(
                request.method,
                request.path_qs,
                request.headers.get("Range"),
                request.headers.get("Authorization"),
                request.host,
            )
        )

    def _repo(self, request: web.Request) -> Repo:
        repo = self.repos.get(f"{request.match_info['org']}/{request.match_info['repo']}")
        if repo is None or (
            repo.gated and request.headers.get("Authorization") != f"Bearer {self.token}"
        ):
            # The real one says 401 for a missing repo too, so as not to reveal private ones.
            raise web.HTTPUnauthorized(
                headers={"X-Error-Code": "GatedRepo" if repo else "RepoNotFound"}
            )
        return repo

    async def resolve(self, request: web.Request) -> web.Response:
        self._seen(request)
        repo = self._repo(request)
        path = request.match_info["path"]
        if path not in repo.files:
            raise web.HTTPNotFound(
                headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}
            )
        data = repo.files[path]
        sha = sha256_of(data)
        claimed = repo.lie_sha256.get(path, sha)
        raise web.HTTPFound(
            f"http://localhost:{self.server.port}/cdn/{sha}",
            headers={
                "X-Repo-Commit": COMMIT,
                "X-Linked-Etag": f'"{claimed}"',
                "X-Linked-Size": str(len(data)),
                "ETag": '"0123456789abcdef0123456789abcdef01234567"',  # a git sha1
            },
        )

    async def info(self, request: web.Request) -> web.Response:
        self._seen(request)
        repo = self._repo(request)
        blobs = request.query.get("blobs", "").lower() == "true"
        siblings = []
        for path, data in sorted(repo.files.items()):
            entry: dict = {"rfilename": path}
            if blobs:
                sha = repo.lie_sha256.get(path, sha256_of(data))
                entry |= {
                    "size": len(data),
                    "blobId": "0123456789abcdef0123456789abcdef01234567",
                    "lfs": {"sha256": sha, "size": len(data), "pointerSize": 134},
                }
            siblings.append(entry)
        name = f"{request.match_info['org']}/{request.match_info['repo']}"
        return web.json_response({"id": name, "sha": COMMIT, "siblings": siblings})

    async def tree(self, request: web.Request) -> web.Response:
        self._seen(request)
        repo = self._repo(request)
        entries = []
        for path, data in sorted(repo.files.items()):
            sha = repo.lie_sha256.get(path, sha256_of(data))
            entries.append(
                {
                    "type": "file",
                    "oid": "0123456789abcdef0123456789abcdef01234567",
                    "size": len(data),
                    "path": path,
                    "lfs": {"oid": sha, "size": len(data), "pointerSize": 134},
                }
            )
        start = int(request.query.get("cursor", "0"))
        page = entries[start : start + self.page_size]
        headers = {}
        if start + self.page_size < len(entries):
            nxt = request.url.update_query(cursor=str(start + self.page_size))
            headers["Link"] = f'<{nxt}>; rel="next"'
        return web.json_response(page, headers=headers)

    async def cdn(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        data = next(
            (
                d
                for repo in self.repos.values()
                for d in repo.files.values()
                if sha256_of(d) == request.match_info["sha"]
            ),
            None,
        )
        if data is None:
            raise web.HTTPNotFound()
        start, status, headers = 0, 200, {}
        if request.http_range.start is not None and not self.ignore_range:
            start = request.http_range.start
            if start >= len(data):
                raise web.HTTPRequestRangeNotSatisfiable(
                    headers={"Content-Range": f"bytes */{len(data)}"}
                )
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        headers["Content-Length"] = str(len(body))
        headers["Accept-Ranges"] = "bytes"
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        if self.cut_next:
            await response.write(body[: self.cut_next.pop(0)])
            request.transport.close()  # the connection drops mid-body
            return response
        await response.write(body)
        await response.write_eof()
        return response
