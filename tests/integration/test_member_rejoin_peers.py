"""Real peers on loopback: a voter whose raft directory is wiped comes back through `aivailable
up` as a new Raft member (learner, then voter) while the leader retires its old id; and a
deploy acknowledged by one peer is in a consistent read on another at once.

The peers have no devices (`--cpu no`): what is tested is Raft membership and reads, so no
model worker is ever started. Every peer is a child process signalled only by its own pid.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
import urllib.request
from random import Random

import pytest

from aivailable.cluster.identity import RAFT_ID_FILE, node_of
from aivailable.cluster.state import encode_init
from aivailable.local_peers import PeerProcess
from consensus import FileStorage, RaftNode
from peer.secret import load_or_create_secret
from tests.integration.test_cluster_peers import all_alive, http, wait_all

pytestmark = pytest.mark.slow

NO_DEVICES = {name: ["--cpu", "no"] for name in "abc"}


def raft_members(peer: PeerProcess) -> dict[str, str]:
    """Raft id -> "voter" | "learner", as this peer's status shows them."""
    return {m["id"]: m["role"] for m in peer.status()["raft_members"]}


def deploy(peer: PeerProcess, name: str) -> None:
    body = {"name": name, "source": "builtin:smollm2-135m", "replicas": 1, "n_ctx": 512}
    status, result = http(
        "POST",
        peer.url + "/cluster/models",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 202, result


def consistent(peer: PeerProcess, path: str) -> tuple[dict, str]:
    with urllib.request.urlopen(f"{peer.url}{path}?consistent=1", timeout=10) as resp:
        return json.loads(resp.read()), resp.headers["X-Aivailable-Read"]


def membership_log(peer: PeerProcess, raft_ids: set[str]) -> list[str]:
    """The leader's membership changes that name one of `raft_ids`, in order (the old id's
    own joining included, when this peer led then too)."""
    out = []
    for line in peer.log().splitlines():
        if "membership: " in line:
            op, node = line.split("membership: ", 1)[1].split()[:2]
            if node in raft_ids:
                out.append(f"{op} {node}")
    return out


def test_a_wiped_voter_rejoins_as_a_new_member_and_deploys_still_commit(cluster):
    peers = cluster.start(NO_DEVICES)
    wait_all(peers, all_alive({"a", "b", "c"}), "three alive peers")
    a = cluster.peers["a"]

    def three_voters(p: PeerProcess) -> bool:
        s = p.status()
        return s["voters"] == ["a", "b", "c"] and s["learners"] == [] and s["leader"]

    wait_all(peers, three_voters, "three voters", 60)
    leader = cluster.peers[a.status()["leader"]]
    victim = next(p for p in peers if p is not leader)
    others = [p for p in peers if p is not victim]
    old_id = victim.status()["raft_id"]
    assert node_of(old_id) == victim.name and old_id != victim.name
    assert raft_members(leader)[old_id] == "voter"

    # The voter dies (no goodbye: its old id stays in the configuration) and loses its Raft
    # state; it comes back with the same name, port and data dir, but a new raft directory.
    victim.signal(signal.SIGKILL)
    victim.proc.wait(10)
    shutil.rmtree(victim.data_dir / "raft")
    victim.start()

    def rejoined(p: PeerProcess) -> bool:
        members = raft_members(p)
        new = [r for r in members if node_of(r) == victim.name and r != old_id]
        return old_id not in members and len(new) == 1 and members[new[0]] == "voter"

    wait_all([*others, victim], rejoined, "the new id a voter, the old one gone", 60)
    new_id = victim.status()["raft_id"]
    assert new_id != old_id and node_of(new_id) == victim.name
    status = leader.status()
    assert status["voters"] == ["a", "b", "c"] and status["learners"] == []
    assert len(status["raft_members"]) == 3
    # In this order: the old id retired first, then the new one added as a learner (it
    # never voted under the old id, nor under the new one before it had caught up).
    changes = membership_log(leader, {old_id, new_id})
    assert changes[changes.index(f"remove {old_id}") :] == [
        f"remove {old_id}",
        f"add {new_id}",
        f"promote {new_id}",
    ], leader.log()[-3000:]
    assert "rejoined as a new member" in leader.log()

    # A deploy through the rejoined peer commits, and a consistent read on every other
    # peer includes it at once: /v1/models, the deploy list and the status.
    deploy(victim, "after-rejoin")
    for peer in others:
        models, mode = consistent(peer, "/v1/models")
        assert mode == "consistent" and "after-rejoin" in {m["id"] for m in models["data"]}
        listing, mode = consistent(peer, "/cluster/models")
        assert mode == "consistent" and listing["linearizable"] is True
        assert "after-rejoin" in {m["name"] for m in listing["models"]}
        status, mode = consistent(peer, "/cluster/status")
        assert mode == "consistent" and status["linearizable"] is True

    # With a majority gone no leader can confirm a read: a clear 503, not stale data.
    for peer in (p for p in peers if p is not victim):
        peer.signal(signal.SIGKILL)
        peer.proc.wait(10)
    started = time.monotonic()
    code, body = http("GET", victim.url + "/v1/models?consistent=1")
    assert code == 503 and body["error"]["code"] == "no_leader", body
    assert time.monotonic() - started < 10
    code, body = http("GET", victim.url + "/v1/models")
    assert code == 200 and "after-rejoin" in {m["id"] for m in body["data"]}


def test_a_raft_directory_from_before_member_ids_keeps_voting_under_the_node_name(cluster):
    """An upgrade: Raft state written under the node name (as before Raft ids existed) is
    resumed under that name, never under a new id its votes were not cast as."""

    peer = cluster.add("solo", "--cpu", "no")
    storage = FileStorage(peer.data_dir / "raft")
    node = RaftNode("solo", storage, voters=("solo",), rng=Random(1))
    node.campaign()
    committed = []
    for _ in range(10):
        if node.role == "leader" and not committed:
            node.propose(encode_init("c0ffee"))
        while node.has_ready():
            rd = node.ready()
            storage.save(rd)
            committed += [e for e in rd.committed if e.data]
            node.advance(rd)
    storage.close()
    assert committed and node.term >= 1
    (peer.data_dir / "cluster_id").write_text("c0ffee")
    assert not (peer.data_dir / "raft" / RAFT_ID_FILE).exists()

    load_or_create_secret(cluster.key)
    peer.start()
    peer.wait_until(
        lambda: peer.status()["leader"] == "solo" and peer.status()["raft_id"] == "solo",
        60,
        "solo leads under its name",
    )
    status, _ = consistent(peer, "/cluster/status")  # once the old log is applied
    assert status["cluster_id"] == "c0ffee" and status["voters"] == ["solo"]
    assert status["raft_members"] == [{"id": "solo", "node": "solo", "role": "voter"}]
    deploy(peer, "after-upgrade")
    listing, mode = consistent(peer, "/cluster/models")
    assert mode == "consistent" and "after-upgrade" in {m["name"] for m in listing["models"]}
