"""`aivailable status`: the cluster's nodes, GPUs with VRAM bars, leader and models, as rich tables."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

STATE_STYLE = {
    "alive": "green",
    "suspect": "yellow",
    "dead": "red",
    "left": "dim",
    "ready": "green",
    "loading": "yellow",
    "pending": "cyan",
    "failed": "red",
    "stopping": "dim",
}


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def vram_bar(total: int, free: int, width: int = 20) -> str:
    """A text bar of used VRAM, e.g. '[######----] 4.0/8.0 GiB'."""
    if total <= 0:
        return "-"
    used = max(0, total - free)
    filled = round(width * used / total)
    return f"[{'#' * filled}{'-' * (width - filled)}] {_gib(used)}/{_gib(total)}"


def _styled(state: str) -> str:
    return f"[{STATE_STYLE.get(state, 'white')}]{state}[/]"


def render_status(status: dict, console: Console | None = None) -> None:
    console = console or Console()
    console.print(
        f"node [bold]{status.get('node_id')}[/]  leader [bold]{status.get('leader')}[/]"
        f"  term {status.get('term')}"
    )
    nodes = Table(title="Nodes")
    for col in ("node", "address", "state", "GPU", "VRAM used", "instances"):
        nodes.add_column(col)
    for node in status.get("nodes", []):
        gpus = node.get("gpus") or [{}]
        instances = ", ".join(f"{i['model']} ({i['state']})" for i in node.get("instances", []))
        for i, gpu in enumerate(gpus):
            first = i == 0
            nodes.add_row(
                node["id"] if first else "",
                node.get("addr", "") if first else "",
                _styled(node.get("state", "?")) if first else "",
                f"{gpu.get('name', 'none')} ({gpu.get('vendor', '')})" if gpu else "none",
                vram_bar(gpu.get("vram_total", 0), gpu.get("vram_free", 0)) if gpu else "-",
                instances if first else "",
            )
    console.print(nodes)
    models = Table(title="Models")
    for col in ("model", "replicas", "placements"):
        models.add_column(col)
    for model in status.get("models", []):
        placements = ", ".join(
            escape(f"{p['node']}[{','.join(p.get('gpus', []))}]") + f" {_styled(p['state'])}"
            for p in model.get("placements", [])
        ) or model.get("unplaced", "unplaced")
        models.add_row(model["name"], str(model.get("replicas", "")), placements)
    console.print(models)
