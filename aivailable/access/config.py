"""[access]: body limits and connection timeouts at the edge of every peer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AccessConfig:
    # Largest request body, bytes, for client routes (chat, completions, deploys, keys). A
    # 128k-token prompt is about 512 KiB of JSON; 4 MiB leaves room without letting one
    # request hold much memory. Raft messages have their own limit ([raft] max_body_bytes:
    # snapshots travel in one request).
    max_body_bytes: int = 4 << 20
    # Largest body of other peer-only requests (gossip push-pull, proposals), bytes: a
    # push-pull of a few hundred members with their payloads fits in a few hundred KiB.
    max_peer_body_bytes: int = 8 << 20
    # Seconds a connection may stay open without a request in progress: a client that
    # connects and never completes its headers (half-open, slowloris) and an idle kept-alive
    # connection alike (aiohttp times both with one timer, from the connect or the last
    # answer). Each such connection holds a socket, so they must go within seconds; clients
    # reuse connections within a burst. Peers keep idle connections for less (peer/auth.py
    # PEER_KEEPALIVE_S), so they never reuse one this side is closing.
    idle_timeout_s: float = 10.0
    # Peers talk to each other over TLS, both sides proving the cluster secret (peer/tls.py),
    # so a sniffer between them reads no prompt, answer or model name. Off only to debug
    # peer traffic with a packet capture.
    peer_tls: bool = True
    # Seconds between a peer's commits of the usage its callers ran up (access/ledger.py):
    # one Raft command per peer per interval, whatever the request rate, and at most this
    # much use is lost with a peer that is killed. 10 s keeps the log's growth small (8,640
    # entries a day per peer, compacted by snapshots) while a report is current enough.
    usage_flush_s: float = 10.0
