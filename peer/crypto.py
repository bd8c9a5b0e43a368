"""AES-GCM envelopes for gossip datagrams and push-pull bodies, with a keyring and replay guard.

Envelope: version (1 byte) | key id (4) | nonce (12: 6-byte millisecond timestamp + 6
random bytes) | ciphertext and 16-byte tag. Associated data binds the header and the
cluster id, so a packet of another cluster never opens even under the same key. A packet
whose timestamp is outside the replay window, or whose nonce was seen inside it, is refused.
"""

from __future__ import annotations

import hashlib
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from peer import wire
from peer.secret import cluster_id as cluster_id_of

ENVELOPE_VERSION = 1
HEADER = struct.Struct(">B4s12s")  # version, key id, nonce
TAG_BYTES = 16
OVERHEAD = HEADER.size + TAG_BYTES
assert OVERHEAD <= wire.ENVELOPE_OVERHEAD


class CryptoError(Exception):
    """A packet that must be dropped. reason: bad_key | tampered | replay | malformed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def derive_key(secret: bytes, purpose: bytes = b"gossip") -> bytes:
    """A 256-bit AES key from the cluster secret by HKDF-SHA256."""
    hkdf = HKDF(hashes.SHA256(), 32, salt=b"aivailable v1", info=b"aivailable " + purpose)
    return hkdf.derive(secret)


def key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"aivailable key id\x00" + key).digest()[:4]


class Keyring:
    """Keys this node accepts; the primary one encrypts. Rotation: install the new key on
    every node, switch the primary everywhere, then remove the old one."""

    def __init__(self, primary: bytes, cluster_id: str, others: tuple[bytes, ...] = ()) -> None:
        self.cluster_id = cluster_id
        self._keys: dict[bytes, AESGCM] = {}
        self._primary = b""
        for key in (primary, *others):
            self.install(key)
        self.use(primary)

    @classmethod
    def from_secret(cls, secret: bytes) -> Keyring:
        return cls(derive_key(secret), cluster_id_of(secret))

    @property
    def primary_id(self) -> bytes:
        return self._primary

    def key_ids(self) -> list[bytes]:
        return list(self._keys)

    def install(self, key: bytes) -> None:
        if len(key) not in (16, 24, 32):
            raise ValueError("AES keys are 16, 24 or 32 bytes")
        self._keys[key_id(key)] = AESGCM(key)

    def use(self, key: bytes) -> None:
        kid = key_id(key)
        if kid not in self._keys:
            raise KeyError("install the key before making it primary")
        self._primary = kid

    def remove(self, key: bytes) -> None:
        kid = key_id(key)
        if kid == self._primary:
            raise ValueError("cannot remove the primary key; switch to another first")
        self._keys.pop(kid, None)

    def cipher(self, kid: bytes) -> AESGCM | None:
        return self._keys.get(kid)


class Envelope:
    """Seals and opens packets; `now` is wall-clock seconds (time.time())."""

    def __init__(self, keyring: Keyring, replay_window: float) -> None:
        self.keyring = keyring
        self.replay_window = replay_window
        self._seen: dict[bytes, float] = {}
        self._next_prune = 0.0

    def _aad(self, header: bytes) -> bytes:
        return header + self.keyring.cluster_id.encode()

    def seal(self, plaintext: bytes, now: float) -> bytes:
        stamp = int(now * 1000).to_bytes(6, "big")
        kid = self.keyring.primary_id
        header = HEADER.pack(ENVELOPE_VERSION, kid, stamp + os.urandom(6))
        cipher = self.keyring.cipher(kid)
        return header + cipher.encrypt(header[5:], plaintext, self._aad(header))

    def open(self, data: bytes, now: float) -> bytes:
        if len(data) < OVERHEAD or data[0] != ENVELOPE_VERSION:
            raise CryptoError("malformed")
        header = data[: HEADER.size]
        _, kid, nonce = HEADER.unpack(header)
        cipher = self.keyring.cipher(kid)
        if cipher is None:
            raise CryptoError("bad_key")
        sent = int.from_bytes(nonce[:6], "big") / 1000.0
        if abs(now - sent) > self.replay_window:
            raise CryptoError("replay")
        try:
            plaintext = cipher.decrypt(nonce, data[HEADER.size :], self._aad(header))
        except InvalidTag:
            raise CryptoError("tampered") from None
        # Only authentic packets reach the cache, so garbage cannot flood it.
        if nonce in self._seen:
            raise CryptoError("replay")
        self._seen[nonce] = sent + self.replay_window
        if now >= self._next_prune:
            self._next_prune = now + self.replay_window / 4
            self._seen = {n: t for n, t in self._seen.items() if t >= now}
        return plaintext
