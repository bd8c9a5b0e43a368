"""Raft heartbeats ride the gossip channel only to peers that say they read it ("rd" in
their payload): an older peer drops an unknown gossip message, so sending it heartbeats
that way would leave it deaf to the leader and starting elections (a rolling upgrade)."""

from __future__ import annotations

from aivailable.cluster.payload import node_payload, read_payload
from aivailable.cluster.raft import RAFT_CHANNEL, raft_datagrams


class RecordingGossip:
    """A fake gossip with the datagram call: records what it was asked to send."""

    def __init__(self, delivered: bool = True) -> None:
        self.sent: list[tuple[str, int, bytes]] = []
        self.delivered = delivered

    def send_datagram(self, node: str, channel: int, body: bytes) -> bool:
        self.sent.append((node, channel, body))
        return self.delivered


def test_a_payload_says_it_reads_raft_datagrams_and_an_older_one_does_not():
    ours = node_payload("127.0.0.1:1", "c", [], {}, [])
    assert read_payload("a", ours).raft_datagrams is True
    older = {k: v for k, v in ours.items() if k != "rd"}
    assert read_payload("b", older).raft_datagrams is False


def test_heartbeats_go_as_datagrams_only_to_peers_that_read_them():
    gossip = RecordingGossip()
    readers = {"new"}
    route = raft_datagrams(gossip, lambda raft_id: raft_id.split("#")[0], readers.__contains__)
    assert route("new#1", b"hb") is True
    assert gossip.sent == [("new", RAFT_CHANNEL, b"hb")]
    assert route("old#1", b"hb") is False  # the driver sends it by HTTP instead
    assert gossip.sent == [("new", RAFT_CHANNEL, b"hb")]


def test_a_datagram_gossip_cannot_route_falls_back_too():
    route = raft_datagrams(RecordingGossip(delivered=False), str, lambda node: True)
    assert route("n1", b"hb") is False


def test_no_datagram_call_no_route():
    assert raft_datagrams(object(), str, lambda node: True) is None
