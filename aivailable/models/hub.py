"""Remote model files over HTTP: Hugging Face's metadata and resumable downloads.

Blocking (the store runs in a worker thread, the CLI has no event loop), on urllib. Hugging
Face is spoken the way its own client (huggingface_hub) speaks it:

- `HEAD {endpoint}/{repo}/resolve/{rev}/{file}`, not following the redirect: an LFS file's
  SHA-256 is its `X-Linked-Etag`, its size `X-Linked-Size`.
- `GET {endpoint}/api/models/{repo}/tree/{rev}?recursive=true` lists the files, each LFS one
  with `lfs.oid` (its SHA-256) and `lfs.size`; pages follow the `Link: rel="next"` header.
- `GET` the resolve URL redirects to a CDN that honours `Range`. The token goes to the
  endpoint's own host only, never to the CDN or any other host.

`HF_ENDPOINT` moves all of it (tests point it at an imitation server on loopback).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import json
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urljoin, urlsplit

from aivailable.models.sources import ModelSourceError
from placement.gguf_header import GgufFormatError, read_header

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
CHUNK = 1 << 20  # bytes per read: bounds the buffer whatever the file's size
MAX_LISTING_BYTES = 16 << 20  # one page of a repo listing; real pages are far smaller
MAX_LISTING_PAGES = 50  # 1000 files a page: more than any model repo holds
MAX_REDIRECTS = 5
LOG_EVERY_S = 10.0  # a progress line in the peer's log this often during a download
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FORCED_OFFLINE = False

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
    timeout_s: float = 30.0  # per connect or read: a stalled transfer is retried, resuming
    retries: int = 5  # tries in a row without a byte of progress before giving up
    retry_delay_s: float = 1.0  # first wait between tries; doubles, at most 30 s

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


def _token_file(env: Mapping[str, str]) -> str | None:
    """The token `huggingface-cli login` saved, so a logged-in user needs no HF_TOKEN."""
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


# ---------------------------------------------------------------- HTTP without surprises


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # a 3xx surfaces as an HTTPError; _open decides where the token goes


_OPENER = urllib.request.build_opener(_NoRedirect)
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, TimeoutError, OSError)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


def _open(
    settings: HubSettings,
    url: str,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    follow: Callable[[urllib.error.HTTPError], bool] = lambda exc: True,
) -> http.client.HTTPResponse:
    """urlopen following at most MAX_REDIRECTS redirects (while `follow` says so) itself, so
    the token only ever goes to the endpoint's own scheme, host and port."""
    for _ in range(MAX_REDIRECTS + 1):
        sent = {"User-Agent": "aivailable", **(headers or {})}
        if settings.token and _origin(url) == _origin(settings.endpoint):
            sent["Authorization"] = f"Bearer {settings.token}"
        request = urllib.request.Request(url, method=method, headers=sent)
        try:
            return _OPENER.open(request, timeout=settings.timeout_s)
        except urllib.error.HTTPError as exc:
            location = exc.headers.get("Location")
            if exc.code not in (301, 302, 303, 307, 308) or not location or not follow(exc):
                raise
            exc.close()
            url = urljoin(url, location)
    raise Unreachable(f"more than {MAX_REDIRECTS} redirects")


def _refusal(exc: urllib.error.HTTPError, what: str, repo: str | None, settings) -> Exception:
    """A clear error for an HTTP refusal; the token itself never appears in it."""
    if exc.code in (401, 403) and repo is not None:
        if settings.token:
            return ModelSourceError(
                f"{what}: Hugging Face refused the HF_TOKEN given (HTTP {exc.code}); "
                f"the token lacks access to {repo}: accept its terms on its model page "
                "or use a token of an account that has"
            )
        return ModelSourceError(
            f"{what}: {repo} is gated or private, or does not exist (HTTP {exc.code}); "
            "set HF_TOKEN to a Hugging Face access token with access to it"
        )
    if exc.code in (401, 403):
        return ModelSourceError(f"{what}: access refused (HTTP {exc.code})")
    if exc.code == 404:
        return ModelSourceError(f"{what}: not found (HTTP 404)")
    if exc.code in (408, 429) or exc.code >= 500:
        return Unreachable(f"{what}: the server answered HTTP {exc.code}")
    return ModelSourceError(f"{what}: HTTP {exc.code} {exc.reason}")


# ---------------------------------------------------------------- Hugging Face metadata


def resolve_url(settings: HubSettings, repo: str, revision: str, file: str) -> str:
    return f"{settings.endpoint}/{repo}/resolve/{quote(revision, safe='')}/{quote(file)}"


def _etag_sha256(value: str | None) -> str | None:
    if not value:
        return None
    value = value.strip().removeprefix("W/").strip('"').lower()
    return value if _SHA256.match(value) else None  # a git blob's sha1 is not a checksum


def hf_file(settings: HubSettings, repo: str, revision: str, file: str) -> Remote:
    """The file's SHA-256 and size from a HEAD of its resolve URL (falling back to the
    repo listing); refuses a file Hugging Face gives no SHA-256 for."""
    url = resolve_url(settings, repo, revision, file)
    label = f"{repo}/{file}"

    def relative_only(exc: urllib.error.HTTPError) -> bool:
        # The CDN redirect of an LFS file carries the metadata; a relative one is a renamed repo.
        return not exc.headers.get("X-Linked-Etag") and "://" not in exc.headers["Location"]

    try:
        resp = _open(settings, url, "HEAD", follow=relative_only)
        headers = resp.headers
        resp.close()
    except urllib.error.HTTPError as exc:
        if exc.code not in (301, 302, 303, 307, 308):
            raise _refusal(exc, f"cannot get {label}", repo, settings) from None
        headers = exc.headers
    except _NETWORK_ERRORS as exc:
        raise Unreachable(f"cannot reach {settings.endpoint}: {exc}") from None
    sha256 = _etag_sha256(headers.get("X-Linked-Etag"))
    size = headers.get("X-Linked-Size") or headers.get("Content-Length")
    if sha256 is None:
        entry = next((e for e in hf_list(settings, repo, revision) if e["path"] == file), None)
        if entry is None or entry["sha256"] is None:
            raise ModelSourceError(f"Hugging Face gives no SHA-256 for {label}: cannot verify it")
        sha256, size = entry["sha256"], entry["size"]
    return Remote(url, label, sha256, int(size) if size is not None else None)


def hf_list(settings: HubSettings, repo: str, revision: str) -> list[dict]:
    """The repo's files: {"path", "size", "sha256" (None unless LFS)}."""
    url = f"{settings.endpoint}/api/models/{repo}/tree/{quote(revision, safe='')}?recursive=true"
    files: list[dict] = []
    for _ in range(MAX_LISTING_PAGES):
        try:
            with _open(settings, url, headers={"Accept": "application/json"}) as resp:
                raw = resp.read(MAX_LISTING_BYTES + 1)
                link = resp.headers.get("Link", "")
        except urllib.error.HTTPError as exc:
            raise _refusal(exc, f"cannot list {repo}", repo, settings) from None
        except _NETWORK_ERRORS as exc:
            raise Unreachable(f"cannot reach {settings.endpoint}: {exc}") from None
        if len(raw) > MAX_LISTING_BYTES:
            raise ModelSourceError(
                f"the listing of {repo} is larger than {MAX_LISTING_BYTES} bytes"
            )
        try:
            page = json.loads(raw)
        except (ValueError, RecursionError):
            raise ModelSourceError(f"the listing of {repo} is not JSON") from None
        if not isinstance(page, list):
            raise ModelSourceError(f"the listing of {repo} is not a list of files")
        for entry in page:
            if not isinstance(entry, dict) or entry.get("type") != "file":
                continue
            lfs = entry.get("lfs") if isinstance(entry.get("lfs"), dict) else {}
            sha = lfs.get("oid") or lfs.get("sha256")
            files.append(
                {
                    "path": str(entry.get("path", "")),
                    "size": lfs.get("size", entry.get("size")),
                    "sha256": sha.lower()
                    if isinstance(sha, str) and _SHA256.match(sha.lower())
                    else None,
                }
            )
        match = re.search(r'<([^>]+)>;\s*rel="next"', link)
        if match is None:
            return files
        url = urljoin(url, match.group(1))
    raise ModelSourceError(f"the listing of {repo} has more than {MAX_LISTING_PAGES} pages")


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
                tracked.check()  # a cancel that came meanwhile stops before the next chunk

            digest, size = _fetch(settings, remote, part, report)
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


def _fetch(settings: HubSettings, remote: Remote, part: Path, report: Progress) -> tuple[str, int]:
    sha = hashlib.sha256()
    done = _rehash(part, sha)
    total = remote.size
    stalled, last_error = 0, ""
    best = done  # the most bytes ever held: a server that restarts us each time is no progress
    while total is None or done < total:
        if stalled > settings.retries:
            raise Unreachable(
                f"download of {remote.label} failed {stalled} times in a row ({last_error}); "
                f"{done} bytes are kept and the next try resumes from there"
            )
        if stalled:
            time.sleep(min(30.0, settings.retry_delay_s * 2 ** (stalled - 1)))
        try:
            resp = _open(settings, remote.url, headers={"Range": f"bytes={done}-"} if done else {})
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and done and total is None:
                break  # nothing past what we hold: the part is the whole file
            if exc.code == 416:  # the part is longer than the file: start over
                done, sha = _restart(part)
                stalled, last_error = stalled + 1, "HTTP 416"
                continue
            error = _refusal(exc, f"cannot download {remote.label}", _repo_of(remote), settings)
            if not isinstance(error, Unreachable):
                raise error from None
            stalled, last_error = stalled + 1, str(error)
            continue
        except _NETWORK_ERRORS as exc:
            stalled, last_error = stalled + 1, repr(exc)
            continue
        with resp:
            if done and resp.status != 206:  # the server ignored the Range: all again
                done, sha = _restart(part)
            elif done and not resp.headers.get("Content-Range", "").startswith(f"bytes {done}-"):
                done, sha = _restart(part)
                stalled, last_error = stalled + 1, "a Content-Range not where we asked"
                continue
            total = total if total is not None else _total_of(resp, done)
            try:
                done = _copy(resp, part, sha, done, total, report)
            except _NETWORK_ERRORS as exc:  # cut or stalled: resume from what arrived
                last_error = repr(exc)
            else:
                if total is None:
                    break  # no length given: the end of the body is the end of the file
                last_error = f"connection closed at byte {done} of {total}"
            stalled, best = (0, done) if done > best else (stalled + 1, best)
    return sha.hexdigest(), done


def _copy(resp, part: Path, sha, done: int, total: int | None, report: Progress) -> int:
    """Append the body to `part`. Network errors propagate with what arrived kept; a disk
    that fails is not the network's fault and ends the download."""
    try:
        out = open(part, "ab")  # noqa: SIM115 (closed by the with below)
    except OSError as exc:
        raise ModelSourceError(f"cannot write {part.name}: {exc}") from None
    with out:
        try:
            while True:
                chunk = resp.read(CHUNK)
                if not chunk:
                    break
                try:
                    out.write(chunk)
                except OSError as exc:
                    raise ModelSourceError(f"cannot write {part.name}: {exc}") from None
                sha.update(chunk)
                done += len(chunk)
                report(done, total)
        finally:
            out.flush()
            os.fsync(out.fileno())
    return done


def _restart(part: Path):
    part.unlink(missing_ok=True)
    return 0, hashlib.sha256()


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


def _total_of(resp, done: int) -> int | None:
    content_range = resp.headers.get("Content-Range", "")
    if "/" in content_range and content_range.rsplit("/", 1)[1].isdigit():
        return int(content_range.rsplit("/", 1)[1])
    length = resp.headers.get("Content-Length")
    return done + int(length) if length and length.isdigit() else None


def _repo_of(remote: Remote) -> str | None:
    """ORG/REPO for a Hugging Face download (its token errors name the repo), else None."""
    parts = remote.label.split("/")
    return "/".join(parts[:2]) if "://" not in remote.label and len(parts) > 2 else None
