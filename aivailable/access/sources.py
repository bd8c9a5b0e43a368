"""Whether a deploy's model source can work at all, decided when it is asked for: a source
that can never load would otherwise be committed and then fail on every node forever."""

from __future__ import annotations

from pathlib import Path

REMOTE_SCHEMES = ("hf://", "https://")  # fetched by the model store when placed
GGUF_MAGIC = b"GGUF"


def refuse_reason(source: str) -> str | None:
    """Blocking (reads 4 bytes of a local file): why the source is refused, or None.
    The reason may name a local path, so only admins may see it."""
    if source.startswith("builtin:") or source.startswith(REMOTE_SCHEMES):
        return None  # the store checks names and checksums of these itself
    if "://" in source or source.startswith("//"):
        return (
            f"unknown model source {source!r}: use builtin:NAME, hf://ORG/REPO/FILE.gguf, "
            "https://.../FILE.gguf or the path of a GGUF file"
        )
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
