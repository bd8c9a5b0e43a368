"""GossipConfig: every knob of discovery, membership and the gossip transport.

Defaults are chosen to beat hashicorp/memberlist's DefaultLANConfig on the same model of
time (a LAN with sub-millisecond to few-millisecond round trips), per issue 4's targets:
a payload change reaches all of 50 nodes within 7 gossip rounds (p99), a crashed node of a
10-node cluster is marked dead everywhere within 4 s (p50), no live node is ever declared
dead behind 30% packet loss, and a new peer is discovered within 2 s. bench/gossip.py
measures each of these; docs/gossip.md explains the trade-offs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GossipConfig:
    # Seconds between probes of one member. memberlist LAN: 1 s. A LAN answers a ping within
    # a few ms, so half a second costs nothing and halves the time until a crash is noticed.
    # 1 s was tried for the idle cost (issue 22): in tests/sim/gossip_sim.py at 30 nodes, a
    # crash was then suspected by all in 2.1 s p50 and 4.8 s p90 (0.84 / 1.70 s at 0.5 s,
    # 40 seeds), past the 3 s target; probes are a small part of an idle peer's CPU.
    probe_interval: float = 0.5
    # Seconds to wait for a direct ack before asking others to probe indirectly. memberlist:
    # 0.5 s. 0.2 s is still ~100x a LAN round trip; the remaining 0.3 s of the probe interval
    # is left for the indirect probes and their nacks.
    probe_timeout: float = 0.2
    # Members asked to probe indirectly after a missed ack (SWIM's k). memberlist: 3. Three
    # independent paths make a false suspicion from loss alone unlikely even at 30% loss.
    indirect_checks: int = 3
    # Seconds between gossip rounds (a "round" in bench/gossip.py). memberlist: 0.2 s. Only
    # rounds with something to say send packets, so a quiet cluster pays nothing for 0.1 s.
    gossip_interval: float = 0.1
    # Members each round's broadcasts go to (the fanout). memberlist: 3. Four reaches 50
    # nodes in about 4 rounds instead of 5 and leaves room for 20% loss within 7 rounds.
    gossip_nodes: int = 4
    # Seconds a dead or left member still receives gossip, so that a node that was only cut
    # off learns it was declared dead and refutes. memberlist: 30 s.
    gossip_to_the_dead: float = 30.0
    # A broadcast is sent retransmit_mult * ceil(log10(N + 1)) times (SWIM's lambda log N).
    # memberlist: 4. Eight sends each piece of news 16 times per node at N=50, so even at
    # 20% loss the chance that some node hears nothing (and must wait for push-pull) is
    # ~50 * e^-(16*0.8); measured cost: ~5% more packets than six, which left a 1-in-20 tail.
    retransmit_mult: int = 8
    # Suspicion minimum = suspicion_mult * max(1, log10(N)) * probe_interval: 2 s for N <= 10.
    # memberlist: 4 * 1 s = 4 s. Four probe intervals leave a suspected live node time to
    # hear the suspicion and refute it even at 30% loss (refutation takes a few gossip rounds).
    suspicion_mult: int = 4
    # Suspicion maximum = this * minimum; the timer starts at the maximum and shrinks towards
    # the minimum as independent confirmations arrive (Lifeguard). memberlist: 6.
    suspicion_max_timeout_mult: int = 6
    # Confirmations needed to reach the minimum; memberlist uses suspicion_mult - 2 = 2.
    # Two other members agreeing is strong evidence; more would delay dead-marking.
    suspicion_confirmations: int = 2
    # Lifeguard local health: a node missing nacks scales its own probe interval and timeout
    # by up to this factor, so a struggling node stops accusing healthy ones. memberlist: 8.
    awareness_max_multiplier: int = 8
    # Seconds between full-state push-pull exchanges with one random member (over HTTP);
    # repairs anything gossip missed. memberlist: 30 s; scaled up beyond 32 nodes like
    # memberlist so 200 nodes do not push their full state too often.
    push_pull_interval: float = 15.0
    # Seconds a dead or left member's tombstone is kept, so stale "alive" messages with old
    # incarnations cannot resurrect it; a rejoining node refutes its tombstone.
    dead_reclaim_time: float = 120.0
    # Bytes in one UDP datagram, envelope included. 1400 stays under a 1500-byte Ethernet
    # MTU with IP/UDP headers and a VLAN tag: no IP fragmentation.
    packet_size: int = 1400
    # Largest encoded payload (bytes) carried in an alive message; a larger one travels only
    # by push-pull, which receivers trigger when they see an alive without payload.
    max_gossip_payload: int = 1000
    # Seconds an encrypted packet's timestamp may differ from the receiver's clock; packets
    # outside it are replays (or a badly skewed clock) and are dropped. Nonces seen inside
    # the window are remembered so an exact replay is dropped too.
    replay_window: float = 120.0
    # Seconds the push-pull HTTP request may take before it is abandoned.
    push_pull_timeout: float = 5.0
    # Seconds a graceful leave waits for its "left" broadcast to go out before returning.
    leave_propagate_time: float = 0.5

    def retransmit_limit(self, n: int) -> int:
        """How many times one broadcast is sent for a cluster of n live members."""
        return self.retransmit_mult * max(1, math.ceil(math.log10(n + 1)))

    def suspicion_bounds(self, n: int) -> tuple[float, float]:
        """(minimum, maximum) suspicion timeout in seconds for a cluster of n live members."""
        scale = max(1.0, math.log10(max(1, n)))
        low = self.suspicion_mult * scale * self.probe_interval
        return low, low * self.suspicion_max_timeout_mult

    def push_pull_scaled(self, n: int) -> float:
        """memberlist's pushPullScale: beyond 32 nodes, lengthen the interval by log2(n/32)."""
        if n <= 32:
            return self.push_pull_interval
        return self.push_pull_interval * math.ceil(math.log2(n) - math.log2(32) + 1)
