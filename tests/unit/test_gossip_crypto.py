"""AES-GCM envelope, keyring rotation, replay protection; the cluster secret and join tokens."""

import os
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peer.crypto import OVERHEAD, CryptoError, Envelope, Keyring, derive_key
from peer.secret import (
    SecretError,
    cluster_id,
    encode_join_token,
    load_or_create_secret,
    parse_join_token,
)

SECRET = bytes(range(32))
NOW = 1_800_000_000.0


def envelope(secret=SECRET, window=120.0) -> Envelope:
    return Envelope(Keyring.from_secret(secret), window)


def reason(env: Envelope, data: bytes, now: float = NOW) -> str:
    with pytest.raises(CryptoError) as info:
        env.open(data, now)
    return info.value.reason


def test_sealed_packets_open_once_with_the_same_secret():
    a, b = envelope(), envelope()
    sealed = a.seal(b"hello", NOW)
    assert len(sealed) == len(b"hello") + OVERHEAD
    assert b.open(sealed, NOW + 1) == b"hello"
    assert reason(b, sealed, NOW + 2) == "replay"


def test_another_secret_is_a_bad_key_and_a_flipped_bit_is_tampering():
    sealed = envelope().seal(b"hello", NOW)
    assert reason(envelope(b"x" * 32), sealed) == "bad_key"
    flipped = bytearray(sealed)
    flipped[-1] ^= 1
    assert reason(envelope(), bytes(flipped)) == "tampered"


def test_the_cluster_id_is_bound_as_associated_data():
    key = derive_key(SECRET)
    sealed = Envelope(Keyring(key, "cluster-a"), 120).seal(b"x", NOW)
    assert reason(Envelope(Keyring(key, "cluster-b"), 120), sealed) == "tampered"


def test_packets_outside_the_replay_window_are_refused():
    sealed = envelope().seal(b"x", NOW)
    assert reason(envelope(), sealed, NOW + 121) == "replay"
    assert reason(envelope(), sealed, NOW - 121) == "replay"


def test_key_rotation_install_switch_remove():
    old, new = derive_key(b"old" * 8), derive_key(b"new" * 8)
    a, b = Keyring(old, "c"), Keyring(old, "c")
    ea, eb = Envelope(a, 120), Envelope(b, 120)
    b.install(new)  # step 1: everyone accepts the new key
    a.install(new)
    a.use(new)  # step 2: switch the primary (b still on old, both still talk)
    assert eb.open(ea.seal(b"1", NOW), NOW) == b"1"
    assert ea.open(eb.seal(b"2", NOW), NOW) == b"2"
    b.use(new)
    with pytest.raises(ValueError):
        a.remove(new)  # never the primary
    a.remove(old)  # step 3: drop the old key everywhere
    b.remove(old)
    stale = Envelope(Keyring(old, "c"), 120).seal(b"3", NOW)
    assert reason(ea, stale) == "bad_key"


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_opening_garbage_only_ever_raises_crypto_error(data):
    with pytest.raises(CryptoError):
        envelope().open(data, NOW)


def test_secret_file_is_created_owner_only_and_reused(tmp_path):
    path = tmp_path / "cluster.key"
    secret = load_or_create_secret(path)
    assert len(secret) == 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_or_create_secret(path) == secret
    os.chmod(path, 0o644)
    with pytest.raises(SecretError, match="readable by others"):
        load_or_create_secret(path)


def test_cluster_id_is_a_stable_hash_that_reveals_nothing_of_the_key():
    assert cluster_id(SECRET) == cluster_id(bytes(SECRET))
    assert cluster_id(SECRET) != cluster_id(b"y" * 32)
    assert SECRET.hex()[:16] not in cluster_id(SECRET)


def test_join_tokens_round_trip_and_reject_damage():
    token = encode_join_token(SECRET, ["10.0.0.5:7946", "10.0.0.6:7946"])
    parsed = parse_join_token(token)
    assert parsed.secret == SECRET and parsed.seeds == ("10.0.0.5:7946", "10.0.0.6:7946")
    damaged = token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:]
    for bad in (damaged, "hello", "aiv1-", "aiv1-!!!!"):
        with pytest.raises(SecretError):
            parse_join_token(bad)
