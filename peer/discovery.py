"""mDNS discovery (zeroconf): announce this peer, find peers of the same cluster.

Service `_aivailable._tcp.local.`; TXT carries the node id, the cluster id (a hash of the
secret, never the key), the port and the software version. It announces on the interface
of the bind address only (127.0.0.1 by default), never on every interface. mDNS only
finds peers; SWIM judges liveness (zeroconf keeps a killed peer cached for ~20 minutes).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable

from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

log = logging.getLogger(__name__)

SERVICE_TYPE = "_aivailable._tcp.local."
RESOLVE_TIMEOUT_MS = 1500
# Seconds between re-offering every cached peer to gossip: a peer that restarted under the
# same name (or whose first push-pull failed) is tried again; gossip ignores known live ones.
REOFFER_SECONDS = 10.0

OnFound = Callable[[str, str, int], None]  # (node_id, host, port)


class Discovery:
    def __init__(
        self,
        node_id: str,
        cluster_id: str,
        bind_host: str,
        port: int,
        on_found: OnFound,
        *,
        version: str = "0.1.0",
        announce_host: str | None = None,
    ) -> None:
        host = announce_host or bind_host
        if ipaddress.ip_address(host).is_unspecified:
            raise ValueError("mDNS announces on one interface: give announce_host, not 0.0.0.0")
        self.node_id = node_id
        self.cluster_id = cluster_id
        self.host = host
        self.port = port
        self.on_found = on_found
        self.version = version
        self.found: dict[str, tuple[str, int]] = {}  # node id -> (host, port), for status
        self.ignored_other_cluster = 0
        self._names: asyncio.Queue[str] = asyncio.Queue()

    def _service_info(self) -> AsyncServiceInfo:
        return AsyncServiceInfo(
            SERVICE_TYPE,
            f"{self.node_id}.{SERVICE_TYPE}",
            addresses=[ipaddress.ip_address(self.host).packed],
            port=self.port,
            properties={
                "id": self.node_id,
                "cluster": self.cluster_id,
                "port": str(self.port),
                "version": self.version,
            },
            server=f"{self.node_id}.local.",
        )

    async def run(self) -> None:
        zc = AsyncZeroconf(interfaces=[self.host])  # this interface only, never all
        browser = None
        try:
            # Browse first, then announce without the ~1 s uniqueness probing: node ids are
            # unique by configuration (and also carried in TXT), and a new peer must be
            # found within 2 s.
            browser = AsyncServiceBrowser(zc.zeroconf, SERVICE_TYPE, handlers=[self._on_change])
            await zc.async_register_service(self._service_info(), cooperating_responders=True)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._resolver(zc))
                tg.create_task(self._reoffer())
        finally:
            if browser is not None:
                await browser.async_cancel()
            await zc.async_unregister_all_services()
            await zc.async_close()

    def _on_change(self, zeroconf, service_type: str, name: str, state_change) -> None:
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            self._names.put_nowait(name)

    async def _resolver(self, zc: AsyncZeroconf) -> None:
        while True:
            name = await self._names.get()
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            try:
                if not await info.async_request(zc.zeroconf, RESOLVE_TIMEOUT_MS):
                    continue
            except Exception:  # a malformed record from the network must not stop discovery
                log.debug("mDNS: could not resolve %s", name, exc_info=True)
                continue
            self._consider(info)

    def _consider(self, info: AsyncServiceInfo) -> None:
        props = {
            k.decode(errors="replace"): (v or b"").decode(errors="replace")
            for k, v in (info.properties or {}).items()
        }
        node_id = props.get("id", "")
        if not node_id or node_id == self.node_id:
            return
        if props.get("cluster") != self.cluster_id:
            self.ignored_other_cluster += 1
            return
        addresses = info.parsed_addresses(version=_ip_version(self.host))
        if not addresses or not info.port:
            return
        self.found[node_id] = (addresses[0], info.port)
        self.on_found(node_id, addresses[0], info.port)

    async def _reoffer(self) -> None:
        while True:
            await asyncio.sleep(REOFFER_SECONDS)
            for node_id, (host, port) in list(self.found.items()):
                self.on_found(node_id, host, port)


def _ip_version(host: str) -> IPVersion:
    return IPVersion.V6Only if ":" in host else IPVersion.V4Only
