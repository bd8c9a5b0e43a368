"""Remote model files: Hugging Face through huggingface_hub, and plain web servers.

Blocking (the store runs in a worker thread, the CLI has no event loop). What huggingface_hub
does, it does here:

- `HfApi.model_info(files_metadata=True)` lists a repo's files with `lfs.sha256` and
  `lfs.size` (GET /api/models/{repo}/revision/{rev}?blobs=true) so that `hf://ORG/REPO:QUANT`
  can pick its file (sources.pick_gguf). Not `list_repo_tree`: its pages go through
  huggingface_hub's backoff, which retries a refused connection for about 23 s (1+2+4+8+8,
  no knob), and a deploy request would wait that long before it goes on without a checksum;
  model_info is one request under our timeout;
- `get_hf_file_metadata` HEADs a named file (its SHA-256 is the `X-Linked-Etag` of an LFS
  file, its size `X-Linked-Size`; the CDN redirect is not followed with the token);
- `huggingface_hub.file_download.http_get` moves the bytes, for `https://` sources too: Range
  requests, retries after a cut connection, a restart when a server ignores the Range, and
  progress through its `tqdm_class` hook (which also feeds our rich bar and the registry);
- its errors (gated, missing repo, file or revision) become ModelSourceError here.

`HF_ENDPOINT`, `HF_TOKEN` (or the token `hf auth login` saved) and `HF_HUB_OFFLINE` are
read by HubSettings.from_env on every call and handed to huggingface_hub explicitly (its own
constants are read once at import, too early for a peer's `offline` setting or a test's
imitation server).

Why `download()` wraps http_get instead of calling hf_hub_download (measured with
huggingface_hub 2.5 against tests/unit/hf_imitation.py, pinned by
tests/unit/test_models_hub.py::test_what_hf_hub_download_alone_would_do):
- hf_hub_download deletes its partial file when a download fails (its process-unique temp
  file), so a cut that outlasts its retries, a peer restart or our cancel at shutdown starts
  a multi-GB model over; we keep `FILE.<sha256[:16]>.part` and resume it with `resume_size`;
- it checks the size only: a file whose bytes differ from the published SHA-256 is kept and
  served; we hash while writing and refuse (and delete) a mismatch;
- it has no way to stop a download but raising from its progress bar, which loses the part.
Its fcntl lock file stays ours too, so two peers on one machine download a file once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx2  # huggingface_hub's HTTP client: its transport errors
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import (
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import http_get
from huggingface_hub.utils import build_hf_headers

from aivailable.models.sources import ModelSourceError
from placement.gguf_header import GgufFormatError, read_header

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
CHUNK = 1 << 20  # bytes per read when hashing a part file already on disk
LOG_EVERY_S = 10.0  # a progress line in the peer's log this often during a download
USER_AGENT = "aivailable"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FORCED_OFFLINE = False
_TRANSPORT_ERRORS = (httpx2.TransportError, OfflineModeIsEnabled)

# (bytes done, bytes in all or None) after every chunk; raising from it stops the download
# and leaves the part file for the next try to resume.
Progress = Callable[[int, int | None], None]


class Unreachable(ModelSourceError):
    """The server could not be reached or kept failing: a cached copy may still serve."""


def force_offline(offline: bool = True) -> None:
    """Process-wide offline mode (the peer's `offline` config), on top of HF_HUB_OFFLINE."""
    global _FORCED_OFFLINE
    _FORCED_OFFLINE = offline


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class HubSettings:
    endpoint: str = DEFAULT_ENDPOINT  # HF_ENDPOINT: a mirror, or a test's imitation server
    token: str | None = None  # HF_TOKEN: for gated and private repos
    offline: bool = False  # HF_HUB_OFFLINE / AIVAILABLE_OFFLINE: only the cache, no network
    timeout_s: float = 10.0  # a metadata request (HEAD, listing page); http_get has its own

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> HubSettings:
        env = os.environ if environ is None else environ
        token = env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN") or _token_file(env)
        return cls(
            endpoint=(env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/"),
            token=token.strip() or None if token else None,
            offline=_FORCED_OFFLINE
            or _truthy(env.get("HF_HUB_OFFLINE"))
            or _truthy(env.get("AIVAILABLE_OFFLINE")),
        )

    def api(self) -> HfApi:
        # token=False, not None: None would make huggingface_hub look for one of its own.
        return HfApi(endpoint=self.endpoint, token=self.token or False, library_name=USER_AGENT)


def _token_file(env: Mapping[str, str]) -> str | None:
    """The token `hf auth login` saved, so a logged-in user needs no HF_TOKEN (read here,
    not by huggingface_hub, so that a passed `environ` is the whole truth)."""
    home = env.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    path = env.get("HF_TOKEN_PATH") or os.path.join(home, "token")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(4096)
    except (OSError, UnicodeDecodeError):
        return None


@dataclass(frozen=True)
class Remote:
    """A file to download and what its bytes must be."""

    url: str
    label: str  # for messages and progress: "ORG/REPO/FILE" or the URL, never a local path
    sha256: str | None  # lower-case hex; None when the server gives none (a plain URL)
    size: int | None
    repo: str | None = None  # ORG/REPO of a Hugging Face file: its token errors name it


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


def _headers(settings: HubSettings, url: str) -> dict[str, str]:
    """The token goes to the endpoint's own scheme, host and port only, never to a CDN."""
    token = settings.token if _origin(url) == _origin(settings.endpoint) else None
    return build_hf_headers(token=token or False, library_name=USER_AGENT)


def _refusal(exc: Exception, what: str, repo: str | None, settings: HubSettings) -> Exception:
    """A clear error for what huggingface_hub raised; the token itself never appears in it."""
    if isinstance(exc, _TRANSPORT_ERRORS):
        return Unreachable(f"cannot reach {settings.endpoint}: {exc!r}")
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if repo is not None and (status in (401, 403) or isinstance(exc, RepositoryNotFoundError)):
        if settings.token:
            return ModelSourceError(
                f"{what}: Hugging Face refused the HF_TOKEN given (HTTP {status}); "
                f"the token lacks access to {repo}: accept its terms on its model page "
                "or use a token of an account that has"
            )
        return ModelSourceError(
            f"{what}: {repo} is gated or private, or does not exist (HTTP {status}); "
            "set HF_TOKEN to a Hugging Face access token with access to it"
        )
    if status in (401, 403):
        return ModelSourceError(f"{what}: access refused (HTTP {status})")
    if status == 404 or isinstance(exc, RemoteEntryNotFoundError | RevisionNotFoundError):
        return ModelSourceError(f"{what}: not found (HTTP {status})")
    if status is not None and (status in (408, 429) or status >= 500):
        return Unreachable(f"{what}: the server answered HTTP {status}")
    return ModelSourceError(f"{what}: HTTP {status}")


# ---------------------------------------------------------------- Hugging Face metadata


def resolve_url(settings: HubSettings, repo: str, revision: str, file: str) -> str:
    return hf_hub_url(repo, file, revision=revision, endpoint=settings.endpoint)


def _etag_sha256(value: str | None) -> str | None:
    value = (value or "").strip().removeprefix("W/").strip('"').lower()
    return value if _SHA256.match(value) else None  # a git blob's sha1 is not a checksum


def hf_file(settings: HubSettings, repo: str, revision: str, file: str) -> Remote:
    """The file's SHA-256 and size from a HEAD of its resolve URL (falling back to the
    repo listing); refuses a file Hugging Face gives no SHA-256 for."""
    url = resolve_url(settings, repo, revision, file)
    label = f"{repo}/{file}"
    try:
        meta = get_hf_file_metadata(
            url,
            token=settings.token or False,
            timeout=settings.timeout_s,
            endpoint=settings.endpoint,
            library_name=USER_AGENT,
        )
    except (HfHubHTTPError, *_TRANSPORT_ERRORS) as exc:
        raise _refusal(exc, f"cannot get {label}", repo, settings) from None
    sha256, size = _etag_sha256(meta.etag), meta.size
    if sha256 is None:
        entry = next((e for e in hf_list(settings, repo, revision) if e["path"] == file), None)
        if entry is None or entry["sha256"] is None:
            raise ModelSourceError(f"Hugging Face gives no SHA-256 for {label}: cannot verify it")
        sha256, size = entry["sha256"], entry["size"]
    # The CDN location the HEAD was sent to saves the GET a redirect.
    return Remote(meta.location or url, label, sha256, size, repo)


def hf_list(settings: HubSettings, repo: str, revision: str) -> list[dict]:
    """The repo's files: {"path", "size", "sha256" (None unless LFS)}."""
    try:
        info = settings.api().model_info(
            repo, revision=revision, files_metadata=True, timeout=settings.timeout_s
        )
    except (HfHubHTTPError, *_TRANSPORT_ERRORS) as exc:
        raise _refusal(exc, f"cannot list {repo}", repo, settings) from None
    except (KeyError, TypeError, ValueError) as exc:  # a listing not shaped like Hugging Face's
        raise ModelSourceError(f"the listing of {repo} is malformed: {exc!r}") from None
    files = []
    for entry in info.siblings or ():
        sha = (entry.lfs.sha256 or "").lower() if entry.lfs is not None else ""
        size = entry.lfs.size if entry.lfs is not None else entry.size
        files.append(
            {"path": entry.rfilename, "size": size, "sha256": sha if _SHA256.match(sha) else None}
        )
    return files


# ---------------------------------------------------------------- downloads


class Cancelled(ModelSourceError):
    """The download was stopped (the peer shuts down); its part file stays for a resume."""


class _Tracked:
    """One download in the registry: its progress, and whether it was cancelled."""

    def __init__(self, registry: Downloads, label: str, file: str):
        self._registry = registry
        self.entry = {"source": label, "file": file, "done": 0, "total": None}

    def update(self, done: int, total: int | None) -> None:
        self.entry["done"], self.entry["total"] = done, total

    def check(self) -> None:
        if self._registry.cancelled(self):
            label, done = self.entry["source"], self.entry["done"]
            raise Cancelled(f"the download of {label} was stopped at byte {done}")


class Downloads:
    """The downloads in progress in this process, for /cluster/status. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: dict[int, dict] = {}
        self._cancelled: set[int] = set()

    @contextlib.contextmanager
    def track(self, label: str, file: str) -> Iterator[_Tracked]:
        tracked = _Tracked(self, label, file)
        with self._lock:
            self._active[id(tracked)] = tracked.entry
        try:
            yield tracked
        finally:
            with self._lock:
                self._active.pop(id(tracked), None)
                self._cancelled.discard(id(tracked))

    def cancelled(self, tracked: _Tracked) -> bool:
        with self._lock:
            return id(tracked) in self._cancelled

    def snapshot(self) -> list[dict]:
        with self._lock:
            return [dict(e) for e in self._active.values()]

    def cancel_all(self) -> None:
        """Stop the downloads in progress at their next chunk, so a peer that shuts down
        does not wait for them in a worker thread (later ones are not affected)."""
        with self._lock:
            self._cancelled.update(self._active)


DOWNLOADS = Downloads()


def download(
    settings: HubSettings, remote: Remote, target: Path, on_progress: Progress | None = None
) -> str:
    """Fetch `remote` into `target`; return its SHA-256 (checked when `remote` has one).

    Bytes land in a `.part` file beside `target` that a later try resumes with an HTTP
    Range request (after a cut connection within this call too); only a complete, checked
    GGUF is renamed to `target`. A lock file keeps two processes off the same part file.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    key = remote.sha256 or hashlib.sha256(remote.url.encode()).hexdigest()
    part = target.with_name(f"{target.name}.{key[:16]}.part")
    with open(target.with_name(target.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        done_meanwhile = _finished_by_another(remote, target)
        if done_meanwhile is not None:
            return done_meanwhile
        for stale in target.parent.glob(f"{target.name}.*.part"):
            if stale != part:  # an older version's bytes: never resumed into this one
                stale.unlink(missing_ok=True)
        log.info("downloading %s (%s bytes)", remote.label, remote.size or "unknown")
        last_log = [time.monotonic()]
        with DOWNLOADS.track(remote.label, target.name) as tracked:

            def report(done: int, total: int | None) -> None:
                tracked.update(done, total)
                if on_progress is not None:
                    on_progress(done, total)
                if time.monotonic() - last_log[0] >= LOG_EVERY_S:
                    last_log[0] = time.monotonic()
                    log.info("downloading %s: %d/%s MiB", remote.label, done >> 20, _mib(total))

            digest, size = _fetch(settings, remote, part, report, tracked.check)
        _check_and_place(remote, part, target, digest, size)
    log.info("downloaded %s (%d MiB, sha256 %s)", remote.label, size >> 20, digest[:12])
    return digest


def _mib(total: int | None) -> str:
    return str(total >> 20) if total is not None else "?"


def _finished_by_another(remote: Remote, target: Path) -> str | None:
    """The checksum of `target` if another process or thread completed this very file while
    we waited for the lock (only a file with a known checksum can be recognised)."""
    if remote.sha256 is None or not target.is_file():
        return None
    if remote.size is not None and target.stat().st_size != remote.size:
        return None
    sha = hashlib.sha256()
    _rehash(target, sha)
    return remote.sha256 if sha.hexdigest() == remote.sha256 else None


def _check_and_place(remote: Remote, part: Path, target: Path, digest: str, size: int) -> None:
    if remote.size is not None and size != remote.size:
        part.unlink(missing_ok=True)
        raise ModelSourceError(f"{remote.label}: got {size} bytes, expected {remote.size}")
    if remote.sha256 is not None and digest != remote.sha256:
        part.unlink(missing_ok=True)
        raise ModelSourceError(
            f"checksum mismatch for {remote.label}: got sha256 {digest}, expected "
            f"{remote.sha256}; the download was deleted"
        )
    try:
        read_header(part)
    except GgufFormatError as exc:
        part.unlink(missing_ok=True)
        raise ModelSourceError(f"{remote.label} is not a usable GGUF file: {exc}") from None
    os.chmod(part, 0o644)
    os.replace(part, target)


def _fetch(
    settings: HubSettings,
    remote: Remote,
    part: Path,
    report: Progress,
    after_write: Callable[[], None],
) -> tuple[str, int]:
    """Append the rest of `remote` to `part` with huggingface_hub's http_get (Range from the
    bytes held, its retries after a cut); return the SHA-256 and size of what `part` holds.
    `after_write` runs after every chunk lands (a cancel raises there, so the part keeps every
    byte counted: http_get reports a chunk before it writes it)."""
    with _Part(part, after_write) as out:
        if remote.size is not None and out.size > remote.size:
            out.seek(0)
            out.truncate()  # longer than the file: not a prefix of it
        held = out.size
        try:
            http_get(
                remote.url,
                out,
                resume_size=held,
                headers=_headers(settings, remote.url),
                expected_size=remote.size,
                displayed_filename=remote.label,
                tqdm_class=_progress_class(report),
            )
        except HfHubHTTPError as exc:
            status = getattr(exc.response, "status_code", None)
            if not (status == 416 and held and remote.size is None):
                raise _refusal(
                    exc, f"cannot download {remote.label}", remote.repo, settings
                ) from None
            # 416 for the bytes past what we hold: the part is the whole file.
        except _TRANSPORT_ERRORS as exc:
            raise Unreachable(
                f"download of {remote.label} failed ({exc!r}); {out.size} bytes are kept and "
                "the next try resumes from there"
            ) from None
        except OSError as exc:  # http_get's size check: the server sent less than it said
            raise Unreachable(
                f"download of {remote.label} ended early ({exc}); {out.size} bytes are kept and "
                "the next try resumes from there"
            ) from None
        return out.sha.hexdigest(), out.size


def _progress_class(report: Progress) -> type:
    """A stand-in for http_get's tqdm_class: counts bytes and calls `report`, which may raise
    to stop the download (the bytes written so far stay in the part file)."""

    class Bar:
        def __init__(self, *, total: int | None = None, initial: int = 0, **_: object):
            self.n, self.total = initial, total

        def __enter__(self) -> Bar:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def update(self, n: int) -> None:
            self.n += n
            report(self.n, self.total)

        def close(self) -> None:
            return None

    return Bar


class _Part:
    """The part file as http_get sees it: appended to and hashed as it is written; when a
    server ignores the Range, http_get seeks back and truncates, and the hash follows."""

    def __init__(self, path: Path, after_write: Callable[[], None] = lambda: None):
        self.path = path
        self._after_write = after_write
        self.sha = hashlib.sha256()
        self.size = _rehash(path, self.sha)
        self._pos = self.size
        try:
            self._file = open(path, "ab")  # noqa: SIM115 (closed by __exit__)
        except OSError as exc:
            raise ModelSourceError(f"cannot write {path.name}: {exc}") from None

    def __enter__(self) -> _Part:
        return self

    def __exit__(self, *exc: object) -> None:
        with self._file:
            self._file.flush()
            os.fsync(self._file.fileno())

    def write(self, chunk: bytes) -> int:
        try:
            self._file.write(chunk)
        except OSError as exc:  # a full disk is not the network's fault: no retry helps
            raise ModelSourceError(f"cannot write {self.path.name}: {exc}") from None
        self.sha.update(chunk)
        self.size += len(chunk)
        self._pos = self.size
        self._after_write()
        return len(chunk)

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = pos if whence == 0 else self.size + pos if whence == 2 else self._pos + pos
        return self._pos

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        self._file.flush()
        self._file.truncate(size)
        self.sha = hashlib.sha256()
        self.size = _rehash(self.path, self.sha)
        self._pos = self.size
        return self.size


def _rehash(part: Path, sha) -> int:
    """Feed the bytes a part file already holds to `sha`; return how many."""
    done = 0
    try:
        with open(part, "rb") as f:
            while chunk := f.read(CHUNK):
                sha.update(chunk)
                done += len(chunk)
    except FileNotFoundError:
        return 0
    return done
