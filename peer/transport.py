"""asyncio UDP adapter: sealed msgpack compound datagrams of at most packet_size bytes.

It only moves bytes: encode + seal on the way out, open + decode on the way in, and counts
what it drops. Nothing that arrives on the socket can raise out of datagram_received.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from peer import wire
from peer.crypto import CryptoError, Envelope
from peer.messages import AppData, Message

log = logging.getLogger(__name__)

OnMessages = Callable[[str, int, list[Message]], None]


@dataclass(slots=True)
class TransportMetrics:
    packets_sent: int = 0
    packets_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    rejected_bad_key: int = 0  # sealed with a key we do not have: another cluster, a stranger
    rejected_tampered: int = 0  # our key id but the tag does not verify
    rejected_replay: int = 0  # outside the replay window, or a nonce seen before
    rejected_malformed: int = 0  # not an envelope, or not a valid packet inside
    rejected_oversize: int = 0
    send_errors: int = 0
    dropped_too_big: int = 0  # a single message larger than a datagram (never sent)
    # Other parts' datagrams (AppData: Raft's heartbeats), apart so gossip's own figures
    # stay gossip's. Also counted in packets_received/bytes_received on the way in.
    app_packets_sent: int = 0
    app_bytes_sent: int = 0

    def count_rejection(self, reason: str) -> None:
        name = f"rejected_{reason}"
        setattr(self, name, getattr(self, name) + 1)


def split_into_datagrams(messages: tuple[Message, ...] | list[Message], limit: int) -> list[bytes]:
    """Encode messages into compound packets that each fit `limit` bytes (before sealing)."""
    out: list[bytes] = []
    batch: list[Message] = []
    for msg in messages:
        candidate = wire.encode_packet([*batch, msg])
        if len(candidate) <= limit:
            batch.append(msg)
            continue
        if batch:
            out.append(wire.encode_packet(batch))
        batch = [msg]
        if len(wire.encode_packet(batch)) > limit:
            batch = []
            out.append(b"")  # marker: one message too big to send
    if batch:
        out.append(wire.encode_packet(batch))
    return out


class UdpTransport(asyncio.DatagramProtocol):
    def __init__(self, envelope: Envelope, packet_size: int, on_messages: OnMessages) -> None:
        self.envelope = envelope
        self.packet_size = packet_size
        self.on_messages = on_messages
        self.metrics = TransportMetrics()
        self._transport: asyncio.DatagramTransport | None = None

    async def open(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, local_addr=(host, port))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def connection_made(self, transport) -> None:
        self._transport = transport

    def send(self, addr: str, port: int, messages: tuple[Message, ...] | list[Message]) -> None:
        if self._transport is None:
            return
        limit = self.packet_size - wire.ENVELOPE_OVERHEAD
        for plain in split_into_datagrams(messages, limit):
            if not plain:
                self.metrics.dropped_too_big += 1
                continue
            data = self.envelope.seal(plain, time.time())
            try:
                self._transport.sendto(data, (addr, port))
            except OSError:
                self.metrics.send_errors += 1
                continue
            self.metrics.packets_sent += 1
            self.metrics.bytes_sent += len(data)

    def send_app(self, addr: str, port: int, message: AppData) -> bool:
        """One AppData in its own datagram, now; False if it was not sent."""
        if self._transport is None:
            return False
        data = self.envelope.seal(wire.encode_packet([message]), time.time())
        try:
            self._transport.sendto(data, (addr, port))
        except OSError:
            self.metrics.send_errors += 1
            return False
        self.metrics.app_packets_sent += 1
        self.metrics.app_bytes_sent += len(data)
        return True

    def datagram_received(self, data: bytes, addr) -> None:
        self.metrics.packets_received += 1
        self.metrics.bytes_received += len(data)
        if len(data) > max(self.packet_size, 1500):
            self.metrics.rejected_oversize += 1
            return
        try:
            plain = self.envelope.open(data, time.time())
            messages = wire.decode_packet(plain)
        except CryptoError as exc:
            self.metrics.count_rejection(exc.reason)
            return
        except wire.DecodeError:
            self.metrics.rejected_malformed += 1
            return
        try:
            self.on_messages(addr[0], addr[1], messages)
        except Exception:  # a bug in the core must not kill the socket
            log.exception("gossip: handling a packet from %s failed", addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a dead peer, etc.: SWIM judges liveness, not the socket.
        self.metrics.send_errors += 1
