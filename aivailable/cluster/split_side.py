"""This peer's side of split models (placement/split.py): its llama.cpp RPC server, for the
splits it helps, and its tunnels to other peers' RPC servers, for the splits it is the
primary of. Both through peer/rpc_tunnel.py: no RPC port is ever reachable but on
loopback, and between peers the bytes travel only inside the TLS peer channel.

The wiring (server.py) builds it with the RPC server process (backends/rpc_server.py)
and the protocol version it read from the library; the node hands it to the reconciler
and mounts its route.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any

from aiohttp import web

from peer.auth import PeerAuth
from peer.rpc_tunnel import TUNNEL_PATH, TunnelListener, tunnel_handler

log = logging.getLogger(__name__)


class SplitSide:
    def __init__(
        self,
        server: Any | None,
        auth: PeerAuth | None = None,
        tls: ssl.SSLContext | None = None,
        version: str | None = None,
    ):
        """`server`: an RpcServerProcess (start, stop, ready, port, kill); `auth` signs the
        tunnels' openings, `tls` is the peer channel's client context (peer/tls.py);
        `version`: the RPC protocol this library speaks (None until probed, or none)."""
        self.server = server
        self.version = version
        self._auth, self._tls = auth, tls
        self._address_of: Callable[[str], str | None] = lambda node: None
        self._worker_pids: Callable[[], set[int]] | None = None
        self._tunnels: dict[str, TunnelListener] = {}  # helper node -> its tunnel here
        self._tg: asyncio.TaskGroup | None = None

    def bind(
        self,
        address_of: Callable[[str], str | None],
        worker_pids: Callable[[], set[int]] | None = None,
    ) -> None:
        """How to find a node's host:port (the read model), and the model workers' pids:
        the only processes whose connections the tunnels carry."""
        self._address_of = address_of
        self._worker_pids = worker_pids

    # -- helper side

    def local_rpc(self) -> tuple[str, int] | None:
        """Where the tunnel route joins a peer: this node's RPC server, if it runs."""
        if self.server is None or not self.server.ready():
            return None
        return ("127.0.0.1", self.server.port)

    def routes(self) -> list[web.RouteDef]:
        return [web.get(TUNNEL_PATH, tunnel_handler(self.local_rpc))]

    # -- primary side

    def endpoints(self, helpers: tuple[str, ...]) -> tuple[str, ...]:
        """A loopback endpoint per helper node, each a tunnel to that node's RPC server,
        for the worker's --rpc list. Raises LookupError for a helper without an address."""
        return tuple(self._tunnel(node).endpoint for node in helpers)

    def _tunnel(self, node: str) -> TunnelListener:
        addr = self._address_of(node)
        if not addr or self._auth is None or self._tg is None:
            raise LookupError(f"no route to the RPC server of {node}")
        tunnel = self._tunnels.get(node)
        if tunnel is None or tunnel.peer_addr != addr:
            if tunnel is not None:
                tunnel.close()
            tunnel = TunnelListener(self._auth, self._tls, addr, allowed_pids=self._worker_pids)
            tunnel.start()
            self._tunnels[node] = tunnel
            self._tg.create_task(tunnel.serve(), name=f"rpc tunnel to {node}")
        return tunnel

    def tunnels(self) -> dict[str, dict]:
        return {
            node: {
                "endpoint": t.endpoint,
                "connections": t.connections,
                "failures": t.failures,
                "refused": t.refused,
            }
            for node, t in self._tunnels.items()
        }

    async def run(self) -> None:
        """Owns the tunnels' tasks; on the way out, closes them and kills the RPC server."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                await asyncio.Event().wait()
        finally:
            self._tg = None
            for tunnel in self._tunnels.values():
                tunnel.close()
            if self.server is not None:
                self.server.kill()
