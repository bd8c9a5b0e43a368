"""API keys and proposal ids in the replicated state: no I/O, and applying is deterministic
(new secrets, key ids and proposal ids are random: `secrets`, so the module is not pure).

The key set is replicated cluster state (ClusterState.access), so its model lives on the
cluster floor; access/ (the guard, /cluster/keys, the limits) reads it from here.

A key is a random 256-bit secret shown once to whoever created it; the cluster keeps only
its SHA-256 (a fast hash is enough for a 256-bit random secret: nothing to brute-force).
`AccessState` lives inside the Raft-replicated `ClusterState`, so every peer holds the same
keys and a revoke reaches every peer with the next commit.

Every proposal carries a unique id (`stamp`); `AccessState.first_time` remembers the last
PROPOSAL_IDS_KEPT ids, in log order, so a replayed proposal changes nothing. A replay of an
older id would need that many proposals within the peer signatures' validity window.

Command type numbers 32-47 are reserved for access commands (state.py keeps the
others); append-only like the rest.
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import re
import secrets
from dataclasses import dataclass
from typing import Any

import msgpack

KEY_CREATE = 32  # add a key: its hash and what it may do
KEY_REVOKE = 33  # remove a key by id
TYPE_NAMES = {KEY_CREATE: "key_create", KEY_REVOKE: "key_revoke"}

ROLES = ("admin", "user", "metrics")
KEY_PREFIX = "aiv-"  # tells a human (and secret scanners) what the string is
KEY_ID = re.compile(r"^[0-9a-f]{12}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
PROPOSAL_ID = re.compile(r"^[0-9a-f]{32}$")
PROPOSAL_FIELD = "pid"
# Proposal ids remembered (about 35 bytes each in a snapshot, 140 KiB at most). Peer
# signatures expire after their clock window (60 s), so a replay of an id this many
# proposals old would need ~70 proposals/s for a minute; the controller makes a few a minute.
PROPOSAL_IDS_KEPT = 4096
MAX_KEYS = 10_000  # bounds the state (and each snapshot) against a runaway script
MAX_MODELS_PER_KEY = 256
MAX_NAME = 200


class AccessCommandError(ValueError):
    """A key command or field that is not well formed (the message says which)."""


@dataclass(frozen=True)
class KeyRecord:
    id: str  # 12 hex digits, public: `keys revoke ID`, metrics labels
    hash: str  # sha256 hex of the secret
    role: str  # admin | user | metrics
    name: str = ""
    models: tuple[str, ...] = ()  # user keys: the models it may use; empty: all
    rpm: int = 0  # requests per minute, cluster-wide; 0: unlimited
    tpm: int = 0  # tokens per minute, cluster-wide; 0: unlimited
    expires_ms: int = 0  # Unix ms after which it is refused; 0: never
    created_ms: int = 0  # Unix ms, as the creating peer's clock said

    def expired(self, now_ms: int) -> bool:
        return bool(self.expires_ms) and now_ms >= self.expires_ms

    def may_use(self, model: str) -> bool:
        return self.role == "admin" or not self.models or model in self.models

    def public(self) -> dict:
        """What `keys list` and /cluster/keys show: everything but the hash."""
        return {
            "id": self.id,
            "name": self.name,
            "role": self.role,
            "models": list(self.models),
            "rpm": self.rpm,
            "tpm": self.tpm,
            "expires": _iso(self.expires_ms) if self.expires_ms else None,
            "created": _iso(self.created_ms) if self.created_ms else None,
        }

    def to_wire(self) -> dict:
        return {
            "id": self.id,
            "hash": self.hash,
            "role": self.role,
            "name": self.name,
            "models": list(self.models),
            "rpm": self.rpm,
            "tpm": self.tpm,
            "expires_ms": self.expires_ms,
            "created_ms": self.created_ms,
        }


def _iso(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).isoformat(timespec="seconds")


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)  # 256 random bits


def new_key_id() -> str:
    return secrets.token_hex(6)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.strip().encode()).hexdigest()


def parse_expires(text: str, now_ms: int) -> int:
    """'2027-01-31', an ISO date-time, or a duration like '30d', '12h', '90m' -> Unix ms."""
    text = text.strip()
    m = re.fullmatch(r"(\d+)\s*([dhm])", text)
    if m:
        unit = {"d": 86_400_000, "h": 3_600_000, "m": 60_000}[m.group(2)]
        return now_ms + int(m.group(1)) * unit
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise AccessCommandError(
            f"expires must be a date (2027-01-31) or a duration (30d), not {text!r}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return int(when.timestamp() * 1000)


# ---- commands ---------------------------------------------------------------------------


def _pack(t: int, **fields: Any) -> bytes:
    return msgpack.packb({"v": 1, "t": t, **fields}, use_bin_type=True)


def encode_key_create(record: KeyRecord, bootstrap: bool = False) -> bytes:
    """`bootstrap`: the first admin key of a cluster; applies only while none was ever
    bootstrapped, so peers starting together cannot each add one."""
    return _pack(KEY_CREATE, key=record.to_wire(), bootstrap=bootstrap)


def encode_key_revoke(key_id: str) -> bytes:
    return _pack(KEY_REVOKE, id=key_id)


def stamp(data: bytes, token: str | None = None) -> bytes:
    """The command with a fresh proposal id (kept if it has one: a retry is the same proposal)."""
    return stamped(data, token)[0]


def stamped(data: bytes, token: str | None = None) -> tuple[bytes, str | None]:
    """As `stamp`, with the command's proposal id (None: not a command, or an id that is not
    text)."""
    try:
        cmd = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception:  # not a command: the state machine rejects it with its own reason
        return data, None
    if not isinstance(cmd, dict):
        return data, None
    if PROPOSAL_FIELD in cmd:
        pid = cmd[PROPOSAL_FIELD]
        return data, pid if isinstance(pid, str) else None
    cmd[PROPOSAL_FIELD] = token or secrets.token_hex(16)
    return msgpack.packb(cmd, use_bin_type=True), cmd[PROPOSAL_FIELD]


def record_from_wire(data: Any) -> KeyRecord:
    if not isinstance(data, dict):
        raise AccessCommandError("key must be a map")
    key_id, digest, role = data.get("id"), data.get("hash"), data.get("role")
    if not isinstance(key_id, str) or not KEY_ID.match(key_id):
        raise AccessCommandError("key id must be 12 hex digits")
    if not isinstance(digest, str) or not SHA256_HEX.match(digest):
        raise AccessCommandError("key hash must be 64 hex digits")
    if role not in ROLES:
        raise AccessCommandError(f"role must be one of {', '.join(ROLES)}")
    name = data.get("name", "")
    if not isinstance(name, str) or len(name) > MAX_NAME:
        raise AccessCommandError(f"name must be text of at most {MAX_NAME} characters")
    models = data.get("models", [])
    if not isinstance(models, list | tuple) or len(models) > MAX_MODELS_PER_KEY:
        raise AccessCommandError("models must be a list")
    if not all(isinstance(m, str) and 0 < len(m) <= 128 for m in models):
        raise AccessCommandError("models must be model names")
    ints = {}
    for field in ("rpm", "tpm", "expires_ms", "created_ms"):
        value = data.get(field, 0)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 62:
            raise AccessCommandError(f"{field} must be a non-negative integer")
        ints[field] = value
    return KeyRecord(key_id, digest, role, name, tuple(models), **ints)


# ---- the replicated part ----------------------------------------------------------------


class AccessState:
    """Keys by id and by hash, whether the first admin key was made, recent proposal ids."""

    def __init__(self) -> None:
        self.keys: dict[str, KeyRecord] = {}
        self.by_hash: dict[str, KeyRecord] = {}
        self.bootstrapped = False
        self.version = 0  # bumps on every change to the keys
        self._pids: collections.OrderedDict[str, None] = collections.OrderedDict()

    def lookup(self, secret: str, now_ms: int) -> KeyRecord | None:
        """The live key whose secret this is, or None (unknown, revoked or expired)."""
        record = self.by_hash.get(hash_secret(secret))
        if record is None or record.expired(now_ms):
            return None
        return record

    def first_time(self, cmd: dict) -> bool:
        """False if this proposal id was applied before (a replay); records it otherwise.
        Commands without an id (logs from before ids existed) always apply."""
        pid = cmd.get(PROPOSAL_FIELD)
        if pid is None:
            return True
        if not isinstance(pid, str) or not PROPOSAL_ID.match(pid):
            raise AccessCommandError("proposal id must be 32 hex digits")
        if pid in self._pids:
            return False
        self._pids[pid] = None
        while len(self._pids) > PROPOSAL_IDS_KEPT:
            self._pids.popitem(last=False)
        return True

    def apply(self, cmd: dict) -> bool:
        """Apply a key command; True when the keys changed. AccessCommandError when malformed."""
        if cmd["t"] == KEY_CREATE:
            record = record_from_wire(cmd.get("key"))
            bootstrap = cmd.get("bootstrap") is True
            if bootstrap and self.bootstrapped:
                return False
            if bootstrap and record.hash in self.by_hash:  # that key was added by hand before
                self.bootstrapped = True
                return True
            if record.id in self.keys or record.hash in self.by_hash:
                raise AccessCommandError(f"key {record.id} exists already")
            if len(self.keys) >= MAX_KEYS:
                raise AccessCommandError(f"too many keys ({MAX_KEYS}); revoke some first")
            self.bootstrapped = self.bootstrapped or bootstrap
            self._put(record)
            return True
        key_id = cmd.get("id")
        record = self.keys.pop(key_id, None) if isinstance(key_id, str) else None
        if record is None:
            return False
        del self.by_hash[record.hash]
        self.version += 1
        return True

    def _put(self, record: KeyRecord) -> None:
        self.keys[record.id] = record
        self.by_hash[record.hash] = record
        self.version += 1

    def to_wire(self) -> dict:
        return {
            "keys": [self.keys[k].to_wire() for k in sorted(self.keys)],
            "bootstrapped": self.bootstrapped,
            "version": self.version,
            "pids": list(self._pids),
        }

    @classmethod
    def from_wire(cls, data: Any) -> AccessState:
        """Raises on a malformed snapshot part (the caller keeps its old state)."""
        fresh = cls()
        if data is None:  # a snapshot from before keys existed
            return fresh
        if not isinstance(data, dict):
            raise AccessCommandError("access state must be a map")
        for item in data.get("keys", []):
            fresh._put(record_from_wire(item))
        fresh.bootstrapped = data.get("bootstrapped") is True
        version = data.get("version", 0)
        fresh.version = version if isinstance(version, int) else 0
        for pid in data.get("pids", [])[-PROPOSAL_IDS_KEPT:]:
            if not isinstance(pid, str) or not PROPOSAL_ID.match(pid):
                raise AccessCommandError("bad proposal id in snapshot")
            fresh._pids[pid] = None
        return fresh
