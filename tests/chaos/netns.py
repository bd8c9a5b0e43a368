"""A small lab network for chaos tests: network namespaces joined by a bridge.

Each host is a namespace with one veth on the bridge and its own address in a /24
that exists only on this machine; the test process reaches them through the bridge's
own address. Faults are nftables rules inside one namespace: a partition drops all
traffic on its link, loss drops a random share (this kernel has no netem). Everything
made here is removed in `down()`, by name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from dataclasses import dataclass


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def available() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: iproute2, nftables)"
    return None


@dataclass(frozen=True)
class Host:
    name: str  # namespace name
    addr: str  # its address on the lab bridge

    def exec_prefix(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.name)

    def nft(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run(*self.exec_prefix(), "nft", *args, check=check)


class Lab:
    def __init__(self, size: int, tag: str | None = None):
        tag = tag or f"{os.getpid() % 10000}"
        self.bridge = f"aivbr{tag}"
        subnet = 10 + os.getpid() % 200  # a /24 per test process, so parallel runs never clash
        self.prefix = f"10.213.{subnet}"
        self.gateway = f"{self.prefix}.254"
        self.hosts = [Host(f"aiv{tag}n{i}", f"{self.prefix}.{i + 1}") for i in range(size)]
        self._veths = [f"aiv{tag}v{i}" for i in range(size)]

    def up(self) -> Lab:
        try:
            run("ip", "link", "add", self.bridge, "type", "bridge")
            run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            run("ip", "link", "set", self.bridge, "up")
            for host, veth in zip(self.hosts, self._veths, strict=True):
                run("ip", "netns", "add", host.name)
                run(
                    "ip",
                    "link",
                    "add",
                    veth,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    host.name,
                )
                run("ip", "link", "set", veth, "master", self.bridge, "up")
                ns = host.exec_prefix()
                run(*ns, "ip", "addr", "add", f"{host.addr}/24", "dev", "eth0")
                run(*ns, "ip", "link", "set", "eth0", "up")
                run(*ns, "ip", "link", "set", "lo", "up")
                run(*ns, "ip", "route", "add", "224.0.0.0/4", "dev", "eth0")  # mDNS
                host.nft("add", "table", "inet", "chaos")
                for chain, hook in (("in", "input"), ("out", "output")):
                    host.nft(
                        "add",
                        "chain",
                        "inet",
                        "chaos",
                        chain,
                        f"{{ type filter hook {hook} priority 0; }}",
                    )
        except subprocess.CalledProcessError as exc:
            self.down()
            raise RuntimeError(f"cannot build the lab network: {exc.stderr}") from exc
        return self

    def down(self) -> None:
        for host, veth in zip(self.hosts, self._veths, strict=True):
            run("ip", "link", "del", veth, check=False)
            run("ip", "netns", "del", host.name, check=False)
        run("ip", "link", "del", self.bridge, check=False)

    def heal(self, host: Host) -> None:
        for chain in ("in", "out"):
            host.nft("flush", "chain", "inet", "chaos", chain)

    def partition(self, *hosts: Host, watchable: bool = False) -> None:
        """Cut these hosts off the lab network (each still talks to itself on lo).
        `watchable`: the test process (the bridge's address) still reaches them."""
        for host in hosts:
            self.heal(host)
            if watchable:
                self._let_the_test_through(host)
            host.nft("add", "rule", "inet", "chaos", "in", "iifname", "eth0", "drop")
            host.nft("add", "rule", "inet", "chaos", "out", "oifname", "eth0", "drop")

    def isolate_group(self, group: list[Host], watchable: bool = False) -> None:
        """Split the network: `group` talks among itself, not with the rest (nor the test,
        unless `watchable`)."""
        allowed = ", ".join(h.addr for h in group)
        for host in group:
            self.heal(host)
            if watchable:
                self._let_the_test_through(host)
            host.nft(
                "add",
                "rule",
                "inet",
                "chaos",
                "in",
                "iifname",
                "eth0",
                "ip",
                "saddr",
                "!=",
                f"{{ {allowed} }}",
                "drop",
            )
            host.nft(
                "add",
                "rule",
                "inet",
                "chaos",
                "out",
                "oifname",
                "eth0",
                "ip",
                "daddr",
                "!=",
                f"{{ {allowed}, 224.0.0.251 }}",
                "drop",
            )

    def _let_the_test_through(self, host: Host) -> None:
        host.nft("add", "rule", "inet", "chaos", "in", "ip", "saddr", self.gateway, "accept")
        host.nft("add", "rule", "inet", "chaos", "out", "ip", "daddr", self.gateway, "accept")

    def loss(self, host: Host, percent: int) -> None:
        """Drop `percent` % of packets in each direction on this host's link."""
        if percent >= 100:
            self.partition(host)
            return
        self.heal(host)
        for chain, iface in (("in", "iifname"), ("out", "oifname")):
            host.nft(
                "add",
                "rule",
                "inet",
                "chaos",
                chain,
                iface,
                "eth0",
                "numgen",
                "random",
                "mod",
                "100",
                "lt",
                str(percent),
                "drop",
            )

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(Exception):
            self.down()
