"""The cluster secret: load or create it (0600), derive the public cluster id, join tokens.

The secret is 32 random bytes kept as hex in a file only its owner may read. The cluster
id is a hash of it: safe to announce over mDNS, useless for decrypting. A join token
carries the secret and a few seed addresses, for `aivailable token` / `up --token`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

SECRET_BYTES = 32
TOKEN_PREFIX = "aiv1-"


class SecretError(ValueError):
    """The secret file or join token is unusable (wrong format or unsafe permissions)."""


def load_or_create_secret(path: str | Path) -> bytes:
    """Read the secret at `path`, or create a new one there (mode 0600) if it is missing."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_secret(path)
    secret = secrets.token_bytes(SECRET_BYTES)
    with os.fdopen(fd, "w") as f:
        f.write(secret.hex() + "\n")
        f.flush()
        os.fsync(f.fileno())
    return secret


def read_secret(path: str | Path) -> bytes:
    path = Path(path)
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretError(f"{path} is readable by others (mode {oct(mode & 0o777)}); chmod 600 it")
    text = path.read_text().strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise SecretError(f"{path} does not hold a hex cluster secret") from None
    if len(secret) < 16:
        raise SecretError(f"{path}: the cluster secret must be at least 16 bytes")
    return secret


def write_secret(path: str | Path, secret: bytes) -> None:
    """Store a secret received in a join token (mode 0600; replaces nothing that exists)."""
    fd = os.open(Path(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret.hex() + "\n")


def cluster_id(secret: bytes) -> str:
    """Public identifier of the cluster: a hash of the secret (announced in mDNS TXT)."""
    return hashlib.sha256(b"aivailable cluster id\x00" + secret).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class JoinToken:
    secret: bytes
    seeds: tuple[str, ...]  # "host:port" of peers to push-pull with first


def encode_join_token(secret: bytes, seeds: list[str] | tuple[str, ...] = ()) -> str:
    body = secret + "\n".join(seeds).encode()
    raw = bytes([len(secret)]) + body + hashlib.sha256(body).digest()[:4]
    return TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def parse_join_token(token: str) -> JoinToken:
    token = token.strip()
    if not token.startswith(TOKEN_PREFIX):
        raise SecretError("not an AIvailable join token (it starts with aiv1-)")
    text = token[len(TOKEN_PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise SecretError("join token is not valid base64") from None
    if len(raw) < 1 + 16 + 4:
        raise SecretError("join token is too short")
    n = raw[0]
    body, check = raw[1:-4], raw[-4:]
    if n < 16 or len(body) < n or hashlib.sha256(body).digest()[:4] != check:
        raise SecretError("join token is damaged (checksum mismatch)")
    try:
        seeds = tuple(s for s in body[n:].decode().split("\n") if s)
    except UnicodeDecodeError:
        raise SecretError("join token seeds are not text") from None
    return JoinToken(body[:n], seeds)
