"""The pure SWIM + Lifeguard core, driven message by message."""

from random import Random

from peer.config import GossipConfig
from peer.membership import Membership
from peer.messages import (
    Ack,
    Alive,
    Dead,
    IndirectPing,
    MemberRecord,
    Nack,
    Packet,
    Ping,
    PushPullRequest,
    Suspect,
)

CFG = GossipConfig()


def core(node_id="a", now=0.0, **kw) -> Membership:
    return Membership(CFG, node_id, f"10.0.0.{ord(node_id[0])}", 7946, Random(1), now, **kw)


def with_peers(me: Membership, *ids: str, now=0.0) -> Membership:
    me.merge_remote_state(
        [MemberRecord(i, f"addr-{i}", 7946, 1, "alive", {"gpu": i}) for i in ids], now
    )
    me.take_outputs()
    me.take_events()
    return me


def packets(me: Membership) -> list[Packet]:
    return [o for o in me.take_outputs() if isinstance(o, Packet)]


def sent(me: Membership, kind) -> list[tuple[str, object]]:
    return [(p.addr, m) for p in packets(me) for m in p.messages if isinstance(m, kind)]


def start_probe(me: Membership) -> tuple[float, str, Ping]:
    """Advance the clock deadline by deadline until the core sends a probe."""
    for _ in range(100):
        t = me.next_deadline()
        me.tick(t)
        pings = sent(me, Ping)
        if pings:
            [(addr, ping)] = pings
            return t, addr, ping
    raise AssertionError("no probe sent")


def test_merging_a_peer_state_emits_joined_events_with_payloads():
    me = core()
    me.merge_remote_state([MemberRecord("b", "addr-b", 1, 3, "alive", {"gpus": [1]})], 0.0)
    [event] = me.take_events()
    assert (event.kind, event.member.id, event.member.payload) == ("joined", "b", {"gpus": [1]})
    assert {v.id: v.state for v in me.members()} == {"a": "alive", "b": "alive"}


def test_a_ping_for_this_node_is_acked_and_one_for_another_is_ignored():
    me = core()
    me.receive("x", 1, [Ping(42, "a", "b")], 0.0)
    assert sent(me, Ack) == [("x", Ack(42))]
    me.receive("x", 1, [Ping(43, "someone-else", "b")], 0.0)
    assert sent(me, Ack) == []


def test_missing_ack_leads_to_indirect_probes_then_suspicion():
    me = with_peers(core(), "b", "c", "d", "e")
    t, target_addr, ping = start_probe(me)
    target = ping.target
    me.tick(t + CFG.probe_timeout)
    indirect = sent(me, IndirectPing)
    assert len(indirect) == CFG.indirect_checks
    assert all(m.target == target and m.nack for _, m in indirect)
    assert target_addr not in {addr for addr, _ in indirect}
    me.tick(t + CFG.probe_interval)
    assert me.member(target).state == "suspect"
    assert [e.kind for e in me.take_events()] == ["suspect"]
    assert me.awareness.score > 0  # no nacks came back either: our own health is suspect


def test_an_ack_in_time_keeps_the_target_alive_and_lowers_awareness():
    me = with_peers(core(), "b", "c")
    me.awareness.apply_delta(2)
    t, _, ping = start_probe(me)
    me.receive("x", 1, [Ack(ping.seq)], t + 0.01)
    me.tick(t + CFG.probe_interval)
    assert me.member(ping.target).state == "alive"
    assert me.awareness.score == 1


def test_an_indirect_probe_is_relayed_and_nacked_on_timeout():
    me = with_peers(core(), "b")
    me.receive("req", 5, [IndirectPing(7, "b", "addr-b", 7946, "c", True)], 0.0)
    [(addr, ping)] = sent(me, Ping)
    assert (addr, ping.target) == ("addr-b", "b")
    me.receive("addr-b", 7946, [Ack(ping.seq)], 0.05)
    assert sent(me, Ack) == [("req", Ack(7))]
    me.receive("req", 5, [IndirectPing(8, "b", "addr-b", 7946, "c", True)], 1.0)
    packets(me)
    me.tick(1.0 + CFG.probe_timeout)
    assert sent(me, Nack) == [("req", Nack(8))]


def test_a_suspected_node_refutes_with_a_higher_incarnation():
    me = with_peers(core(), "b")
    me.receive("addr-b", 7946, [Suspect("a", 0, "b")], 1.0)
    assert me.incarnation == 1
    alive = [m for _, m in sent(me, Alive) if m.node == "a"]
    assert alive and alive[0].incarnation == 1
    assert me.counters.refutations == 1


def test_a_stale_suspicion_is_answered_with_the_newer_alive():
    me = with_peers(core(incarnation=5), "b")
    me.receive("relay", 9, [Suspect("a", 3, "b")], 1.0)
    assert me.incarnation == 5
    answers = [(addr, m.incarnation) for addr, m in sent(me, Alive) if m.node == "a"]
    assert answers == [("relay", 5)]


def test_suspicion_expires_into_dead_and_is_broadcast():
    me = with_peers(core(), "b", "c")
    me.receive("addr-c", 7946, [Suspect("b", 1, "c")], 0.0)
    low, high = CFG.suspicion_bounds(3)
    me.tick(low - 0.01)
    assert me.member("b").state == "suspect"
    me.tick(high + 0.01)
    assert me.member("b").state == "dead"
    assert [e.kind for e in me.take_events()] == ["suspect", "dead"]
    assert me.queued("b") == [Dead("b", 1, "a")]


def test_confirmations_shorten_the_suspicion_to_the_minimum():
    me = with_peers(core(), *"bcdefghij")
    me.receive("x", 1, [Suspect("b", 1, "c")], 0.0)
    low, high = CFG.suspicion_bounds(10)
    for suspector in "def":
        me.receive("x", 1, [Suspect("b", 1, suspector)], 0.1)
    me.tick(low + 0.01)
    assert me.member("b").state == "dead"


def test_alive_with_higher_incarnation_clears_suspicion_and_reports_payload_change():
    me = with_peers(core(), "b", "c")
    me.receive("x", 1, [Suspect("b", 1, "c")], 0.0)
    me.receive("x", 1, [Alive("b", 2, "addr-b", 7946, {"gpu": "new"})], 0.5)
    assert me.member("b").state == "alive"
    assert me.member("b").payload == {"gpu": "new"}
    assert [e.kind for e in me.take_events()] == ["suspect", "alive", "payload"]
    me.tick(60.0)
    assert me.member("b").state == "alive"


def test_old_incarnations_never_resurrect_a_dead_node():
    me = with_peers(core(), "b", "c")
    me.receive("x", 1, [Dead("b", 4, "c")], 0.0)
    me.receive("x", 1, [Alive("b", 4, "addr-b", 7946, {})], 0.1)
    assert me.member("b").state == "dead"
    me.receive("x", 1, [Alive("b", 5, "addr-b", 7946, {})], 0.2)
    assert me.member("b").state == "alive"


def test_leaving_tells_everyone_directly_and_they_see_left():
    me = with_peers(core(), "b", "c")
    me.leave(1.0)
    dead = sent(me, Dead)
    assert {addr for addr, _ in dead} == {"addr-b", "addr-c"}
    other = with_peers(core("b"), "a", "c")
    other.receive("x", 1, [dead[0][1]], 1.0)
    assert other.member("a").state == "left"
    assert [e.kind for e in other.take_events()] == ["left"]


def test_set_payload_bumps_the_incarnation_and_gossips_it():
    me = with_peers(core(payload={"v": 1}), "b")
    me.set_payload({"v": 2, "gpus": ("t", "u")}, 1.0)
    assert me.incarnation == 1
    [queued] = me.queued("a")
    assert queued.payload == {"v": 2, "gpus": ["t", "u"]}


def test_setting_the_same_payload_again_keeps_the_incarnation():
    me = with_peers(core(payload={"v": 1}), "b")
    me.set_payload({"v": 2, "gpus": ("t", "u")}, 1.0)
    me.set_payload({"v": 2, "gpus": ["t", "u"]}, 2.0)  # equal once normalized
    assert me.incarnation == 1
    me.set_payload({"v": 3}, 3.0)
    assert me.incarnation == 2


def test_a_payload_change_after_leaving_does_not_announce_the_node_alive_again():
    me = with_peers(core(payload={"v": 1}), "b")
    me.leave(1.0)
    me.set_payload({"v": 2}, 1.1)  # its model workers stop after the leave
    other = with_peers(core("b"), "a")
    other.receive("x", 1, [me.broadcasts.pending("a")], 1.2)
    assert other.member("a").state == "left"


def test_a_payload_too_big_for_a_datagram_travels_by_push_pull():
    me = with_peers(core(incarnation=3), "b")
    me.set_payload({"blob": "x" * 5000}, 1.0)
    [alive] = me.queued("a")
    assert alive.payload is None
    other = with_peers(core("b"), "a")
    other.receive("x", 1, [alive], 1.0)
    assert any(isinstance(o, PushPullRequest) for o in other.take_outputs())
    other.take_events()
    other.merge_remote_state(me.local_state(), 1.1)  # the push-pull it asked for
    assert other.member("a").payload == {"blob": "x" * 5000}
    assert [e.kind for e in other.take_events()] == ["payload"]


def test_push_pull_is_requested_periodically():
    me = with_peers(core(), "b")
    me.tick(CFG.push_pull_interval * 1.01)
    assert [o for o in me.take_outputs() if isinstance(o, PushPullRequest)]


def test_dead_members_are_forgotten_after_the_reclaim_time():
    me = with_peers(core(), "b", "c")
    me.receive("x", 1, [Dead("b", 1, "c")], 0.0)
    me.tick(CFG.dead_reclaim_time * 1.3)
    assert me.member("b") is None and me.member("c") is not None


def test_outgoing_packets_respect_the_datagram_budget():
    from peer import wire

    me = with_peers(core(), *[f"peer-{i:03d}-{'x' * 60}" for i in range(60)])
    for i in range(60):
        me.set_payload({"n": i, "pad": "y" * 200}, 0.0)
        me.receive("x", 1, [Alive(f"peer-{i:03d}-{'x' * 60}", 9, "h", 1, {"p": "z" * 300})], 0.0)
    me.receive("x", 1, [Ping(1, "a", "b")], 0.0)
    for p in packets(me):
        assert len(wire.encode_packet(p.messages)) <= CFG.packet_size - wire.ENVELOPE_OVERHEAD


def test_a_reported_unreachable_member_is_suspected_at_once_with_its_since():
    me = with_peers(core(), "b", "c")
    assert me.report_unreachable("b", 5.0)
    [event] = me.take_events()
    assert (event.kind, event.member.id, event.member.since) == ("suspect", "b", 5.0)
    assert any(isinstance(m, Suspect) for m in me.queued("b"))  # it is gossiped
    # Once suspected, again is nothing new; this node, and strangers, are never reported.
    assert not me.report_unreachable("b", 6.0)
    assert not me.report_unreachable("a", 6.0) and not me.report_unreachable("zz", 6.0)
    # A live member refutes it as it would a probe's suspicion.
    me.receive("addr-b", 7946, [Alive("b", 2, "addr-b", 7946, {"gpu": "b"})], 7.0)
    assert me.member("b").state == "alive"
