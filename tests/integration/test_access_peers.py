"""Access control with real peers on loopback (`--auth on`): the first admin key, keys made
on one peer and enforced (and revoked) on another, limits across entry peers, replays of
captured peer requests and proposals, half-open connections and huge unsigned bodies.
"""

from __future__ import annotations

import json
import os
import select
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from aivailable.cluster.keys import stamp
from aivailable.cluster.state import encode_deploy
from aivailable.local_peers import PeerProcess
from peer.auth import PeerAuth
from peer.secret import load_or_create_secret

pytestmark = pytest.mark.slow


def http(method, url, body=None, key=None, headers=None, timeout=15):
    headers = dict(headers or {})
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    if isinstance(body, dict):
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, _body(resp.read()), resp.headers
    except urllib.error.HTTPError as exc:
        return exc.code, _body(exc.read()), exc.headers


def _body(raw: bytes):
    try:
        return json.loads(raw or b"{}")
    except ValueError:
        return raw.decode(errors="replace")  # /metrics


def poll(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class AuthCluster:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.key = tmp / "cluster.key"
        self.secret = load_or_create_secret(self.key)
        self.peers: list[PeerProcess] = []
        self.config = tmp / "peer.toml"
        self.config.write_text("[access]\nidle_timeout_s = 2.0\n")

    def add(self, name: str, *args: str) -> PeerProcess:
        seeds = [a for p in self.peers[:1] for a in ("--join", f"127.0.0.1:{p.port}")]
        peer = PeerProcess(
            self.tmp,
            name,
            "--cluster-key-file",
            str(self.key),
            "--model",
            "none",
            "--no-mdns",
            "--auth",
            "on",
            "--config",
            str(self.config),
            *seeds,
            *args,
        )
        self.peers.append(peer)
        return peer.start()

    def admin_key(self) -> str:
        path = self.peers[0].data_dir / "admin.key"
        poll(path.exists, 60, "the first admin key")
        return path.read_text().strip()

    def stop(self) -> None:
        for peer in self.peers:
            peer.stop()


@pytest.fixture
def auth_cluster(tmp_path):
    cluster = AuthCluster(tmp_path)
    try:
        yield cluster
    finally:
        cluster.stop()


def two_peers(cluster: AuthCluster) -> tuple[PeerProcess, PeerProcess, str]:
    a = cluster.add("a", "--gpu", "fake:G:8GiB")
    b = cluster.add("b")
    admin = cluster.admin_key()

    def both_in_raft():
        s, status, _ = http("GET", b.url + "/cluster/status", key=admin)
        return s == 200 and status["leader"] == "a" and "b" in status["voters"] + status["learners"]

    poll(both_in_raft, 60, "b in a's cluster")
    return a, b, admin


def test_keys_made_on_one_peer_are_enforced_and_revoked_on_another(auth_cluster):
    a, b, admin = two_peers(auth_cluster)
    path = a.data_dir / "admin.key"
    assert path.stat().st_mode & 0o777 == 0o600
    assert not (b.data_dir / "admin.key").exists()  # one first key, on the founder
    assert f"admin key is in {path}" in a.log()
    for peer in (a, b):
        for path_ in ("/cluster/status", "/v1/models", "/metrics", "/cluster/keys"):
            status, body, _ = http("GET", peer.url + path_)
            assert status == 401 and body["error"]["code"] == "invalid_api_key", path_
        assert http("GET", peer.url + "/v1/models", key="definitely-wrong")[0] == 401
        status, _, _ = http("POST", peer.url + "/cluster/models", {"source": "builtin:x"})
        assert status == 401
        assert http("GET", peer.url + "/healthz")[0] == 200

    status, user, _ = http("POST", a.url + "/cluster/keys", {"role": "user", "rpm": 6}, admin)
    assert status == 201
    poll(lambda: http("GET", b.url + "/v1/models", key=user["key"])[0] == 200, 5, "key on b")
    assert http("GET", b.url + "/cluster/status", key=user["key"])[0] == 403
    status, metrics_key, _ = http("POST", b.url + "/cluster/keys", {"role": "metrics"}, admin)
    assert http("GET", a.url + "/metrics", key=metrics_key["key"])[0] == 200
    assert http("GET", a.url + "/v1/models", key=metrics_key["key"])[0] == 403

    # The limit holds across both entry peers: 6 per minute in all, then 429.
    codes = [http("GET", a.url + "/v1/models", key=user["key"])[0] for _ in range(3)]

    def b_sees_a_use():
        listing = http("GET", b.url + "/cluster/keys", key=admin)[1]["data"]
        return next(k for k in listing if k["id"] == user["id"])["requests_1m"] >= 4

    poll(b_sees_a_use, 10, "a's use gossiped to b")
    answers = [http("GET", b.url + "/v1/models", key=user["key"]) for _ in range(3)]
    codes += [s for s, _, _ in answers]
    assert codes == [200, 200, 200, 200, 200, 429], codes
    assert 1 <= int(answers[-1][2]["Retry-After"]) <= 60
    assert answers[-1][1]["error"]["code"] == "rate_limit_exceeded"

    # Revoked on a, refused on b as soon as the commit reaches it.
    assert http("DELETE", a.url + f"/cluster/keys/{user['id']}", key=admin)[0] == 200
    poll(lambda: http("GET", b.url + "/v1/models", key=user["key"])[0] == 401, 5, "revoked on b")


def test_captured_requests_and_proposals_cannot_be_replayed(auth_cluster):
    a, b, admin = two_peers(auth_cluster)
    signer = PeerAuth(auth_cluster.secret)
    body = b"\x80"  # not a command: a request that gets past the signature answers 400
    for_a = signer.signed_headers("POST", "/internal/propose", body, f"127.0.0.1:{a.port}")
    assert http("POST", b.url + "/internal/propose", body, headers=for_a)[0] == 401
    assert http("POST", a.url + "/internal/propose", body, headers=for_a)[0] == 400
    status, err, _ = http("POST", a.url + "/internal/propose", body, headers=for_a)
    assert status == 401 and "replayed" in err["error"]["message"]

    # A deploy proposal captured on its way to the leader, replayed after an undeploy.
    deploy = stamp(encode_deploy("ghost", "/nonexistent/ghost.gguf"))

    def propose(data: bytes) -> int:
        headers = signer.signed_headers("POST", "/internal/propose", data, f"127.0.0.1:{a.port}")
        return http("POST", a.url + "/internal/propose", data, headers=headers)[0]

    def models() -> set[str]:
        return {m["name"] for m in http("GET", b.url + "/cluster/status", key=admin)[1]["models"]}

    assert propose(deploy) == 200
    poll(lambda: "ghost" in models(), 5, "ghost deployed")
    assert http("DELETE", a.url + "/cluster/models/ghost", key=admin)[0] == 200
    poll(lambda: "ghost" not in models(), 5, "ghost undeployed")
    assert propose(deploy) == 200  # committed to the log, but its id was applied before
    marker = stamp(encode_deploy("marker", "/nonexistent/marker.gguf"))
    assert propose(marker) == 200
    poll(lambda: "marker" in models(), 5, "a later proposal applied")
    assert "ghost" not in models()

    # Captured before a restart, sent after it: refused.
    captured = signer.signed_headers("POST", "/internal/propose", body, f"127.0.0.1:{a.port}")
    a.stop()
    a.start()
    a.wait_healthy()
    status, err, _ = http("POST", a.url + "/internal/propose", body, headers=captured)
    assert status == 401 and "before this peer started" in err["error"]["message"]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def huge_unsigned_post(port: int, size: int, statuses: list) -> None:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall(
            f"POST /raft/messages HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode()
        )
        chunk = b"\0" * (1 << 20)
        sent = 0
        try:
            while sent < size:
                sock.sendall(chunk)
                sent += len(chunk)
                if select.select([sock], [], [], 0)[0]:
                    break  # answered already
        except OSError:
            pass  # the peer closed the connection on us
        statuses.append(sock.recv(64).split(b"\r\n")[0])
    finally:
        sock.close()


def test_half_open_connections_close_and_huge_unsigned_bodies_are_not_read(auth_cluster):
    a = auth_cluster.add("a")
    a.wait_healthy()
    before = rss_kib(a.pid)
    statuses: list[bytes] = []
    threads = [
        threading.Thread(target=huge_unsigned_post, args=(a.port, 200 << 20, statuses))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(statuses) == 4 and all(b" 401 " in s for s in statuses), statuses
    assert rss_kib(a.pid) - before < 16 << 10  # KiB: a few MiB of buffers, not 800 MiB

    # 500 connections that never finish their headers; the idle limit (2 s here) closes
    # them all while a real client is still served.
    half_open = []
    for i in range(500):
        s = socket.create_connection(("127.0.0.1", a.port), timeout=5)
        if i % 2:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        half_open.append(s)
    try:
        assert http("GET", a.url + "/healthz")[0] == 200
        open_ = set(half_open)
        deadline = time.monotonic() + 30
        while open_ and time.monotonic() < deadline:
            readable, _, _ = select.select(list(open_), [], [], 0.5)
            for s in readable:
                if s.recv(4096) == b"":
                    open_.discard(s)
        assert not open_, f"{len(open_)} of 500 half-open connections still open"
    finally:
        for s in half_open:
            s.close()
    assert os.path.exists(f"/proc/{a.pid}")  # and the peer lives on
