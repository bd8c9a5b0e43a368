"""The parts of the Jepsen-style test (tests/chaos/test_jepsen.py): clients that record a
history of deploy, undeploy and read operations on real peers, and a nemesis that kills,
pauses and partitions them.

An operation's outcome is classified from what the server guarantees, never hoped:
- ok: the peer answered with the result (a deploy's 202, an undeploy's 200 or 404, a
  consistent read's 200);
- fail: the request never reached a peer (the connection was refused or could not be
  made), or a 400 (a request the API refuses before proposing anything); it did not happen;
- unknown: anything after the request was sent and before a clear answer (a timeout, a
  reset, a 503: the proposer may have handed the command to a leader that commits it
  later). It may take effect at any time after its invocation, or never.
"""

from __future__ import annotations

import http.client
import json
import random
import signal
import threading
import time
from dataclasses import dataclass, field

from aivailable.http_client import auth_headers
from aivailable.local_peers import PeerProcess
from tests.linearizability import Operation

SOURCE = "builtin:smollm2-135m"  # never placed: every peer is routing-only (--cpu no)
NOT_SENT = -1  # a status for "the connection was never made"
LOST = -2  # a status for "sent, then no answer" (timeout, reset)


def request(
    peer: PeerProcess, method: str, path: str, body: dict | None, timeout: float
) -> tuple[int, object]:
    """(HTTP status, JSON body), or (NOT_SENT, why) if no connection was made, or
    (LOST, why) if the request may have arrived but no answer came."""
    conn = http.client.HTTPConnection(peer.host, peer.port, timeout=timeout)
    try:
        try:
            conn.connect()
        except OSError as exc:
            return NOT_SENT, repr(exc)
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json", **auth_headers()}
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            return LOST, repr(exc)
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw[:200].decode(errors="replace")
    finally:
        conn.close()


@dataclass
class Recorded:
    """One client operation as the history keeps it, plus what the test prints."""

    client: int
    peer: str
    op: Operation
    detail: str = ""

    def line(self, t0: float) -> str:
        o = self.op
        end = "      ?" if o.ret is None else f"{o.ret - t0:7.3f}"
        result = "" if o.result is None else f" -> {_show(o.result)}"
        return (
            f"  c{self.client} {o.call - t0:7.3f}..{end} via {self.peer:3} "
            f"{o.kind}({_show(o.arg)}){result} {self.detail}"
        )


def _show(value: object) -> str:
    if isinstance(value, frozenset):
        return "{" + ", ".join(f"{k}={v}" for k, v in sorted(value)) + "}"
    return "" if value is None else str(value)


@dataclass
class History:
    keys: tuple[str, ...]
    ops: list[Recorded] = field(default_factory=list)
    failed: dict[str, int] = field(default_factory=dict)  # kind -> count (not in the history)
    why_failed: dict[str, int] = field(default_factory=dict)  # "kind: reason" -> count
    unexpected: list[tuple[float, str]] = field(default_factory=list)  # answers the API
    # should never give (a 401, a 400 to a valid request, ...), with when they were asked
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _value: int = 127  # the next deploy's value: each deploy writes a value of its own

    def next_value(self) -> int:
        with self._lock:
            self._value += 1
            return self._value

    def add(self, rec: Recorded | None, kind: str, failed: str = "") -> None:
        with self._lock:
            if rec is not None:
                self.ops.append(rec)
            if failed:
                self.failed[kind] = self.failed.get(kind, 0) + 1
                why = f"{kind}: {failed}"
                self.why_failed[why] = self.why_failed.get(why, 0) + 1

    def add_unexpected(self, call: float, what: str) -> None:
        with self._lock:
            self.unexpected.append((call, what))

    def operations(self) -> list[Operation]:
        return [r.op for r in self.ops]

    def count(self, kind: str, outcome: str) -> int:
        def is_(o: Operation) -> bool:
            return o.ret is None if outcome == "unknown" else o.ret is not None

        return sum(1 for r in self.ops if r.op.kind == kind and is_(r.op))

    def summary(self) -> str:
        parts = []
        for kind in ("deploy", "undeploy", "read"):
            parts.append(
                f"{kind}: {self.count(kind, 'ok')} ok, {self.failed.get(kind, 0)} failed, "
                f"{self.count(kind, 'unknown')} unknown"
            )
        return "; ".join(parts)

    def report(self, ops: list[Operation] | None = None, last: int = 60) -> str:
        """The recorded operations (those in `ops`, else all), by call time, the last `last`."""
        chosen = self.ops if ops is None else [r for r in self.ops if r.op in set(ops)]
        chosen = sorted(chosen, key=lambda r: r.op.call)
        t0 = min((r.op.call for r in self.ops), default=0.0)
        return "\n".join(r.line(t0) for r in chosen[-last:])


def deployed(status: dict, keys: tuple[str, ...]) -> frozenset:
    """The map a /cluster/status body shows, for these names: {(name, value)}."""
    return frozenset((m["name"], m["n_ctx"]) for m in status["models"] if m["name"] in keys)


def _reason(status: int, body: object) -> str:
    if status == NOT_SENT:
        return "not sent (" + str(body).split("(", 1)[0] + ")"
    if status == LOST:
        return "no answer (" + str(body).split("(", 1)[0] + ")"
    return str(status)


class Client(threading.Thread):
    """Deploys, undeploys and reads through a random peer each time, until stopped."""

    def __init__(self, idx: int, peers, history: History, rng: random.Random, timeout: float):
        super().__init__(name=f"jepsen-client-{idx}", daemon=True)
        self.idx, self.peers, self.history, self.rng = idx, peers, history, rng
        self.timeout = timeout
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            peer = self.rng.choice(self.peers)
            key = self.rng.choice(self.history.keys)
            r = self.rng.random()
            if r < 0.4:
                self.read(peer)
            elif r < 0.75:
                self.deploy(peer, key, self.history.next_value())
            else:
                self.undeploy(peer, key)
            self.stop.wait(self.rng.uniform(0.02, 0.12))

    def _record(self, peer, kind, arg, call, status, body, result=None, ok=False) -> None:
        ret = time.monotonic()
        h = self.history
        if not ok and status not in (NOT_SENT, LOST, 503):
            h.add_unexpected(call, f"{kind}({_show(arg)}) via {peer.name}: {status} {body}")
        if ok:
            h.add(Recorded(self.idx, peer.name, Operation(call, ret, kind, arg, result)), kind)
        elif status == NOT_SENT or status == 400 or kind == "read":
            # Not applied (never sent, or refused before any proposal), or a read that did
            # not answer, which tells nothing: left out of the history.
            h.add(None, kind, failed=_reason(status, body))
        else:
            detail = f"[{status if status > 0 else 'lost'}: {str(body)[:80]}]"
            h.add(Recorded(self.idx, peer.name, Operation(call, None, kind, arg), detail), kind)

    def deploy(self, peer, key: str, value: int) -> None:
        body = {"name": key, "source": SOURCE, "replicas": 1, "n_ctx": value}
        call = time.monotonic()
        status, answer = request(peer, "POST", "/cluster/models", body, self.timeout)
        self._record(peer, "deploy", (key, value), call, status, answer, ok=status == 202)

    def undeploy(self, peer, key: str) -> None:
        call = time.monotonic()
        status, answer = request(peer, "DELETE", f"/cluster/models/{key}", None, self.timeout)
        ok = status in (200, 404)
        self._record(peer, "undeploy", key, call, status, answer, status == 200, ok=ok)

    def read(self, peer) -> None:
        call = time.monotonic()
        status, answer = request(peer, "GET", "/cluster/status?consistent=1", None, self.timeout)
        ok = status == 200 and isinstance(answer, dict) and answer.get("linearizable") is True
        seen = deployed(answer, self.history.keys) if ok else None
        self._record(peer, "read", None, call, status, answer, seen, ok=ok)


class Nemesis(threading.Thread):
    """Cycles through kill -9 (and a restart on the same data dir), SIGSTOP/SIGCONT, a
    partition of one node and of a minority, each held a few seconds, then healed, until
    stopped. The test process still reaches partitioned peers (`watchable`), so clients
    talk to the cut-off side too. `log` is what it did, with times."""

    FAULTS = ("kill", "pause", "partition-one", "partition-minority")

    def __init__(self, cluster, lab, rng: random.Random, hold=(2.5, 4.5), rest=(1.5, 3.0)):
        super().__init__(name="jepsen-nemesis", daemon=True)
        self.cluster, self.lab, self.rng = cluster, lab, rng
        self.hold, self.rest = hold, rest
        self.host_of = {p.name: h for p, h in zip(cluster.peers, lab.hosts, strict=True)}
        self.stop = threading.Event()
        self.log: list[tuple[float, str]] = []
        self.counts: dict[str, int] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            i = 0
            while not self.stop.is_set():
                fault = self.FAULTS[i % len(self.FAULTS)]
                i += 1
                self._do(fault)
                self.stop.wait(self.rng.uniform(*self.rest))
        except BaseException as exc:  # shown by the test
            self.error = exc
        finally:
            self.heal_all()

    def _note(self, what: str) -> None:
        self.log.append((time.monotonic(), what))

    def _victims(self, n: int) -> list[PeerProcess]:
        """n peers at random; half the time the leader is one of them (where a fault hurts
        most: proposals in flight, reads it must confirm)."""
        peers = sorted(self.cluster.peers, key=lambda p: p.name)
        chosen = self.rng.sample(peers, n)
        if self.rng.random() < 0.5:
            leader = self._leader()
            if leader is not None and leader not in chosen:
                chosen[0] = leader
                self.counts["leader hit"] = self.counts.get("leader hit", 0) + 1
        return sorted(chosen, key=lambda p: p.name)

    def _leader(self) -> PeerProcess | None:
        """The leader, as the first peer that answers says."""
        for p in self.cluster.peers:
            status, body = request(p, "GET", "/cluster/status", None, 1.0)
            if status == 200 and isinstance(body, dict) and body.get("leader"):
                return next((q for q in self.cluster.peers if q.name == body["leader"]), None)
        return None

    def _do(self, fault: str) -> None:
        hold = self.rng.uniform(*self.hold)
        minority = (len(self.cluster.peers) - 1) // 2
        victims = self._victims(1 if fault != "partition-minority" else minority)
        names = ",".join(p.name for p in victims)
        self._note(f"{fault} {names} for {hold:.1f}s")
        self.counts[fault] = self.counts.get(fault, 0) + 1
        if fault == "kill":
            (p,) = victims
            p.signal(signal.SIGKILL)
            p.proc.wait(10)
            self.stop.wait(hold)
            p.start()
            self._note(f"restarted {p.name}")
        elif fault == "pause":
            (p,) = victims
            p.signal(signal.SIGSTOP)
            self.stop.wait(hold)
            p.signal(signal.SIGCONT)
            self._note(f"resumed {p.name}")
        else:
            hosts = [self.host_of[p.name] for p in victims]
            if len(hosts) == 1:
                self.lab.partition(hosts[0], watchable=True)
            else:
                self.lab.isolate_group(hosts, watchable=True)
            self.stop.wait(hold)
            for h in hosts:
                self.lab.heal(h)
            self._note(f"healed {names}")

    def heal_all(self) -> None:
        for p in self.cluster.peers:
            p.signal(signal.SIGCONT)
        for h in self.lab.hosts:
            self.lab.heal(h)

    def report(self, t0: float) -> str:
        return "\n".join(f"  {t - t0:7.3f} nemesis: {what}" for t, what in self.log)
