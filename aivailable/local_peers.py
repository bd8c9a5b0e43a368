"""Peer processes on this machine, for `aivailable demo`, the tests and the benchmarks.

Each is a real `python -m aivailable up` child, logging to a file in its data dir;
it is signalled only by its own pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

_handed_out: set[int] = set()


def free_port() -> int:
    """A port free for both TCP (HTTP) and UDP (gossip) on loopback, and not handed out
    before by this process: ports are picked for every peer of a cluster before the first
    binds, and the kernel may offer a port again while nothing holds it (two peers were
    given one port that way, and the second could not start)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            if port in _handed_out:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port


def get_json(url: str, timeout: float = 5) -> dict:
    """GET with the process's API key (aivailable.http_client), if it has one."""
    from aivailable.http_client import auth_headers

    request = urllib.request.Request(url, headers=auth_headers())
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return json.loads(resp.read())


class PeerProcess:
    """`python -m aivailable up ...` as a child process, logging to a file.

    `host` is where it listens (a network namespace's own address in chaos tests) and
    `prefix` what runs it there, e.g. ("ip", "netns", "exec", "ns1").
    """

    def __init__(
        self,
        tmp: Path,
        name: str,
        *args: str,
        port: int | None = None,
        env: dict | None = None,
        host: str = "127.0.0.1",
        prefix: tuple[str, ...] = (),
    ):
        self.name = name
        self.host = host
        self.port = port or free_port()
        self.url = f"http://{host}:{self.port}"
        self.data_dir = tmp / name
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir / "peer.log"
        self.args = [
            "--name",
            name,
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--bind",
            host,
            *args,
        ]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.prefix = prefix
        self.proc: subprocess.Popen | None = None

    def start(self) -> PeerProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "aivailable", "up", *self.args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict:
        return get_json(self.url + "/cluster/status")

    def wait_until(self, predicate, timeout: float = 120, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"peer {self.name} exited ({self.proc.returncode}):\n{self.log()[-3000:]}"
                )
            with contextlib.suppress(OSError, ValueError, KeyError, urllib.error.URLError):
                if predicate():
                    return
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what} on {self.name}:\n{self.log()[-3000:]}")

    def wait_healthy(self, timeout: float = 60) -> None:
        self.wait_until(
            lambda: get_json(self.url + "/healthz")["status"] == "ok", timeout, "/healthz"
        )

    def wait_model_ready(self, model: str = "smollm2-135m", timeout: float = 180) -> None:
        """Until this peer's instance of `model` is ready and the cluster's plan has it
        here (a preloaded default model is ready before the first plan)."""

        def ready() -> bool:
            status = self.status()
            node = next(n for n in status["nodes"] if n["id"] == self.name)
            states = {i["model"]: i["state"] for i in node["instances"]}
            if states.get(model) == "failed":
                raise AssertionError(f"{model} failed on {self.name}: {status}")
            placed = [
                p["node"]
                for m in status["models"]
                if m["name"] == model
                for p in m["placements"]
                if p["state"] == "ready"
            ]
            return states.get(model) == "ready" and self.name in placed

        self.wait_until(ready, timeout, f"{model} ready")

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM, then SIGKILL if it does not leave in time; returns the exit code."""
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            return self.proc.wait(5)
