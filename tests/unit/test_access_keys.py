"""API keys in the replicated state, proposal ids, the auth policy and per-key limits (pure)."""

import pytest

from aivailable.access.limits import RateLimiter
from aivailable.access.policy import (
    AuthModeError,
    allowed,
    area,
    auth_enabled,
    presented_key,
)
from aivailable.cluster import keys as k
from aivailable.cluster.state import ClusterState, encode_deploy, encode_undeploy
from aivailable.config import ConfigError, load_config

NOW_MS = 1_800_000_000_000


def make_key(role="user", **fields):
    secret = k.new_secret()
    record = k.KeyRecord(k.new_key_id(), k.hash_secret(secret), role, **fields)
    return secret, record


def test_secrets_are_256_bit_random_and_only_their_hash_is_kept():
    secret, record = make_key()
    assert secret.startswith("aiv-") and len(secret) >= 4 + 43  # 32 bytes, base64url
    assert secret != k.new_secret()
    state = ClusterState()
    assert state.apply(k.encode_key_create(record)).changed
    snapshot = state.snapshot()
    assert secret.encode() not in snapshot and secret.encode() not in k.encode_key_create(record)
    assert state.access.lookup(secret, NOW_MS) == record
    assert state.access.lookup(secret + "x", NOW_MS) is None


def test_revoke_removes_the_key_and_expiry_refuses_it():
    state = ClusterState()
    secret, record = make_key(expires_ms=NOW_MS + 1000)
    state.apply(k.encode_key_create(record))
    assert state.access.lookup(secret, NOW_MS + 999) == record
    assert state.access.lookup(secret, NOW_MS + 1000) is None  # expired
    result = state.apply(k.encode_key_revoke(record.id))
    assert result.ok and result.changed
    assert state.access.lookup(secret, NOW_MS) is None
    assert not state.apply(k.encode_key_revoke(record.id)).changed  # nothing left to revoke


def test_malformed_key_commands_are_rejected_without_change():
    state = ClusterState()
    _, record = make_key()
    bad = [
        {**record.to_wire(), "role": "root"},
        {**record.to_wire(), "hash": "nothex"},
        {**record.to_wire(), "id": "x"},
        {**record.to_wire(), "rpm": -1},
        {**record.to_wire(), "models": "all"},
    ]
    for wire in bad:
        result = state.apply(k._pack(k.KEY_CREATE, key=wire))
        assert not result.ok and result.kind == "key_create", wire
    assert state.access.keys == {}
    state.apply(k.encode_key_create(record))
    duplicate = k.KeyRecord(k.new_key_id(), record.hash, "admin")
    assert not state.apply(k.encode_key_create(duplicate)).ok  # same secret twice


def test_only_the_first_bootstrap_admin_key_applies():
    state = ClusterState()
    _, first = make_key("admin")
    _, second = make_key("admin")
    assert state.apply(k.encode_key_create(first, bootstrap=True)).changed
    assert not state.apply(k.encode_key_create(second, bootstrap=True)).changed
    assert set(state.access.keys) == {first.id}


def test_a_bootstrap_of_a_key_added_by_hand_just_marks_it_done():
    state = ClusterState()
    _, record = make_key("admin")
    state.apply(k.encode_key_create(record))
    again = k.KeyRecord(k.new_key_id(), record.hash, "admin")
    assert state.apply(k.encode_key_create(again, bootstrap=True)).ok
    assert state.access.bootstrapped and list(state.access.keys) == [record.id]


def test_a_replayed_proposal_is_applied_once():
    """A captured deploy replayed after an undeploy does not bring the model back."""
    state = ClusterState()
    deploy = k.stamp(encode_deploy("m", "builtin:smollm2-135m"))
    undeploy = k.stamp(encode_undeploy("m"))
    assert state.apply(deploy).changed
    assert state.apply(undeploy).changed
    replay = state.apply(deploy)
    assert not replay.ok and "replayed" in replay.error
    assert "m" not in state.models
    # The same command stamped anew is a new proposal and applies.
    assert state.apply(k.stamp(encode_deploy("m", "builtin:smollm2-135m"))).changed


def test_stamp_keeps_an_existing_id_and_ignores_garbage():
    once = k.stamp(encode_undeploy("m"))
    assert k.stamp(once) == once  # a retry is the same proposal
    assert k.stamp(b"\xc1garbage") == b"\xc1garbage"
    assert k.stamp(encode_undeploy("m")) != once  # fresh ids


def test_proposal_ids_are_bounded_and_survive_a_snapshot():
    state = ClusterState()
    cmds = [k.stamp(encode_undeploy("m")) for _ in range(k.PROPOSAL_IDS_KEPT + 10)]
    for cmd in cmds:
        state.apply(cmd)
    assert len(state.access._pids) == k.PROPOSAL_IDS_KEPT
    _, record = make_key(models=("a", "b"), rpm=5)
    state.apply(k.stamp(k.encode_key_create(record)))
    copy = ClusterState()
    copy.restore(state.snapshot())
    assert copy.snapshot() == state.snapshot()
    assert copy.access.keys[record.id] == record
    assert not copy.apply(cmds[-1]).ok  # still known as applied after the restore


def test_a_snapshot_from_before_keys_restores_empty():
    state = ClusterState()
    wire = state.to_wire()
    del wire["access"]
    import msgpack

    copy = ClusterState()
    copy.restore(msgpack.packb(wire, use_bin_type=True))
    assert copy.access.keys == {} and not copy.access.bootstrapped


def test_expires_accepts_dates_and_durations():
    assert k.parse_expires("30d", NOW_MS) == NOW_MS + 30 * 86_400_000
    assert k.parse_expires("2h", NOW_MS) == NOW_MS + 7_200_000
    assert k.parse_expires("2027-01-31", 0) == 1_801_353_600_000  # 2027-01-31T00:00Z
    with pytest.raises(k.AccessCommandError):
        k.parse_expires("soon", NOW_MS)


# ---- policy ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, bind, on",
    [
        ("auto", "127.0.0.1", False),
        ("auto", "::1", False),
        ("auto", "localhost", False),
        ("auto", "0.0.0.0", True),
        ("auto", "10.0.0.5", True),
        ("on", "127.0.0.1", True),
        ("off", "127.0.0.1", False),
    ],
)
def test_auth_is_on_for_lan_binds_and_on_request(mode, bind, on):
    assert auth_enabled(mode, bind) is on


@pytest.mark.parametrize("bind", ["0.0.0.0", "192.168.1.10", "::", "lab-host"])
def test_auth_off_is_refused_on_a_lan_bind(bind):
    with pytest.raises(AuthModeError, match="refused"):
        auth_enabled("off", bind)
    with pytest.raises(ConfigError, match="refused"):
        load_config({"bind": bind, "auth_mode": "off"}, environ={})


def test_config_reports_auth_and_the_admin_key_path(tmp_path):
    config = load_config({"bind": "0.0.0.0", "data_dir": str(tmp_path)}, environ={})
    assert config.auth_on and config.admin_key_path == tmp_path / "admin.key"
    assert not load_config({"data_dir": str(tmp_path)}, environ={}).auth_on
    env = {"AIVAILABLE_AUTH_MODE": "on", "AIVAILABLE_ADMIN_KEY_FILE": str(tmp_path / "a")}
    config = load_config({}, environ=env)
    assert config.auth_on and config.admin_key_path == tmp_path / "a"


@pytest.mark.parametrize(
    "method, path, needed",
    [
        ("GET", "/healthz", "open"),
        ("GET", "/", "open"),
        ("POST", "/", "admin"),
        ("GET", "/metrics", "metrics"),
        ("POST", "/v1/chat/completions", "user"),
        ("GET", "/v1/models", "user"),
        ("POST", "/api/generate", "user"),
        ("GET", "/cluster/status", "admin"),
        ("POST", "/cluster/models", "admin"),
        ("GET", "/cluster/keys", "admin"),
        ("GET", "/anything-else", "admin"),
    ],
)
def test_routes_need_the_right_area(method, path, needed):
    assert area(method, path) == needed


def test_roles_reach_only_their_areas():
    assert allowed("admin", "user") and allowed("admin", "metrics") and allowed("admin", "admin")
    assert allowed("user", "user") and not allowed("user", "admin")
    assert not allowed("user", "metrics")
    assert allowed("metrics", "metrics") and not allowed("metrics", "user")
    assert all(allowed(role, "open") for role in k.ROLES)


def test_keys_come_from_bearer_or_x_api_key():
    assert presented_key({"Authorization": "Bearer abc"}) == "abc"
    assert presented_key({"Authorization": "bearer  abc "}) == "abc"
    assert presented_key({"x-api-key": "xyz"}) == "xyz"
    assert presented_key({"Authorization": "Basic abc"}) is None
    assert presented_key({}) is None


# ---- limits ------------------------------------------------------------------------------


def test_rpm_refuses_with_a_wait_until_the_window_frees():
    limiter = RateLimiter()
    _, record = make_key(rpm=3)
    assert [limiter.admit(record, 100.0 + i) for i in range(3)] == [None] * 3
    wait = limiter.admit(record, 103.0)
    assert wait == 57.0  # the first request leaves the window at 160
    assert limiter.admit(record, 160.0) is None
    assert limiter.requests[record.id] == 4


def test_tpm_counts_tokens_spent():
    limiter = RateLimiter()
    _, record = make_key(tpm=100)
    assert limiter.admit(record, 0.0) is None
    limiter.spent(record, 100, 1.0)
    assert limiter.admit(record, 2.0) is not None
    assert limiter.usage(record.id, 2.0) == (1, 100)


def test_other_peers_use_counts_against_the_limit():
    a, b = RateLimiter(), RateLimiter()
    _, record = make_key(rpm=4)
    for t in range(3):
        assert a.admit(record, float(t)) is None
    b.set_remote([("a", a.local_use(3.0))])
    assert b.admit(record, 3.0) is None  # 3 there + 1 here
    wait = b.admit(record, 3.0)
    assert wait is not None and wait >= 1
    assert b.usage(record.id, 3.0) == (4, 0)


def test_malformed_remote_use_is_ignored_and_revoked_keys_forgotten():
    limiter = RateLimiter()
    _, record = make_key(rpm=1)
    limiter.set_remote([("x", {record.id: ["a", 1, 2]}), ("y", "junk"), ("z", {record.id: [-1]})])
    assert limiter.admit(record, 0.0) is None
    limiter.forget([])
    assert limiter.requests == {} and limiter.local_use(0.0) == {}


def test_client_tls_needs_both_files_and_peer_tls(tmp_path):
    with pytest.raises(ConfigError, match="go together"):
        load_config({"tls_cert": str(tmp_path / "c.pem")}, environ={})
    with pytest.raises(ConfigError, match="peer_tls"):
        load_config({"tls_cert": "c", "tls_key": "k", "access": {"peer_tls": False}}, environ={})
    config = load_config({"tls_cert": "c.pem", "tls_key": "k.pem"}, environ={})
    assert str(config.tls_cert) == "c.pem" and config.access.peer_tls
