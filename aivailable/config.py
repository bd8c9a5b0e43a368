"""The peer's configuration: one frozen dataclass (DESIGN.md rule 4).

Sources, later ones winning: the defaults below, a TOML file (`--config`, or
`$AIVAILABLE_CONFIG`), environment variables `AIVAILABLE_<FIELD>` and command-line flags.
Every default says its unit and why it is what it is.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import tomllib
from dataclasses import dataclass, field
from typing import Any

from aivailable.access.config import AccessConfig
from aivailable.access.policy import AuthModeError, auth_enabled
from aivailable.backends.engine_config import EngineConfig
from aivailable.cluster.controller import ControllerConfig
from aivailable.cluster.membership_policy import MembershipConfig
from aivailable.cluster.reconciler import ReconcilerConfig
from consensus.driver import RaftConfig
from peer.auth import AuthConfig
from peer.config import GossipConfig
from peer.forward import ForwardConfig


def _default_data_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("XDG_DATA_HOME", pathlib.Path.home() / ".local/share"))


WILDCARDS = ("0.0.0.0", "::", "")


@functools.cache
def first_lan_address() -> str:
    """The first non-loopback IPv4 address of this machine's interfaces (read locally,
    nothing is sent), or 127.0.0.1 when there is none."""
    import ifaddr  # zeroconf's own dependency

    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ip.ip.startswith("127.") and ip.network_prefix < 32:
                return ip.ip
    return "127.0.0.1"


@dataclass(frozen=True)
class Config:
    # This node's id in the cluster. Default: the host name, which is unique on a LAN
    # and stable across restarts (the Raft log and gossip incarnations are keyed by it).
    name: str = field(default_factory=lambda: os.uname().nodename)
    # Address to listen on. Default loopback, so a peer started by hand never exposes
    # itself (or announces mDNS) on a LAN by surprise; a LAN needs 0.0.0.0 or an address.
    bind: str = "127.0.0.1"
    # The address other peers and clients use to reach this one (gossip, Raft, forwarding,
    # mDNS, join tokens). Empty: the bind address, or with a wildcard bind the machine's
    # first non-loopback IPv4 address; give it on multi-homed hosts, where that guess may
    # pick the wrong network.
    advertise: str = ""
    # TCP port for HTTP (API, dashboard, peer traffic) and UDP port for gossip: one
    # number so a firewall rule and a --join address stay simple.
    port: int = 8000
    # Where the Raft log, cluster secret and per-node state live. Default follows XDG.
    data_dir: pathlib.Path = field(default_factory=lambda: _default_data_dir() / "aivailable")
    # Where downloaded models are cached (the model store). None: ~/.cache/aivailable
    # or $AIVAILABLE_CACHE_DIR, shared by every peer on the machine.
    cache_dir: pathlib.Path | None = None
    # Use only the model cache: never download a model (as HF_HUB_OFFLINE=1 does). Off by
    # default so a deploy of hf://... just works; on for air-gapped labs, where a download
    # attempt would only wait for a timeout.
    offline: bool = False
    # Static seeds HOST:PORT, for networks without multicast. Default none: mDNS finds peers.
    join: tuple[str, ...] = ()
    # Announce and browse with mDNS. On by default: plug in and it joins.
    mdns: bool = True
    # Simulated GPUs "fake:NAME:VRAM" for demos and tests on machines without GPUs.
    gpu: tuple[str, ...] = ()
    # Offer this machine's CPU (its free RAM) as a device that may host whole models:
    # "auto" offers it only when the node has no GPU, so a GPU-less lab machine still
    # serves while GPU nodes never fall back to the CPU; "no" makes a routing-only peer.
    cpu: str = "auto"
    # Where the cluster secret is read from (created there if absent). None: data_dir/cluster.key.
    cluster_key_file: pathlib.Path | None = None
    # The model a brand-new cluster deploys once (the founder's controller commits it):
    # the embedded model, so `up` serves out of the box. "none" deploys nothing.
    # Undeploying it later sticks.
    model: str = "builtin:smollm2-135m"
    # Context window per model instance, in tokens. 2048 fits SmolLM2's chat use and
    # keeps the KV cache small (about 45 MiB for the 135M model at f16).
    n_ctx: int = 2048
    # Requests waiting or running per model before new ones get 429. 32 lets a burst of
    # clients queue (one llama.cpp context decodes one request at a time) without letting
    # a flood queue minutes of work.
    queue_limit: int = 32
    # Seconds a request may wait for a slot plus generate before it is cut off with an
    # error, so no client hangs forever behind a stuck worker.
    request_timeout_s: float = 300.0
    # Upper bound on max_tokens a client may ask for; also the default when it asks for
    # none, so a request without max_tokens cannot run for the whole context by accident.
    max_tokens_limit: int = 4096
    # Browser origins (e.g. "http://localhost:3000", or "*" for any) whose pages may call
    # this peer's API (CORS). Empty by default: otherwise any web page a user visits could
    # drive the peer on their machine or LAN through their browser.
    cors_origins: tuple[str, ...] = ()
    # An OTLP/HTTP collector (e.g. "http://127.0.0.1:4318") to export request spans to.
    # Empty by default: then nothing is imported, started or sent (aivailable/api/tracing.py).
    otlp_endpoint: str = ""
    # Logging level name for the peer's own log.
    log_level: str = "INFO"
    # Membership and gossip timing (peer/config.py explains each default); a [gossip]
    # table in the TOML file overrides single fields.
    gossip: GossipConfig = field(default_factory=GossipConfig)
    # Raft timing (consensus/driver.py explains each default); a [raft] table overrides.
    raft: RaftConfig = field(default_factory=RaftConfig)
    # The sections below work the same way; each module explains its defaults.
    # [controller]: suspect grace, re-plan tick, fallback VRAM estimate (aivailable/cluster/controller.py).
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    # [membership]: how many voters, when a dead voter is removed (membership_policy.py).
    membership: MembershipConfig = field(default_factory=MembershipConfig)
    # [reconciler]: VRAM headroom, start retry backoff (aivailable/cluster/reconciler.py).
    reconciler: ReconcilerConfig = field(default_factory=ReconcilerConfig)
    # [engine]: model worker restarts, load timeout, llama.cpp threads (llama_engine.py).
    engine: EngineConfig = field(default_factory=EngineConfig)
    # [forward]: connect, stall and request timeouts of the forwarding hop (peer/forward.py).
    forward: ForwardConfig = field(default_factory=ForwardConfig)
    # [auth]: clock skew and replay window of peer request signatures (peer/auth.py).
    auth: AuthConfig = field(default_factory=AuthConfig)
    # API keys for clients (`--auth`): "auto" turns them on when the peer binds a
    # non-loopback address, since anyone on a LAN could otherwise deploy and read prompts,
    # and leaves a loopback peer (only this machine's users) as easy as before; "on"
    # anywhere; "off" only on loopback (refused on a LAN bind).
    auth_mode: str = "auto"
    # The first admin key of a new cluster with auth on: read from here, created (0600)
    # if absent. None: data_dir/admin.key.
    admin_key_file: pathlib.Path | None = None
    # TLS for clients too (`--tls-cert`, `--tls-key`, PEM files): the API and dashboard on
    # the same port answer https:// as well as http://. None: plain HTTP for clients (peer
    # traffic is TLS regardless, [access] peer_tls); a lab may front peers with its own proxy.
    tls_cert: pathlib.Path | None = None
    tls_key: pathlib.Path | None = None
    # [access]: body limits and connection timeouts at the edge (aivailable/access/config.py).
    access: AccessConfig = field(default_factory=AccessConfig)

    def __post_init__(self) -> None:
        if self.cpu not in ("auto", "yes", "no"):
            raise ConfigError(f"cpu must be auto, yes or no, not {self.cpu!r}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be 1-65535, not {self.port}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together")
        if self.tls_cert is not None and not self.access.peer_tls:
            raise ConfigError("TLS for clients needs [access] peer_tls (the TLS port sorts them)")
        try:
            auth_enabled(self.auth_mode, self.bind)
        except AuthModeError as exc:
            raise ConfigError(str(exc)) from exc

    @property
    def advertise_host(self) -> str:
        if self.advertise:
            return self.advertise
        return first_lan_address() if self.bind in WILDCARDS else self.bind

    @property
    def advertise_addr(self) -> str:
        """The HOST:PORT other peers and clients use to reach this one."""
        host = self.advertise_host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def key_file(self) -> pathlib.Path:
        return self.cluster_key_file or self.data_dir / "cluster.key"

    @property
    def auth_on(self) -> bool:
        """Whether clients need an API key (see auth_mode)."""
        return auth_enabled(self.auth_mode, self.bind)

    @property
    def admin_key_path(self) -> pathlib.Path:
        return self.admin_key_file or self.data_dir / "admin.key"


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _coerce(name: str, value: Any) -> Any:
    """Turn a TOML or environment value into the field's type, with a clear error."""
    default = _FIELDS[name].default
    if default is dataclasses.MISSING:
        default = _FIELDS[name].default_factory()  # type: ignore[misc]
    try:
        if dataclasses.is_dataclass(default):
            if isinstance(value, type(default)):
                return value
            if not isinstance(value, dict):
                raise TypeError(f"{name} must be a table")
            return dataclasses.replace(
                default, **{k.replace("-", "_"): v for k, v in value.items()}
            )
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(value)
                return value.lower() in ("1", "true", "yes", "on")
            return bool(value)
        if isinstance(default, tuple):
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            return tuple(str(v) for v in value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if name in (
            "data_dir",
            "cache_dir",
            "cluster_key_file",
            "admin_key_file",
            "tls_cert",
            "tls_key",
        ):
            return pathlib.Path(value).expanduser()
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad value for {name}: {value!r}") from exc


class ConfigError(ValueError):
    pass


def load_config(
    overrides: dict[str, Any] | None = None,
    toml_path: str | os.PathLike | None = None,
    environ: dict[str, str] | None = None,
) -> Config:
    """Build the Config from defaults < TOML < environment < overrides (flags)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    toml_path = toml_path or environ.get("AIVAILABLE_CONFIG")
    if toml_path:
        try:
            with open(toml_path, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {toml_path}: {exc}") from exc
        for key, value in data.items():
            key = key.replace("-", "_")
            if key not in _FIELDS:
                raise ConfigError(f"unknown setting {key!r} in {toml_path}")
            values[key] = _coerce(key, value)
    for name in _FIELDS:
        env_value = environ.get(f"AIVAILABLE_{name.upper()}")
        if env_value is not None:
            values[name] = _coerce(name, env_value)
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = _coerce(key, value)
    return Config(**values)
