"""Which credentials a request needs. Pure functions of the bind address, path and headers."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

AUTH_MODES = ("auto", "on", "off")
LOOPBACK_NAMES = ("localhost", "ip6-localhost")

# What each role may reach. "open" needs no key; "peer" is for peers only (signed).
ROLE_AREAS = {
    "admin": frozenset({"admin", "user", "metrics"}),
    "user": frozenset({"user"}),
    "metrics": frozenset({"metrics"}),
}


class AuthModeError(ValueError):
    """An auth setting that would expose the peer (e.g. auth off on a LAN address)."""


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name or a wildcard: assume it is reachable from the LAN


def auth_enabled(mode: str, bind: str) -> bool:
    """auto: on unless bound to loopback only; on: always; off: only on loopback."""
    if mode not in AUTH_MODES:
        raise AuthModeError(f"auth must be auto, on or off, not {mode!r}")
    if mode == "off" and not is_loopback(bind):
        raise AuthModeError(
            f"--auth off is refused when binding {bind or '0.0.0.0'!r}: anyone on the network "
            "could deploy, undeploy and read prompts. Bind 127.0.0.1, or keep auth on and "
            "use the admin key (aivailable keys create ...)"
        )
    return mode == "on" or (mode == "auto" and not is_loopback(bind))


def area(method: str, path: str) -> str:
    """open | metrics | user | admin: what a request to this path needs."""
    if path == "/healthz" or (method in ("GET", "HEAD") and path in ("/", "/favicon.ico")):
        return "open"  # health checks, and the dashboard page itself (it asks for a key)
    if path == "/metrics":
        return "metrics"
    if path.startswith(("/v1/", "/api/")):  # OpenAI-style and Ollama-style inference
        return "user"
    return "admin"


def allowed(role: str, needed: str) -> bool:
    return needed == "open" or needed in ROLE_AREAS.get(role, ())


def presented_key(headers: Mapping[str, str]) -> str | None:
    """`Authorization: Bearer KEY` (OpenAI's convention) or `x-api-key: KEY`."""
    value = headers.get("Authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    key = headers.get("x-api-key", "").strip()
    return key or None
