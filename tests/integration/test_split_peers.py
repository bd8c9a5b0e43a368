"""One model split over several real peers through llama.cpp RPC (issue 20), end to end.

Three `aivailable up` peers on loopback whose simulated GPUs are each too small for
SmolLM2 with its compute buffers and runtime overhead (704 MiB, so 448 MiB of capacity
after the headroom; one instance needs about 459 MiB): the controller splits it over two of
them, the openai client gets answers through every peer, greedy output equals that of an
unsplit instance (a peer of another cluster with a big GPU) token for token, and a kill -9
of a helper is re-placed and serves again. Every RPC byte between peers runs in the TLS
peer channel: a raw TCP client speaking RPC to a peer's port gets an HTTP error, never an
RPC answer, and no RPC server listens beyond loopback.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import openai
import pytest

from aivailable.local_peers import PeerProcess
from peer.secret import load_or_create_secret
from tests.integration.test_cluster_peers import all_alive, http, leader_of, wait_all

pytestmark = pytest.mark.slow

SOURCE = "builtin:smollm2-135m"
SMALL = ["--gpu", "fake:Small:704MiB"]
PROMPT = [{"role": "user", "content": "Name the three primary colours, then count to ten."}]
DEPLOY = {"name": "smol", "source": SOURCE, "replicas": 1, "n_ctx": 512, "n_parallel": 1}


def split_placement(peer: PeerProcess) -> dict | None:
    for m in peer.status()["models"]:
        if m["name"] == "smol":
            for p in m["placements"]:
                if p.get("split"):
                    return p
    return None


def ready_split(peer: PeerProcess) -> dict | None:
    p = split_placement(peer)
    return p if p is not None and p["state"] == "ready" else None


def greedy(peer: PeerProcess, max_tokens: int = 48) -> str:
    client = openai.OpenAI(base_url=peer.url + "/v1", api_key="unused", timeout=120)
    answer = client.chat.completions.create(
        model="smol", messages=PROMPT, temperature=0, max_tokens=max_tokens, seed=1
    )
    return answer.choices[0].message.content


def listening_ports(pid: int) -> set[tuple[str, int]]:
    """(address, port) of the TCP sockets a process listens on, from /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = set()
    with open("/proc/net/tcp") as fh:
        for line in fh.readlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # LISTEN
                host, port = local.split(":")
                addr = socket.inet_ntoa(bytes.fromhex(host)[::-1])
                out.add((addr, int(port, 16)))
    return out


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def rpc_server_pids(peer: PeerProcess) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if ppid == peer.pid and b"aivailable.backends.rpc_server" in cmd:
            out.append(int(entry))
    return out


def test_a_model_too_big_for_any_peer_is_split_served_and_re_placed(cluster, tmp_path):
    load_or_create_secret(cluster.key)
    peers = [cluster.add(name, *SMALL) for name in ("a", "b", "c")]
    for p in peers:
        p.start()
    wait_all(peers, all_alive({"a", "b", "c"}), "three peers alive", 90)
    leader_of(peers)
    versions = lambda p: {n["rpc"]["version"] for n in p.status()["nodes"]}  # noqa: E731
    wait_all(peers, lambda p: len(versions(p)) == 1 and None not in versions(p), "RPC", 60)

    # the reference: the same model unsplit, on a peer of another cluster with room
    ref = cluster.add("ref", "--gpu", "fake:Big:4GiB", "--no-mdns", key=tmp_path / "other.key")
    ref.start()
    ref.wait_until(lambda: ref.status()["leader"] == "ref", 60, "ref leads itself")
    code, body = http("POST", ref.url + "/cluster/models", json.dumps(DEPLOY).encode())
    assert code == 202, body

    code, body = http("POST", peers[0].url + "/cluster/models", json.dumps(DEPLOY).encode())
    assert code == 202, body
    started = time.monotonic()
    peers[0].wait_until(lambda: ready_split(peers[0]) is not None, 180, "split ready")
    load_s = time.monotonic() - started
    placement = ready_split(peers[0])
    nodes = {part["node"] for part in placement["parts"]}
    assert len(nodes) == 2, placement
    assert all(part["layers"] > 0 and part["vram"] > 0 for part in placement["parts"])

    # answers through every peer, the same as the unsplit model's, token for token
    ref.wait_until(
        lambda: any(p["state"] == "ready" for m in ref.status()["models"] for p in m["placements"]),
        120,
        "reference ready",
    )
    expected = greedy(ref)
    assert expected
    for p in peers:
        assert greedy(p) == expected, f"through {p.name}"

    # no RPC server listens beyond loopback; a raw RPC HELLO to a peer's port gets HTTP
    primary = next(p for p in peers if p.name == placement["node"])
    helper = next(p for p in peers if p.name in nodes and p is not primary)
    for p in peers:
        for pid in rpc_server_pids(p):
            assert {addr for addr, _ in listening_ports(pid)} <= {"127.0.0.1"}
        with socket.create_connection(("127.0.0.1", p.port), timeout=5) as raw:
            raw.sendall(bytes([14]) + (24).to_bytes(8, "little") + bytes(24))
            answer = raw.recv(4096)
        assert not answer or answer.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400"))
    assert rpc_server_pids(helper), "the helper runs an RPC server"

    # kill -9 of the helper: re-placed on the third peer, serving again
    helper_rpc = rpc_server_pids(helper)
    os.kill(helper.pid, signal.SIGKILL)  # its RPC server dies with it (PR_SET_PDEATHSIG)
    killed = time.monotonic()
    survivors = [p for p in peers if p is not helper]

    def replaced(p: PeerProcess) -> bool:
        now = ready_split(p)
        return now is not None and helper.name not in {part["node"] for part in now["parts"]}

    survivors[0].wait_until(lambda: replaced(survivors[0]), 180, "split re-placed")
    assert not any(alive(pid) for pid in helper_rpc), "the dead helper's RPC server lives"
    replace_s = time.monotonic() - killed
    assert greedy(survivors[0]) == expected
    print(f"\nsplit load {load_s:.1f} s, re-placed after kill -9 in {replace_s:.1f} s")
