"""A scripted-scenario runner over RaftNode in the style of etcd-raft's testdata/*.txt.

A scenario file is a sequence of blocks: a command line (and `#` comments before it), a `----`
line, then the output that command printed. `run_file` replays every command and returns the
file as it should read; the test compares it with the checked-in file, and with
AIVAILABLE_REWRITE=1 writes it back (to record a new or changed scenario).

Commands (node ids are names; every node uses MemoryStorage and Random(id)):
  nodes n1 n2 n3 [learners=n4] [pre_vote=false] [check_quorum=false] [election=10]
  add-node n4                   a brand-new, empty node (to be added by a conf change)
  campaign n1                   start an election now
  tick n1 [count]               logical clock ticks (several nodes: `tick n1,n2 3`)
  propose n1 DATA
  conf-change n1 add|promote|remove n4 [learner]
  transfer n1 n2                leadership transfer to n2
  compact n1 INDEX              snapshot the state machine at INDEX
  read-index n1 CONTEXT         ask for a linearizable read (ReadIndex)
  partition n1 / n2 n3          cut every link between the groups (messages are dropped)
  heal
  process-ready n1              print one Ready of n1, save it, queue its messages, advance
  deliver n1                    step every queued message to n1, printing them
  stabilize                     process-ready and deliver everywhere until quiet
  status n1                     role, term, leader, commit, and the leader's progress
  log n1                        the entries in n1's log
"""

from __future__ import annotations

import shlex
from pathlib import Path
from random import Random

from consensus import MemoryStorage, RaftNode, Ready
from consensus.types import CONF, Entry, Message, decode_conf


def fmt_entry(e: Entry) -> str:
    if e.kind == CONF:
        conf = decode_conf(e.data)
        learners = f" learners={','.join(conf.learners)}" if conf.learners else ""
        return f"{e.term}/{e.index} conf voters={','.join(conf.voters)}{learners}"
    if e.kind == "noop":
        return f"{e.term}/{e.index} noop"
    return f"{e.term}/{e.index} {e.kind} {e.data.decode(errors='replace')!r}"


def fmt_message(m: Message) -> str:
    parts = [f"{m.src}->{m.dst} {m.type} term={m.term}"]
    for name in ("log_term", "index", "commit", "reject_hint"):
        if getattr(m, name):
            parts.append(f"{name}={getattr(m, name)}")
    if m.reject:
        parts.append("rejected")
    if m.force:
        parts.append("force")
    if m.context:
        parts.append(f"context={m.context.decode(errors='replace')}")
    if m.entries:
        parts.append("entries=[" + ", ".join(fmt_entry(e) for e in m.entries) + "]")
    if m.snapshot is not None:
        parts.append(f"snapshot={m.snapshot.term}/{m.snapshot.index}")
    return " ".join(parts)


class Transcript:
    def __init__(self) -> None:
        self.nodes: dict[str, RaftNode] = {}
        self.storages: dict[str, MemoryStorage] = {}
        self.inbox: dict[str, list[Message]] = {}
        self.cut: set[tuple[str, str]] = set()
        self.soft: dict[str, tuple] = {}  # the role/term/leader last printed per node
        self.options: dict = {}
        self.out: list[str] = []

    def say(self, line: str) -> None:
        self.out.append(line)

    def run(self, line: str) -> str:
        self.out = []
        words = shlex.split(line)
        getattr(self, "cmd_" + words[0].replace("-", "_"))(*words[1:])
        return "\n".join(self.out) if self.out else "ok"

    # ---- building the cluster

    def _new_node(self, nid: str, voters=(), learners=()) -> None:
        self.storages[nid] = MemoryStorage()
        self.nodes[nid] = RaftNode(
            nid,
            self.storages[nid],
            voters=voters,
            learners=learners,
            rng=Random(nid),
            **self.options,
        )
        self.inbox[nid] = []

    def cmd_nodes(self, *args: str) -> None:
        ids = [a for a in args if "=" not in a]
        opts = dict(a.split("=", 1) for a in args if "=" in a)
        learners = tuple(opts.pop("learners", "").split(",")) if "learners" in opts else ()
        self.options = {
            "pre_vote": opts.get("pre_vote", "true") == "true",
            "check_quorum": opts.get("check_quorum", "true") == "true",
            "election_ticks": int(opts.get("election", "10")),
        }
        for nid in ids + list(learners):
            self._new_node(nid, tuple(ids), learners)
        self.cmd_status(*self.nodes)

    def cmd_add_node(self, nid: str) -> None:
        self._new_node(nid)

    # ---- the application's calls

    def cmd_campaign(self, nid: str) -> None:
        self.nodes[nid].campaign()

    def cmd_tick(self, nids: str, count: str = "1") -> None:
        for _ in range(int(count)):
            for nid in nids.split(","):
                self.nodes[nid].tick()

    def cmd_propose(self, nid: str, data: str) -> None:
        self.say(f"index {self.nodes[nid].propose(data.encode())}")

    def cmd_conf_change(self, nid: str, op: str, target: str, kind: str = "voter") -> None:
        index = self.nodes[nid].propose_conf_change(op, target, voter=kind != "learner")
        self.say(f"index {index}")

    def cmd_transfer(self, nid: str, to: str) -> None:
        self.nodes[nid].transfer_leadership(to)

    def cmd_compact(self, nid: str, index: str) -> None:
        snap = self.nodes[nid].compact(int(index), b"state@" + index.encode())
        self.say(f"snapshot {snap.term}/{snap.index}")

    def cmd_read_index(self, nid: str, context: str) -> None:
        self.nodes[nid].read_index(context.encode())

    def cmd_partition(self, *args: str) -> None:
        groups, group = [], []
        for a in [*args, "/"]:
            if a == "/":
                groups.append(group)
                group = []
            else:
                group.append(a)
        for i, g in enumerate(groups):
            for h in groups[i + 1 :]:
                self.cut |= {(a, b) for a in g for b in h} | {(b, a) for a in g for b in h}

    def cmd_heal(self) -> None:
        self.cut.clear()

    # ---- the Ready loop and the network

    def cmd_process_ready(self, nid: str) -> None:
        node = self.nodes[nid]
        if not node.has_ready():
            return
        rd = node.ready()
        self.say(f"> {nid} handling Ready")
        self._print_ready(nid, rd)
        self.storages[nid].save(rd)
        for m in rd.messages:
            if (m.src, m.dst) in self.cut or m.dst not in self.nodes:
                self.say(f"  dropped: {fmt_message(m)}")
            else:
                self.inbox[m.dst].append(m)
        node.advance(rd)

    def _print_ready(self, nid: str, rd: Ready) -> None:
        soft = (rd.role, rd.term, rd.leader_id)
        if self.soft.get(nid) != soft:
            self.soft[nid] = soft
            self.say(f"  State: {rd.role} term={rd.term} lead={rd.leader_id}")
        if rd.hard_state is not None:
            hs = rd.hard_state
            self.say(f"  HardState term={hs.term} vote={hs.vote} commit={hs.commit}")
        for title, snap in (("Snapshot", rd.snapshot), ("Restore", rd.restore)):
            if snap is not None and snap.index > 0:
                self.say(f"  {title} {snap.term}/{snap.index} voters={','.join(snap.conf.voters)}")
        for title, items, fmt in (
            ("Entries", rd.entries, fmt_entry),
            ("Messages", rd.messages, fmt_message),
            ("Committed", rd.committed, fmt_entry),
        ):
            if items:
                self.say(f"  {title}:")
                self.out.extend(f"    {fmt(x)}" for x in items)
        for state in rd.read_states:
            self.say(f"  ReadState index={state.index} context={state.context.decode()}")

    def cmd_deliver(self, nid: str) -> None:
        msgs, self.inbox[nid] = self.inbox[nid], []
        if msgs:
            self.say(f"> {nid} receiving messages")
        for m in msgs:
            if (m.src, m.dst) in self.cut:
                self.say(f"  dropped: {fmt_message(m)}")
                continue
            self.say(f"  {fmt_message(m)}")
            self.nodes[nid].step(m)

    def cmd_stabilize(self) -> None:
        while True:
            busy = False
            for nid in self.nodes:
                while self.nodes[nid].has_ready():
                    busy = True
                    self.cmd_process_ready(nid)
            for nid in self.nodes:
                if self.inbox[nid]:
                    busy = True
                    self.cmd_deliver(nid)
            if not busy:
                return

    # ---- looking

    def cmd_status(self, *nids: str) -> None:
        for nid in nids:
            n = self.nodes[nid]
            self.say(
                f"{nid}: {n.role} term={n.term} lead={n.leader_id} commit={n.commit_index} "
                f"last={n.last_index} voters={','.join(n.voters)}"
                + (f" learners={','.join(n.learners)}" if n.learners else "")
            )
            for peer, pr in sorted(n.progress.items()):
                self.say(f"  {peer}: {pr.state} match={pr.match} next={pr.next}")

    def cmd_log(self, nid: str) -> None:
        log = self.nodes[nid].log
        if log.snap_index:
            self.say(f"snapshot {log.snap_term}/{log.snap_index}")
        self.out.extend(fmt_entry(e) for e in log.entries)


def parse(text: str) -> list[tuple[list[str], str, str]]:
    """Blocks of (comment lines, command, expected output)."""
    blocks, comments, lines = [], [], text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip() or line.startswith("#"):
            comments.append(line)
            i += 1
            continue
        assert lines[i + 1] == "----", f"line {i + 2}: expected ---- after the command {line!r}"
        j = i + 2
        while j < len(lines) and lines[j].strip():
            j += 1
        blocks.append((comments, line, "\n".join(lines[i + 2 : j])))
        comments, i = [], j
    return blocks


def run_file(path: Path) -> tuple[str, str]:
    """(the file as checked in, the file as the commands print it now)."""
    text = path.read_text()
    t = Transcript()
    out = []
    for comments, command, _ in parse(text):
        out.extend(comments)
        out.extend([command, "----", t.run(command)])
    return text, "\n".join(out).strip("\n") + "\n"
