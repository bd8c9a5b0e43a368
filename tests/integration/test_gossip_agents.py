"""Real `python -m peer` processes on loopback: mDNS discovery, crash, rejoin, wrong key.

Each agent is a process this test starts; only those pids are ever signalled.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from aivailable.local_peers import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


class Agents:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}

    def start(self, name: str, *extra: str, gpu: str | None = None, port: int | None = None):
        port = port or self.ports.get(name) or free_port()
        self.ports[name] = port
        args = [sys.executable, "-m", "peer", "--name", name, "--port", str(port),
                "--bind", "127.0.0.1", "--data-dir", str(self.tmp / name),
                "--gpu", gpu or f"fake:Card {name}:4GiB", *extra]  # fmt: skip
        proc = subprocess.Popen(
            args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        line = proc.stdout.readline()
        assert '"ready"' in line, f"{name} did not start: {line}{proc.stdout.read()}"
        self.procs[name] = proc
        return proc

    def status(self, name: str) -> dict:
        url = f"http://127.0.0.1:{self.ports[name]}/cluster/status"
        with urllib.request.urlopen(url, timeout=2) as resp:
            return json.load(resp)

    def view(self, observer: str) -> dict[str, dict]:
        return {n["id"]: n for n in self.status(observer)["nodes"]}

    def kill9(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.kill()  # SIGKILL our own child, by its pid
        proc.wait(5)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        self.procs.clear()


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except OSError as exc:  # an agent briefly not answering
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last: {last}")


@pytest.fixture
def agents(tmp_path):
    a = Agents(tmp_path)
    yield a
    a.stop_all()


def share_key(agents: Agents, name: str) -> list[str]:
    return ["--cluster-key-file", str(agents.tmp / name / "cluster.key")]


def test_three_agents_find_each_other_by_mdns_survive_a_crash_and_a_rejoin(agents):
    agents.start("alpha", gpu="fake:GTX 1080:8GiB")
    key = share_key(agents, "alpha")
    agents.start("beta", *key, gpu="fake:RX 580:4GiB")
    agents.start("gamma", *key, gpu="fake:Tesla K80:12GiB")
    names = {"alpha", "beta", "gamma"}
    gpu_names = {"alpha": "GTX 1080", "beta": "RX 580", "gamma": "Tesla K80"}

    def everyone_sees_everyone():
        for observer in names:
            view = agents.view(observer)
            for other in names:
                node = view.get(other)
                if node is None or node["state"] != "alive":
                    return False
                if [g["name"] for g in node["gpus"]] != [gpu_names[other]]:
                    return False
        return True

    wait_for(everyone_sees_everyone, 15, "all three to see each other and their GPUs by mDNS")
    assert agents.view("alpha")["gamma"]["gpus"][0]["vram_total"] == 12 << 30
    before = agents.view("alpha")["beta"]["incarnation"]

    agents.kill9("beta")
    wait_for(
        lambda: all(agents.view(o)["beta"]["state"] == "dead" for o in ("alpha", "gamma")),
        20,
        "beta to be marked dead by the others",
    )

    agents.start("beta", *key, gpu="fake:RX 580:4GiB")
    wait_for(
        lambda: all(agents.view(o)["beta"]["state"] == "alive" for o in ("alpha", "gamma")),
        15,
        "beta to rejoin",
    )
    assert agents.view("alpha")["beta"]["incarnation"] > before
    # The rejoined peer learns the others in its own time (its join's sync, then gossip).
    wait_for(
        lambda: all(
            agents.view("beta").get(o, {}).get("state") == "alive" for o in ("alpha", "gamma")
        ),
        15,
        "beta to see the others again",
    )


def test_a_peer_with_the_wrong_key_is_never_admitted(agents):
    agents.start("one", "--no-mdns")
    agents.start(
        "two", "--no-mdns", *share_key(agents, "one"), "--join", f"127.0.0.1:{agents.ports['one']}"
    )
    wait_for(lambda: agents.view("one").get("two", {}).get("state") == "alive", 10, "two joins")
    # Its own fresh secret: a stranger that knows where the cluster is.
    agents.start("stranger", "--no-mdns", "--join", f"127.0.0.1:{agents.ports['one']}")
    wait_for(
        lambda: agents.status("one")["gossip"]["gossip_push_pull_refused"] >= 1,
        10,
        "the stranger's push-pull to be refused",
    )
    time.sleep(2)
    assert "stranger" not in agents.view("one")
    assert "stranger" not in agents.view("two")
    assert set(agents.view("stranger")) == {"stranger"}
    assert agents.status("one")["gossip"]["transport_rejected_bad_key"] >= 1


def test_sigterm_leaves_gracefully_and_others_see_left_not_dead(agents):
    agents.start("p", "--no-mdns")
    key = share_key(agents, "p")
    agents.start("q", "--no-mdns", *key, "--join", f"127.0.0.1:{agents.ports['p']}")
    wait_for(lambda: agents.view("p").get("q", {}).get("state") == "alive", 10, "q joins")
    proc = agents.procs.pop("q")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert agents.view("p")["q"]["state"] == "left"


def test_a_join_token_carries_the_secret_and_a_seed(agents):
    from peer.secret import encode_join_token, read_secret

    agents.start("host", "--no-mdns")
    secret = read_secret(agents.tmp / "host" / "cluster.key")
    token = encode_join_token(secret, [f"127.0.0.1:{agents.ports['host']}"])
    agents.start("guest", "--no-mdns", "--token", token)
    wait_for(
        lambda: agents.view("host").get("guest", {}).get("state") == "alive", 10, "guest joins"
    )
    assert agents.view("guest")["host"]["state"] == "alive"
