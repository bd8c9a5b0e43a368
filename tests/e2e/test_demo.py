"""`aivailable demo`, as a user runs it, minus the wait for Ctrl-C: three real peers with
simulated mixed GPUs, the embedded model on two of them, a chat through the routing-only one."""

from __future__ import annotations

from pathlib import Path

import pytest

from aivailable import demo
from aivailable.demo import MODEL, run_demo

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def processes_under(path: Path) -> list[str]:
    """Command lines of running processes that mention `path` (the demo's peers)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(path) in cmdline:
            found.append(cmdline)
    return found


def test_the_demo_serves_a_chat_through_the_routing_node_and_stops_its_peers(tmp_path, monkeypatch):
    replies: list[str] = []
    real_chat = demo.stream_chat

    def recording_chat(url, *args, **kwargs):
        replies.append(real_chat(url, *args, **kwargs))
        return replies[-1]

    monkeypatch.setattr(demo, "stream_chat", recording_chat)
    status = run_demo(tmp_path, hold=False)

    nodes = {n["id"]: n for n in status["nodes"]}
    assert set(nodes) == {"node-a", "node-b", "node-c"}
    assert all(n["state"] == "alive" for n in nodes.values())
    assert status["leader"] in nodes
    assert sorted(g["name"] for g in nodes["node-a"]["gpus"]) == ["GTX 1080", "RX 580"]
    assert [g["name"] for g in nodes["node-b"]["gpus"]] == ["Tesla K80"]
    assert nodes["node-c"]["gpus"] == []  # it only routes

    model = next(m for m in status["models"] if m["name"] == MODEL)
    assert model["replicas"] == 2
    placements = {p["node"]: p["state"] for p in model["placements"]}
    assert placements == {"node-a": "ready", "node-b": "ready"}
    assert nodes["node-c"]["instances"] == []

    # The chat went through node-c, which hosts nothing, and streamed a reply.
    assert [n for n in nodes if status["node_id"] == n] == ["node-c"]
    assert len(replies) == 1 and any(ch.isalpha() for ch in replies[0]), replies
    assert processes_under(tmp_path) == []  # every peer stopped
