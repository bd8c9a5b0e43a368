"""`aivailable demo`: a three-peer cluster on 127.0.0.1 with simulated mixed GPUs.

Node A has a "GTX 1080 8 GiB" and an "RX 580 8 GiB", node B a "Tesla K80 12 GiB",
node C no GPU (it only routes). The embedded model is deployed with 2 replicas, a chat
goes through node C, the status is printed, and the cluster serves until Ctrl-C.
The simulated GPUs only steer placement; inference runs on this machine's CPU.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

from aivailable.chat_client import stream_chat
from aivailable.http_client import request_json
from aivailable.local_peers import PeerProcess, free_port, get_json
from aivailable.status_view import render_status

MODEL = "smollm2-135m"
NODES = {
    "node-a": ["--gpu", "fake:GTX 1080:8GiB", "--gpu", "fake:RX 580:8GiB"],
    "node-b": ["--gpu", "fake:Tesla K80:12GiB"],
    "node-c": ["--cpu", "no"],  # no GPU and no CPU offered: it only routes
}


def ready_replicas(status: dict, model: str) -> int:
    for entry in status.get("models", []):
        if entry["name"] == model:
            return sum(1 for p in entry.get("placements", []) if p["state"] == "ready")
    return 0


def wait_for(what: str, predicate, timeout: float, peers: list[PeerProcess]) -> None:
    deadline = time.monotonic() + timeout
    print(f"… waiting for {what}", flush=True)
    while time.monotonic() < deadline:
        for peer in peers:
            if peer.proc is not None and peer.proc.poll() is not None:
                raise SystemExit(f"peer {peer.name} exited:\n{peer.log()[-2000:]}")
        try:
            if predicate():
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.25)
    raise SystemExit(f"timed out waiting for {what}")


def run_demo(base_dir: Path | None = None, hold: bool = True, replicas: int = 2) -> dict:
    """Start the cluster, chat through node C, print the status; serve until Ctrl-C if `hold`."""
    tmp = tempfile.TemporaryDirectory(prefix="aivailable-demo-") if base_dir is None else None
    base = Path(tmp.name) if tmp else base_dir
    ports = {name: free_port() for name in NODES}
    seed = f"127.0.0.1:{ports['node-a']}"
    key = base / "cluster.key"
    peers = []
    for name, node_args in NODES.items():
        args = ["--cluster-key-file", str(key), *node_args]
        if name != "node-a":
            args += ["--join", seed]
        peers.append(PeerProcess(base, name, *args, port=ports[name]))
    try:
        peers[0].start()
        wait_for(
            "node-a to serve",
            lambda: get_json(peers[0].url + "/healthz")["status"] == "ok",
            60,
            peers,
        )
        for peer in peers[1:]:
            peer.start()
        node_c = peers[2]
        wait_for(
            "three nodes and a leader",
            lambda: (
                len([n for n in node_c.status()["nodes"] if n["state"] == "alive"]) == 3
                and node_c.status()["leader"]
            ),
            60,
            peers,
        )
        if replicas != 1:
            request_json(
                node_c.url + "/cluster/models",
                "POST",
                {"name": MODEL, "source": f"builtin:{MODEL}", "replicas": replicas},
            )
        wait_for(
            f"{replicas} ready replicas of {MODEL}",
            lambda: ready_replicas(node_c.status(), MODEL) >= replicas,
            300,
            peers,
        )
        print(f"\nchat through node-c ({node_c.url}):\n> Hello! Who are you?")
        stream_chat(
            node_c.url,
            MODEL,
            [{"role": "user", "content": "Hello! Who are you?"}],
            max_tokens=64,
            temperature=0.7,
        )
        status = node_c.status()
        render_status(status)
        print("\nthe cluster:")
        for peer in peers:
            print(f"  {peer.name}: {peer.url}  (log {peer.log_path})")
        print(
            f"try: aivailable status --url {node_c.url}\n"
            f"     aivailable chat --url {node_c.url} 'Tell me a joke'\n"
            "Ctrl-C stops the cluster.",
            flush=True,
        )
        if hold:
            with contextlib.suppress(KeyboardInterrupt):
                while all(p.proc is not None and p.proc.poll() is None for p in peers):
                    time.sleep(0.5)
        return status
    finally:
        for peer in peers:
            peer.stop()
        if tmp:
            tmp.cleanup()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> int:
    signal.signal(signal.SIGTERM, _interrupt)  # stop the cluster on SIGTERM as on Ctrl-C
    try:
        status = run_demo()
    except SystemExit as exc:
        print(f"aivailable demo: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"leader": status.get("leader")}))
    return 0
