"""Whether a deploy's model source can work at all, decided when it is asked for: a source
that can never load would otherwise be committed and then fail on every node forever.

It reads the one list of schemes (sources.SCHEMES): whatever a scheme claims is left to the
store, which checks names and checksums itself; only local paths are looked at here.
"""

from __future__ import annotations

from pathlib import Path

from aivailable.models import sources

GGUF_MAGIC = b"GGUF"


def refuse_reason(source: str) -> str | None:
    """Blocking (reads 4 bytes of a local file): why the source is refused, or None.
    The reason may name a local path, so only admins may see it."""
    if sources.scheme_of(source) is not None:
        return None  # the store checks names and checksums of these itself
    if sources.has_unknown_scheme(source):
        return f"unknown model source {source!r}: use {sources.shapes()}"
    path = Path(source).expanduser()
    try:
        if not path.is_file():
            return f"{source} is not a regular file on the peer that took the deploy"
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        return f"cannot read {source}: {exc.strerror or exc}"
    if magic != GGUF_MAGIC:
        return f"{source} is not a GGUF file"
    return None
