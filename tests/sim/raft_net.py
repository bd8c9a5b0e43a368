"""A synchronous, lossless-by-default network of RaftNodes for scenario tests (etcd-raft's
`network` in raft_test.go): messages are delivered in order until none are left, unless a link
is cut. Deterministic and instant, so a test reads like the paper's description."""

from __future__ import annotations

from random import Random

from consensus import MemoryStorage, RaftNode
from consensus.types import Message


class SyncNetwork:
    def __init__(self, ids=("n1", "n2", "n3"), voters=None, learners=(), seed=0, **node_kwargs):
        self.ids = list(ids)
        self.voters = tuple(voters) if voters is not None else tuple(self.ids)
        self.learners = tuple(learners)
        self.seed = seed
        self.node_kwargs = node_kwargs
        self.storages = {i: MemoryStorage() for i in self.ids}
        self.nodes: dict[str, RaftNode] = {}
        self.applied: dict[str, list] = {i: [] for i in self.ids}
        self.read_states: dict[str, list] = {i: [] for i in self.ids}
        self.cut: set[tuple[str, str]] = set()
        self.down: set[str] = set()
        self.sent: list[Message] = []  # every message that left a node, for assertions
        for i in self.ids:
            self.start(i)

    def start(self, nid: str) -> RaftNode:
        self.nodes[nid] = RaftNode(
            nid,
            self.storages[nid],
            voters=self.voters,
            learners=self.learners,
            rng=Random(f"{self.seed}/{nid}"),
            **self.node_kwargs,
        )
        self.down.discard(nid)
        self.applied[nid] = []
        return self.nodes[nid]

    def add_node(self, nid: str, **kwargs) -> RaftNode:
        """A brand-new server with empty storage (to be added by a conf change)."""
        self.ids.append(nid)
        self.storages[nid] = MemoryStorage()
        self.applied[nid] = []
        self.read_states[nid] = []
        self.nodes[nid] = RaftNode(nid, self.storages[nid], voters=(), rng=Random(nid), **kwargs)
        return self.nodes[nid]

    def crash(self, nid: str) -> None:
        self.down.add(nid)

    def isolate(self, nid: str) -> None:
        for other in self.ids:
            if other != nid:
                self.cut |= {(nid, other), (other, nid)}

    def heal(self) -> None:
        self.cut.clear()

    def __getitem__(self, nid: str) -> RaftNode:
        return self.nodes[nid]

    def collect(self, nid: str) -> list[Message]:
        """Run node nid's Ready loop once: save, apply, advance; return its outgoing messages."""
        node = self.nodes[nid]
        out: list[Message] = []
        while node.has_ready():
            rd = node.ready()
            self.storages[nid].save(rd)
            out.extend(rd.messages)
            self.applied[nid].extend(rd.committed)
            self.read_states[nid].extend(rd.read_states)
            node.advance(rd)
        self.sent.extend(out)
        return out

    def deliver(self, *msgs: Message) -> None:
        """Deliver msgs and everything they cause, until the network is quiet."""
        queue = list(msgs)
        for nid in self.ids:
            if nid not in self.down:
                queue.extend(self.collect(nid))
        while queue:
            m = queue.pop(0)
            if m.dst in self.down or m.src in self.down or (m.src, m.dst) in self.cut:
                continue
            if m.dst not in self.nodes:
                continue
            self.nodes[m.dst].step(m)
            queue.extend(self.collect(m.dst))

    def tick(self, nid: str | None = None, n: int = 1) -> None:
        for _ in range(n):
            for i in [nid] if nid else self.ids:
                if i not in self.down:
                    self.nodes[i].tick()
            self.deliver()

    def elect(self, nid: str) -> RaftNode:
        self.nodes[nid].campaign()
        self.deliver()
        return self.nodes[nid]

    def propose(self, nid: str, data: bytes) -> int:
        index = self.nodes[nid].propose(data)
        self.deliver()
        return index
