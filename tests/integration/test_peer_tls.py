"""Peer traffic is TLS: a sniffer on loopback between two in-process peers (the FakeEngine
behind the real peer process code) reads neither the prompt nor the answer of a forwarded
chat, and a TLS client without the cluster secret cannot complete a handshake. With TLS for
clients too (--tls-cert/--tls-key), clients get https on the same port and peers still
reach each other with the cluster certificate."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import threading

import aiohttp
import pytest

from aivailable.backends.fake_engine import FakeEngine
from aivailable.config import load_config
from aivailable.local_peers import free_port
from aivailable.server import serve
from peer.forward import REPLICA_HEADER
from peer.secret import load_or_create_secret
from peer.tls import PEER_SNI, peer_contexts, write_credentials

pytestmark = pytest.mark.slow

PROMPT = "the-secret-prompt-phrase-7f3a"
ANSWER = "the-secret-answer-phrase-c2d9"
ETH_P_ALL = 0x0003


class LoopbackCapture:
    """Every TCP payload on `lo` to or from `ports`, read with a raw socket (needs root)."""

    def __init__(self, ports: set[int]):
        self.ports = ports
        self.payload: dict[int, bytearray] = {p: bytearray() for p in ports}
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self._sock.bind(("lo", 0))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LoopbackCapture:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame, meta = self._sock.recvfrom(1 << 17)
            except TimeoutError:
                continue
            if meta[2] == socket.PACKET_OUTGOING:
                continue  # on lo each packet shows twice: keep the incoming copy
            ip = frame[14:]
            if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != socket.IPPROTO_TCP:
                continue
            tcp = ip[(ip[0] & 0xF) * 4 :]
            sport, dport = struct.unpack("!HH", tcp[:4])
            data = tcp[(tcp[12] >> 4) * 4 :]
            for port in {sport, dport} & self.ports:
                self.payload[port] += data


def fake_engines(spec):
    return FakeEngine(spec.model, reply=lambda request: f"{ANSWER} (you said: {PROMPT})")


def self_signed(tmp_path) -> tuple[str, str]:
    """A certificate for 127.0.0.1, as an operator's own CA would issue (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lab peer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "client-tls.crt", tmp_path / "client-tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


@pytest.mark.parametrize("client_tls", [False, True], ids=["http-clients", "https-clients"])
async def test_a_sniffer_between_peers_reads_no_prompt_or_answer(tmp_path, client_tls):
    secret_file = tmp_path / "cluster.key"
    secret = load_or_create_secret(secret_file)
    ports = {"front": free_port(), "back": free_port()}
    common = {"cluster_key_file": str(secret_file), "mdns": False, "bind": "127.0.0.1"}
    client_ssl: ssl.SSLContext | bool = True
    if client_tls:
        cert, key = self_signed(tmp_path)
        common |= {"tls_cert": cert, "tls_key": key}
        client_ssl = ssl.create_default_context(cafile=cert)
    front = load_config(
        {**common, "name": "front", "port": ports["front"], "cpu": "no",
         "data_dir": str(tmp_path / "front")},
        environ={},
    )  # fmt: skip
    back = load_config(
        {**common, "name": "back", "port": ports["back"], "gpu": "fake:G:8GiB",
         "data_dir": str(tmp_path / "back"), "join": f"127.0.0.1:{ports['front']}"},
        environ={},
    )  # fmt: skip
    stops = [asyncio.Event(), asyncio.Event()]
    url = f"{'https' if client_tls else 'http'}://127.0.0.1:{ports['front']}"

    async with asyncio.TaskGroup() as tg:
        for config, stop in zip((front, back), stops, strict=True):
            tg.create_task(serve(config, fake_engines, announce=lambda _: None, stop=stop))
        try:
            connector = aiohttp.TCPConnector(ssl=client_ssl)
            async with aiohttp.ClientSession(connector=connector) as client:

                async def status() -> dict:
                    async with client.get(url + "/cluster/status") as resp:
                        return await resp.json()

                async def served_by_back() -> bool:
                    models = (await status())["models"]
                    return any(p["node"] == "back" and p["state"] == "ready"
                               for m in models for p in m["placements"])  # fmt: skip

                async with asyncio.timeout(60):
                    while True:
                        try:
                            if await served_by_back():
                                break
                        except (aiohttp.ClientError, KeyError):
                            pass
                        await asyncio.sleep(0.2)

                chat = {"model": "smollm2-135m", "max_tokens": 64,
                        "messages": [{"role": "user", "content": PROMPT}]}  # fmt: skip
                with LoopbackCapture({ports["front"], ports["back"]}) as capture:
                    async with client.post(url + "/v1/chat/completions", json=chat) as resp:
                        assert resp.status == 200, await resp.text()
                        assert resp.headers[REPLICA_HEADER] == "back"  # it was forwarded
                        answer = await resp.json()
                    await asyncio.sleep(0.3)  # the last packets reach the capture
                assert ANSWER in answer["choices"][0]["message"]["content"]
                await check_handshakes(secret, ports["back"], tmp_path, client_tls)
        finally:
            for stop in stops:
                stop.set()

    between_peers = bytes(capture.payload[ports["back"]])
    assert len(between_peers) > 1000  # the forwarded request and answer went by...
    assert PROMPT.encode() not in between_peers  # ...but not in the clear
    assert ANSWER.encode() not in between_peers
    assert b"smollm2-135m" not in between_peers
    with_client = bytes(capture.payload[ports["front"]])
    if client_tls:
        assert len(with_client) > 1000 and PROMPT.encode() not in with_client
    else:
        assert PROMPT.encode() in with_client  # the capture does see text in the clear


async def healthz_over_tls(port: int, ctx: ssl.SSLContext) -> bytes:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1",
        port,
        ssl=ctx,
        server_hostname=PEER_SNI,  # as peers send it
    )
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        return await reader.readuntil(b"\r\n")  # TLS 1.3 may refuse after the hello
    finally:
        writer.close()


async def check_handshakes(secret: bytes, port: int, tmp_path, client_tls: bool) -> None:
    """The cluster's credentials get through; another cluster's do not, and without TLS for
    clients, neither does a TLS client without any (with it, such a client is a client)."""
    right = peer_contexts(*write_credentials(secret, tmp_path / "right"))[1]
    assert b" 200 " in await healthz_over_tls(port, right)
    stranger = peer_contexts(*write_credentials(b"another cluster's secret!", tmp_path / "x"))[1]
    anonymous = ssl.create_default_context()
    anonymous.check_hostname, anonymous.verify_mode = False, ssl.CERT_NONE
    for ctx in (stranger,) if client_tls else (stranger, anonymous):
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await healthz_over_tls(port, ctx)
