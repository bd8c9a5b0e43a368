"""What every chaos test needs: a cluster of real peer processes, a client streaming chats
to a surviving peer throughout, and a watcher that records every peer's view of Raft.

- `Cluster`: real `python -m aivailable up` peers (aivailable.local_peers.PeerProcess) on
  loopback or inside network namespaces (tests/chaos/netns.py), with simulated GPUs and
  the embedded model; `close()` ends every process it started, by pid, even a stopped one.
- `ClientLoad`: a thread that sends short streaming chats with the official `openai`
  client, one after another, and classifies each outcome.
- `StatusWatcher`: one thread per peer polling `/cluster/status`; `leaders_by_term()` is
  the election-safety check (no term may show two different leaders).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import openai

from aivailable.access.keys_api import write_key_file
from aivailable.cluster.keys import new_secret
from aivailable.local_peers import PeerProcess, free_port, get_json

MODEL = "smollm2-135m"
# Seconds one client request may take, connect to last token. A chat of a few tokens
# takes well under a second; a request queued behind a node stopped for 10 s (SIGSTOP)
# still fits. Past it, the request counts as hung.
REQUEST_TIMEOUT_S = 25.0


# ---------------------------------------------------------------- the client


@dataclass
class Outcome:
    start: float  # time.monotonic()
    end: float
    target: str  # the peer the client asked
    kind: str  # "ok" | "rejected" (clear 503/429) | "broken" (clear error event) | "bad"
    detail: str = ""
    replica: str = ""  # who served it (X-Aivailable-Replica), when it succeeded

    @property
    def seconds(self) -> float:
        return self.end - self.start


def _clear_error(body: object) -> str | None:
    """The message of an OpenAI-style error body ({"error": {"message": ...}}), or None."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    if isinstance(body, dict) and isinstance(body.get("message"), str) and body["message"]:
        return body["message"]
    return None


def chat_once(url: str, name: str, max_tokens: int = 8) -> Outcome:
    """One streaming chat through the peer at `url`; never raises."""
    client = openai.OpenAI(
        base_url=url + "/v1",
        api_key=os.environ.get("AIVAILABLE_API_KEY", "chaos"),  # see Cluster.__post_init__
        max_retries=0,
        timeout=REQUEST_TIMEOUT_S,
    )
    start = time.monotonic()
    kind, detail, replica = "bad", "", ""
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
        )
        replica = raw.headers.get("x-aivailable-replica", "")
        finish = None
        text = ""
        for chunk in raw.parse():
            if time.monotonic() - start > REQUEST_TIMEOUT_S:
                raise TimeoutError("the stream ran past the request timeout")
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        if finish is None:
            kind, detail = "bad", f"stream ended without a finish_reason after {text!r}"
        else:
            kind, detail = "ok", text
    except openai.APIStatusError as exc:
        message = _clear_error(exc.body) or _clear_error(_json_or_none(exc.response))
        if exc.status_code in (503, 429) and message:
            kind, detail = "rejected", f"{exc.status_code}: {message}"
        else:
            kind, detail = "bad", f"{exc.status_code}: {exc.response.text[:300]}"
    except (openai.APITimeoutError, TimeoutError) as exc:
        kind, detail = "bad", f"hung: {exc!r}"
    except openai.APIConnectionError as exc:
        kind, detail = "bad", f"connection failed: {exc!r} ({exc.__cause__!r})"
    except openai.APIError as exc:  # an error event inside the stream
        message = _clear_error(exc.body)
        kind = "broken" if message else "bad"
        detail = message or repr(exc)
    finally:
        client.close()
    end = time.monotonic()
    if kind != "bad" and end - start > REQUEST_TIMEOUT_S:
        kind, detail = "bad", f"took {end - start:.1f}s: {detail}"
    return Outcome(start, end, name, kind, detail, replica)


def _json_or_none(response) -> object:
    try:
        return response.json()
    except ValueError:
        return None


class ClientLoad:
    """Streams chats to `target` (a PeerProcess, changeable at any time) until stopped."""

    def __init__(self, target: PeerProcess, pause_s: float = 0.25):
        self.target = target
        self.pause_s = pause_s
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-client", daemon=True)

    def __enter__(self) -> ClientLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(REQUEST_TIMEOUT_S + 5)
        assert not self._thread.is_alive(), "the client thread is stuck past its timeout"

    def _run(self) -> None:
        while not self._stop.is_set():
            peer = self.target
            self.outcomes.append(chat_once(peer.url, peer.name))
            self._stop.wait(self.pause_s)

    def since(self, t: float) -> list[Outcome]:
        return [o for o in list(self.outcomes) if o.start >= t]

    def wait_success(self, after: float, timeout: float, what: str = "a successful chat") -> float:
        """Seconds from `after` until a request started after it succeeded."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for o in self.since(after):
                if o.kind == "ok":
                    return o.end - after
            time.sleep(0.1)
        raise AssertionError(f"no {what} within {timeout}s: {self.summary(after)}")

    def summary(self, after: float = 0.0) -> str:
        counts: dict[str, int] = defaultdict(int)
        for o in self.since(after):
            counts[o.kind] += 1
        bad = [f"{o.target}: {o.detail}" for o in self.since(after) if o.kind == "bad"][:5]
        return f"{dict(counts)} {bad if bad else ''}"

    def report(self) -> str:
        """One line per request, times from the first: for a failing test's output."""
        outcomes = list(self.outcomes)
        t0 = outcomes[0].start if outcomes else 0.0
        return "\n".join(
            f"  {o.start - t0:+7.2f}s {o.seconds:5.2f}s {o.target}->{o.replica or '-'} "
            f"{o.kind}: {o.detail[:160]}"
            for o in outcomes
        )

    def assert_clean(self, min_ok: int = 1) -> None:
        """Every request succeeded or failed with a clear error, none hung."""
        outcomes = list(self.outcomes)
        bad = [o for o in outcomes if o.kind == "bad"]
        assert not bad, "requests that neither succeeded nor failed clearly:\n" + "\n".join(
            f"  +{o.seconds:.1f}s via {o.target}: {o.detail}" for o in bad
        )
        ok = sum(o.kind == "ok" for o in outcomes)
        assert ok >= min_ok, f"only {ok} requests succeeded: {self.summary()}"
        slowest = max((o.seconds for o in outcomes), default=0.0)
        assert slowest <= REQUEST_TIMEOUT_S, f"a request took {slowest:.1f}s"


# ---------------------------------------------------------------- the Raft watcher


@dataclass
class Seen:
    at: float
    peer: str
    term: int
    leader: str | None
    dead: tuple[str, ...] = ()  # nodes this peer's gossip view showed dead


class StatusWatcher:
    """Polls every peer's /cluster/status (one thread each) and keeps what it saw."""

    def __init__(self, peers: list[PeerProcess], interval_s: float = 0.25):
        self.peers = peers
        self.interval_s = interval_s
        self.seen: list[Seen] = []
        self.latest: dict[str, tuple[float, dict]] = {}
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._poll, args=(p,), name=f"watch-{p.name}", daemon=True)
            for p in peers
        ]

    def __enter__(self) -> StatusWatcher:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)

    def _poll(self, peer: PeerProcess) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                status = get_json(peer.url + "/cluster/status", timeout=2)
                now = time.monotonic()
                self.latest[peer.name] = (now, status)
                dead = tuple(n["id"] for n in status["nodes"] if n["state"] == "dead")
                self.seen.append(Seen(now, peer.name, status["term"], status["leader"], dead))
            self._stop.wait(self.interval_s)

    def leaders_by_term(self) -> dict[int, set[str]]:
        by_term: dict[int, set[str]] = defaultdict(set)
        for s in list(self.seen):
            if s.leader:
                by_term[s.term].add(s.leader)
        return dict(by_term)

    def ever_dead(self) -> set[str]:
        """Nodes some peer's gossip view showed dead at some point."""
        return {n for s in list(self.seen) for n in s.dead}

    def assert_one_leader_per_term(self) -> None:
        split = {t: ls for t, ls in self.leaders_by_term().items() if len(ls) > 1}
        assert not split, f"terms with two leaders: {split}"
        assert self.leaders_by_term(), "no peer ever reported a leader"


# ---------------------------------------------------------------- the cluster


@dataclass
class Cluster:
    """Real peers. `hosts` (netns.Host) puts peer i in namespace i; else all on loopback."""

    base: Path
    gpus: list[list[str]]  # per node: extra `up` flags (--gpu fake:..., --cpu no)
    hosts: list | None = None
    config: str | None = None  # TOML text for --config ([gossip]/[raft] overrides)
    mdns: bool = False  # loopback peers join by --join unless this is set
    peers: list[PeerProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        key = self.base / "cluster.key"
        # Peers in namespaces bind LAN addresses, so auth is on there: one admin key, made
        # here for the founder to commit, which this process's calls send (get_json and
        # chat_once read $AIVAILABLE_API_KEY; close() restores it). Loopback peers ignore it.
        admin = self.base / "admin.key"
        if not admin.exists():
            write_key_file(admin, new_secret())
        self._saved_key = os.environ.get("AIVAILABLE_API_KEY")
        os.environ["AIVAILABLE_API_KEY"] = admin.read_text().strip()
        extra: list[str] = ["--cluster-key-file", str(key), "--n-ctx", "512"]
        extra += ["--admin-key-file", str(admin)]
        if self.config:
            path = self.base / "chaos.toml"
            path.write_text(self.config)
            extra += ["--config", str(path)]
        seed = f"127.0.0.1:{free_port()}"
        for i, flags in enumerate(self.gpus):
            name = f"n{i}"
            if self.hosts is not None:  # mDNS inside the lab network finds the others
                host = self.hosts[i]
                peer = PeerProcess(
                    self.base, name, *extra, *flags, host=host.addr, prefix=host.exec_prefix()
                )
            elif self.mdns:
                peer = PeerProcess(self.base, name, *extra, *flags)
            else:  # loopback: everyone joins the founder by address
                port = int(seed.rsplit(":", 1)[1]) if i == 0 else None
                join = [] if i == 0 else ["--join", seed]
                peer = PeerProcess(self.base, name, *extra, *flags, "--no-mdns", *join, port=port)
            self.peers.append(peer)

    def __getitem__(self, name: str) -> PeerProcess:
        return next(p for p in self.peers if p.name == name)

    def start(self, timeout: float = 120) -> Cluster:
        """Start the founder first (lowest id founds), then the rest; wait for every voter
        and a ready instance of the model."""
        self.peers[0].start()
        self.peers[0].wait_healthy()
        for p in self.peers[1:]:
            p.start()
        for p in self.peers:
            p.wait_healthy()
        want = min(len(self.peers), 5 if len(self.peers) >= 5 else 3)
        self.peers[0].wait_until(
            lambda: (
                len(self.peers[0].status()["voters"]) >= want
                and all(len(alive(p.status())) == len(self.peers) for p in self.peers)
            ),
            timeout,
            f"{want} voters and every peer alive",
        )
        self.wait_ready(self.peers[0], timeout=timeout)
        return self

    def wait_ready(self, via: PeerProcess, model: str = MODEL, timeout: float = 90, avoid=()):
        """Wait until `via` sees a ready placement of `model` on a node not in `avoid`;
        returns that node's id."""
        found: list[str] = []

        def ready() -> bool:
            found[:] = [n for n in ready_hosts(via.status(), model) if n not in avoid]
            return bool(found)

        via.wait_until(ready, timeout, f"a ready {model} off {list(avoid)}")
        return found[0]

    def running(self) -> list[PeerProcess]:
        return [p for p in self.peers if p.proc is not None and p.proc.poll() is None]

    def kill9(self, peer: PeerProcess) -> list[int]:
        """kill -9 `peer`; returns the pids of its model workers (now orphans)."""
        workers = children(peer.pid)
        peer.signal(signal.SIGKILL)
        peer.proc.wait(10)
        return workers

    def stop_all(self, timeout: float = 20) -> dict[str, int | None]:
        """SIGTERM every running peer at once (one signal each: a second one during the
        graceful shutdown would find Python's default handler back); SIGKILL whoever is
        still there after `timeout`. Returns each one's exit code."""
        running = self.running()
        for p in running:
            p.signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
            p.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        codes: dict[str, int | None] = {}
        for p in running:
            try:
                codes[p.name] = p.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.signal(signal.SIGKILL)
                codes[p.name] = p.proc.wait(5)
        return codes

    def close(self) -> None:
        """End every peer this cluster started, and their model workers."""
        workers = [w for p in self.running() for w in children(p.pid)]
        with contextlib.suppress(Exception):
            self.stop_all(timeout=10)
        wait_gone(workers, 10, kill=True)
        if self._saved_key is None:
            os.environ.pop("AIVAILABLE_API_KEY", None)
        else:
            os.environ["AIVAILABLE_API_KEY"] = self._saved_key


def print_log_tails(peers: list[PeerProcess], chars: int = 4000) -> None:
    """Each peer's last log lines, for a failing test's report."""
    for p in peers:
        with contextlib.suppress(OSError):
            print(f"---- {p.name} ({p.url}) log tail ----\n{p.log()[-chars:]}")


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def wait_gone(pids: list[int], timeout: float, kill: bool = False) -> list[int]:
    """Wait until these pids exit; returns those still there (SIGKILLed if `kill`)."""
    deadline = time.monotonic() + timeout
    left = list(pids)
    while left and time.monotonic() < deadline:
        left = [p for p in left if _alive(p)]
        time.sleep(0.1)
    if kill:
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    return left


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# ---------------------------------------------------------------- status readers


def alive(status: dict) -> list[str]:
    return [n["id"] for n in status["nodes"] if n["state"] == "alive"]


def ready_hosts(status: dict, model: str = MODEL) -> list[str]:
    for m in status["models"]:
        if m["name"] == model:
            return [p["node"] for p in m["placements"] if p["state"] == "ready"]
    return []


def plan_of(status: dict) -> dict:
    """The committed desired state and plan as one peer reports it: model -> placements."""
    return {
        m["name"]: sorted((p["node"], tuple(p["gpus"])) for p in m["placements"])
        for m in status["models"]
    }


def wait_one_plan(peers: list[PeerProcess], timeout: float = 60) -> dict:
    """Wait until these peers agree on the leader, the term and the plan; returns the plan."""
    deadline = time.monotonic() + timeout
    last: dict = {}
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, KeyError):
            views = {p.name: p.status() for p in peers}
            last = {
                n: (s["leader"], s["term"], plan_of(s), sorted(alive(s))) for n, s in views.items()
            }
            if len({repr(v) for v in last.values()}) == 1:
                leader, _, plan, _ = next(iter(last.values()))
                if leader and all(plan.values()):
                    return plan
        time.sleep(0.25)
    raise AssertionError(f"the peers never agreed on one plan: {last}")
