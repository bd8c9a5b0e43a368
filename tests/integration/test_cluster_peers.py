"""Real peers on loopback: `python -m aivailable up` processes that find each other by mDNS
(no --join), judge liveness with SWIM, elect a Raft leader and keep the cluster's state in
their data dirs.

Every peer is a child process signalled only by its own pid; the `cluster` fixture kills
whatever is still running when a test ends, passed or failed.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from aivailable.local_peers import PeerProcess
from peer.auth import FORWARDED_HEADER, PeerAuth
from peer.secret import load_or_create_secret

pytestmark = pytest.mark.slow

MODEL_SOURCE = "builtin:smollm2-135m"
GPUS = {
    "a": ["--gpu", "fake:GTX 1080:8GiB"],
    "b": ["--gpu", "fake:Tesla K80:12GiB"],
    "c": ["--gpu", "fake:RX 580:8GiB"],
}


class Cluster:
    """Peers of one test: one cluster key, mDNS on 127.0.0.1, no --join unless asked."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.key = tmp / "cluster.key"
        self.peers: dict[str, PeerProcess] = {}
        self.all: list[PeerProcess] = []  # every process started, strangers included

    def add(self, name: str, *args: str, key: Path | None = None) -> PeerProcess:
        peer = PeerProcess(
            self.tmp, name, "--cluster-key-file", str(key or self.key), "--model", "none", *args
        )
        if key is None:
            self.peers[name] = peer
        self.all.append(peer)
        return peer

    def start(self, gpus: dict[str, list[str]] = GPUS) -> list[PeerProcess]:
        # The key exists before any peer starts, so they do not race to create it.
        load_or_create_secret(self.key)
        peers = [self.add(name, *args) for name, args in gpus.items()]
        for peer in peers:
            peer.start()
        return peers

    def stop_all(self) -> None:
        """SIGTERM (the peer stops its model workers), SIGKILL if it does not exit in time."""
        for peer in self.all:
            if peer.proc is not None and peer.proc.poll() is None:
                peer.signal(signal.SIGTERM)
        for peer in self.all:
            peer.stop(timeout=15)


def nodes_seen(peer: PeerProcess) -> dict[str, dict]:
    return {n["id"]: n for n in peer.status()["nodes"]}


def wait_all(
    peers: list[PeerProcess],
    predicate: Callable[[PeerProcess], bool],
    what: str,
    timeout: float = 60,
) -> None:
    for peer in peers:
        peer.wait_until(lambda p=peer: predicate(p), timeout, what)


def all_alive(names: set[str]) -> Callable[[PeerProcess], bool]:
    def check(peer: PeerProcess) -> bool:
        seen = nodes_seen(peer)
        return names <= set(seen) and all(seen[n]["state"] == "alive" for n in names)

    return check


def leader_of(peers: list[PeerProcess]) -> str:
    """The leader every given peer agrees on (waits for one)."""
    found: list[str] = []

    def agreed(peer: PeerProcess) -> bool:
        leaders = {p.status()["leader"] for p in peers}
        if len(leaders) == 1 and None not in leaders:
            found[:] = list(leaders)
            return True
        return False

    peers[0].wait_until(lambda: agreed(peers[0]), 60, "one leader on every peer")
    return found[0]


def http(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict | None = None,
    timeout: float = 30,
) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def gossip_metric(peer: PeerProcess, counter: str) -> float:
    with urllib.request.urlopen(peer.url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    prefix = f'aivailable_gossip{{counter="{counter}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


def model_names(peer: PeerProcess) -> set[str]:
    return {m["name"] for m in peer.status()["models"]}


def ready_on(peer: PeerProcess, model: str) -> list[str]:
    for m in peer.status()["models"]:
        if m["name"] == model:
            return [p["node"] for p in m["placements"] if p["state"] == "ready"]
    return []


def chat(peer: PeerProcess, model: str) -> tuple[int, dict]:
    body = {"model": model, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8}
    return http(
        "POST",
        peer.url + "/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
        timeout=120,
    )


def stop_and_see_it_leave(peer: PeerProcess, observers: list[PeerProcess]) -> None:
    """SIGTERM `peer`: every observer sees it go from "alive" straight to "left", never
    suspect or dead, also once the suspicion timeout has passed."""
    seen: dict[str, list[str]] = {o.name: [] for o in observers}

    def record(o: PeerProcess) -> str:
        state = nodes_seen(o)[peer.name]["state"]
        if not seen[o.name] or seen[o.name][-1] != state:
            seen[o.name].append(state)
        return state

    assert all(record(o) == "alive" for o in observers)
    peer.signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(record(o) == "left" for o in observers):
        time.sleep(0.05)
    assert peer.proc.wait(20) == 0
    time.sleep(3)  # past the suspicion minimum: a missed "left" would now show as dead
    for o in observers:
        record(o)
    assert all(states == ["alive", "left"] for states in seen.values()), seen


def test_peers_find_each_other_by_mdns_show_gpus_and_refuse_strangers(cluster, tmp_path):
    peers = cluster.start()
    names = set(GPUS)
    gpu_names = {n: args[1].split(":")[1] for n, args in GPUS.items()}

    def sees_everyones_gpus(peer: PeerProcess) -> bool:
        seen = nodes_seen(peer)
        return all_alive(names)(peer) and all(
            [g["name"] for g in seen[n]["gpus"]] == [gpu_names[n]] for n in names
        )

    wait_all(peers, sees_everyones_gpus, "every peer alive with its simulated GPU")
    a = cluster.peers["a"]
    gpu = nodes_seen(cluster.peers["b"])["a"]["gpus"][0]
    assert gpu["vendor"] == "fake" and gpu["vram_total"] == 8 << 30

    # A peer with another cluster key, pointed straight at `a`: never admitted, and counted.
    other_key = tmp_path / "other.key"
    stranger = cluster.add("stranger", "--join", f"127.0.0.1:{a.port}", key=other_key)
    stranger.start()
    a.wait_until(  # at the TLS handshake (peer/tls.py), or by the request HMAC without TLS
        lambda: (
            gossip_metric(a, "peer_auth_refused_gossip") + gossip_metric(a, "peer_auth_refused_tls")
            >= 2
        ),
        30,
        "the stranger's push-pulls refused",
    )
    for peer in peers:
        assert "stranger" not in nodes_seen(peer)
    assert set(nodes_seen(stranger)) == {"stranger"}

    # Requests between peers need the cluster key's HMAC.
    secret = load_or_create_secret(cluster.key)
    peer_calls = [
        ("POST", "/raft/messages", b"\x80"),
        ("POST", "/internal/propose", b"\x80"),
        ("POST", "/gossip/pushpull", b"x"),
        ("GET", "/internal/models/" + "0" * 64, b""),
    ]
    wrong = PeerAuth(load_or_create_secret(other_key))
    for method, path, body in peer_calls:
        for headers in ({}, wrong.signed_headers(method, path, body)):
            status, error = http(method, a.url + path, body or None, headers)
            assert status == 401, (path, status, error)
            assert error["error"]["code"] == "peer_auth"
    forged = {FORWARDED_HEADER: "b", "Content-Type": "application/json"}
    status, _ = http("POST", a.url + "/v1/chat/completions", b"{}", forged)
    assert status == 401
    # The same call with the right key gets past the check (and is judged on its content)
    # once `a` runs Raft: the discovery window may still be open right after gossip settles.
    a.wait_until(lambda: a.status()["leader"] is not None, 30, "a leader")
    right = PeerAuth(secret).signed_headers(
        "POST", "/internal/propose", b"\x80", target=f"127.0.0.1:{a.port}"
    )
    status, error = http("POST", a.url + "/internal/propose", b"\x80", right)
    assert status == 400, error
    assert gossip_metric(a, "peer_auth_refused_raft") >= 2


def test_a_killed_peer_is_dead_rejoins_with_a_higher_incarnation_and_sigterm_leaves(cluster):
    peers = cluster.start()
    a, b, c = (cluster.peers[n] for n in "abc")
    wait_all(peers, all_alive({"a", "b", "c"}), "three alive peers")
    before = nodes_seen(a)["c"]["incarnation"]

    c.signal(signal.SIGKILL)
    c.proc.wait(10)
    wait_all([a, b], lambda p: nodes_seen(p)["c"]["state"] == "dead", "c marked dead", 30)

    c.start()  # same name, port and data dir
    wait_all(
        [a, b],
        lambda p: (
            nodes_seen(p)["c"]["state"] == "alive" and nodes_seen(p)["c"]["incarnation"] > before
        ),
        "c alive again with a higher incarnation",
        60,
    )
    wait_all([c], all_alive({"a", "b", "c"}), "c sees everyone again")

    stop_and_see_it_leave(b, [a, c])


def test_deploy_through_followers_and_a_whole_cluster_restart_keeps_the_models(cluster):
    gpus = {"a": GPUS["a"], "b": GPUS["b"], "c": ["--cpu", "no"]}  # c only routes
    peers = cluster.start(gpus)
    wait_all(peers, all_alive({"a", "b", "c"}), "three alive peers")
    leader = leader_of(peers)
    followers = [p for p in peers if p.name != leader]

    for name in ("keep", "gone"):
        body = {"name": name, "source": MODEL_SOURCE, "replicas": 1, "n_ctx": 512}
        status, result = http(
            "POST",
            followers[0].url + "/cluster/models",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        assert status == 202, result
    # Linearizable: a consistent read on another peer includes both deploys, without waiting.
    status, fresh = http("GET", followers[1].url + "/cluster/status?consistent=1")
    assert status == 200 and fresh["linearizable"] is True, fresh
    assert {"keep", "gone"} <= {m["name"] for m in fresh["models"]}
    # Raft's heartbeats and their answers travel as sealed gossip datagrams (issue 22).
    for p in (cluster.peers[leader], followers[0]):
        assert gossip_metric(p, "transport_app_packets_sent") > 0, p.name
    wait_all(peers, lambda p: {"keep", "gone"} <= model_names(p), "both models on every peer")
    status, _ = http("DELETE", followers[1].url + "/cluster/models/gone")
    assert status in (200, 202, 204)
    wait_all(peers, lambda p: model_names(p) == {"keep"}, "only 'keep' on every peer")
    status, _ = http("DELETE", followers[1].url + "/cluster/models/never-deployed")
    assert status == 404

    c = cluster.peers["c"]
    c.wait_until(lambda: ready_on(c, "keep"), 120, "'keep' ready")
    status, reply = chat(c, "keep")
    assert status == 200 and reply["choices"][0]["message"]["content"], reply

    # The host stops gracefully (its model worker stops after it left): the others see it
    # leave, the model moves to the other GPU node, and the host rejoins when started again.
    host = cluster.peers[ready_on(c, "keep")[0]]
    other = next(p for p in peers if p.name not in (host.name, "c"))
    stop_and_see_it_leave(host, [p for p in peers if p is not host])
    c.wait_until(lambda: ready_on(c, "keep") == [other.name], 120, "'keep' moved")
    status, reply = chat(c, "keep")
    assert status == 200 and reply["choices"][0]["message"]["content"], reply
    host.start()
    wait_all(peers, all_alive({"a", "b", "c"}), "the host back")

    cluster_id = c.status()["cluster_id"]
    for peer in peers:
        peer.signal(signal.SIGTERM)
    assert [peer.proc.wait(30) for peer in peers] == [0, 0, 0]
    for peer in peers:
        peer.start()  # same names, ports and data dirs
    leader_of(peers)
    wait_all(peers, lambda p: model_names(p) == {"keep"}, "'keep' back on every peer")
    assert {p.status()["cluster_id"] for p in peers} == {cluster_id}  # resumed, not refounded
    c.wait_until(lambda: ready_on(c, "keep"), 120, "'keep' ready after the restart")
    status, reply = chat(c, "keep")
    assert status == 200 and reply["choices"][0]["message"]["content"], reply
