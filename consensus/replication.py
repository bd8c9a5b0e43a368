"""The leader's side of log replication (paper 5.3, 7), pure: plain functions on a RaftNode.

RaftNode (core.py) keeps the roles, elections and the follower's side; what a leader does to
bring each follower's log up to its own lives here: appending its entries, sending
AppendEntries, heartbeats and snapshots as each follower's Progress allows, handling the
answers, and advancing the commit index once a quorum of voters holds an entry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .progress import PROBE, REPLICATE, SNAPSHOT, Progress
from .types import (
    APP,
    APP_RESP,
    HEARTBEAT,
    HEARTBEAT_RESP,
    LEADER,
    SNAP,
    TIMEOUT_NOW,
    Entry,
    Message,
)

if TYPE_CHECKING:
    from .core import RaftNode


def tick(node: RaftNode) -> None:
    """The leader's replication timers: resend a lost snapshot, send heartbeats when due."""
    for peer, pr in node.progress.items():
        if pr.state == SNAPSHOT:
            pr.snapshot_wait += 1
            if pr.snapshot_wait >= node.election_ticks:  # the snapshot was probably lost
                pr.become_probe()
                maybe_send_append(node, peer)
    if node.heartbeat_elapsed >= node.heartbeat_ticks:
        node.heartbeat_elapsed = 0
        for peer, pr in node.progress.items():
            if peer != node.id:
                commit = min(pr.match, node.log.committed)
                node._send(HEARTBEAT, peer, commit=commit)


def step(node: RaftNode, m: Message) -> None:
    """A message to the leader (vote requests aside): a follower's answer to an append."""
    pr = node.progress.get(m.src)
    if pr is None:
        return
    if m.type == APP_RESP:
        pr.recent_active = True
        _handle_append_response(node, m, pr)
    elif m.type == HEARTBEAT_RESP:
        pr.recent_active = True
        pr.probe_sent = False
        if pr.state == REPLICATE and len(pr.inflights) >= node.max_inflight:
            pr.inflights.popleft()  # free one slot so a lost append gets retried
        if pr.match < node.log.last_index():
            maybe_send_append(node, m.src)


def _handle_append_response(node: RaftNode, m: Message, pr: Progress) -> None:
    if m.reject:
        next_probe = m.reject_hint
        if m.log_term > 0:
            next_probe, _ = node.log.find_conflict_by_term(m.reject_hint, m.log_term)
        if pr.maybe_decrease_to(m.index, next_probe):
            if pr.state == REPLICATE:
                pr.become_probe()
            maybe_send_append(node, m.src)
        return
    was_paused = pr.is_paused(node.max_inflight)
    if not pr.maybe_update(m.index):
        return
    if pr.state == PROBE:
        pr.become_replicate()
    elif pr.state == SNAPSHOT and pr.match >= pr.pending_snapshot:
        pr.become_probe()
        pr.become_replicate()
    if maybe_commit(node):
        broadcast_append(node)
        if node.role != LEADER or m.src not in node.progress:
            return  # stepped down, or the committed configuration dropped the sender
    elif was_paused:
        maybe_send_append(node, m.src)
    while maybe_send_append(node, m.src, send_if_empty=False):
        pass
    if m.src == node.lead_transferee and pr.match == node.log.last_index():
        node._send(TIMEOUT_NOW, m.src)


def append(node: RaftNode, items: list[tuple[str, bytes]]) -> None:
    """Append (kind, data) items to the leader's log as entries of its term."""
    last = node.log.last_index()
    entries = [Entry(node.term, last + 1 + i, kind, data) for i, (kind, data) in enumerate(items)]
    node.log.append(entries)
    node.progress[node.id].maybe_update(node.log.last_index())
    maybe_commit(node)
    node._needs_broadcast = True  # sent at the next ready(), so proposals batch per message


def _sync_progress_with_conf(node: RaftNode) -> None:
    members = set(node.log.conf().members())
    for member in members:
        if member not in node.progress:
            node.progress[member] = Progress(node.log.last_index() + 1)
    for peer in list(node.progress):
        if peer not in members and peer != node.id:
            del node.progress[peer]


def maybe_commit(node: RaftNode) -> bool:
    """Commit up to the highest index a quorum of voters holds (5.3, 5.4.2)."""
    matches = sorted(
        (node.progress[v].match if v in node.progress else 0 for v in node.voters),
        reverse=True,
    )
    if not matches:
        return False
    committed = node.log.maybe_commit(matches[node._quorum() - 1], node.term)
    if committed:
        _sync_progress_with_conf(node)  # a committed conf entry takes effect now
    # A leader removed from the configuration steps down once the change is committed
    # (dissertation 4.2.2); until then it replicates without counting itself.
    if (
        node.id not in node.voters
        and node.log.committed >= node.log.pending_conf_index()
        and node.role == LEADER
    ):
        broadcast_append(node)
        node._become_follower(node.term, None)
    return committed


def broadcast_append(node: RaftNode) -> None:
    for peer in list(node.progress):
        if peer != node.id:
            maybe_send_append(node, peer)


def maybe_send_append(node: RaftNode, to: str, send_if_empty: bool = True) -> bool:
    """Send `to` what its Progress allows: entries from its next index, or the snapshot."""
    pr = node.progress[to]
    if pr.is_paused(node.max_inflight):
        return False
    prev_index = pr.next - 1
    prev_term = node.log.term(prev_index)
    if prev_term is None:
        # The entries it needs are compacted: InstallSnapshot (7).
        node._send(SNAP, to, snapshot=node.snapshot)
        pr.become_snapshot(node.snapshot.index)
        return True
    entries = node.log.slice(
        pr.next, min(node.log.last_index() + 1, pr.next + node.max_append_entries)
    )
    if not entries and not send_if_empty:
        return False
    node._send(
        APP,
        to,
        index=prev_index,
        log_term=prev_term,
        entries=tuple(entries),
        commit=node.log.committed,
    )
    pr.sent_append(entries[-1].index if entries else None)
    return True
