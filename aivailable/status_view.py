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


def gpu_readings(gpu: dict) -> str:
    """' 64 °C 12% busy', and the health problem in red, from what NVML/amdsmi read."""
    text = ""
    if gpu.get("temperature") is not None:
        text += f" {gpu['temperature']} °C"
    if gpu.get("utilization") is not None:
        text += f" {gpu['utilization']}% busy"
    if gpu.get("health"):
        text += f" [red]unhealthy: {escape(str(gpu['health']))}[/]"
    return text


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
        # Cards its llama.cpp build cannot drive are listed too, never with VRAM to use.
        unusable = [{**g, "unusable": True} for g in node.get("unusable_gpus", [])]
        gpus = (node.get("gpus") or []) + unusable or [{}]
        instances = ", ".join(f"{i['model']} ({i['state']})" for i in node.get("instances", []))
        for i, gpu in enumerate(gpus):
            first = i == 0
            kind = ", ".join(x for x in (gpu.get("vendor", ""), gpu.get("backend", "")) if x)
            nodes.add_row(
                node["id"] if first else "",
                node.get("addr", "") if first else "",
                _styled(node.get("state", "?")) if first else "",
                f"{escape(str(gpu.get('name', 'none')))} ({kind}){gpu_readings(gpu)}"
                if gpu
                else "none",
                "not usable"
                if gpu.get("unusable")
                else vram_bar(gpu.get("vram_total", 0), gpu.get("vram_free", 0))
                if gpu
                else "-",
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
        models.add_row(model["name"], replicas_text(model), placements)
    console.print(models)


def replicas_text(model: dict) -> str:
    """A fixed deploy's count, or a scaled one's current/wanted (min..max), its demand and
    its last scaling decision with the reason."""
    sc = model.get("scaling")
    if not sc:
        return str(model.get("replicas", ""))
    demand = sc.get("demand") or {}
    text = (
        f"{sc.get('current')}/{sc.get('wanted')} ({sc.get('min_replicas')}.."
        f"{sc.get('max_replicas')}) occupancy {demand.get('occupancy', 0):.2f}, "
        f"{demand.get('rpm', 0):.0f} req/min"
    )
    last = sc.get("last_decision")
    if last:
        text += f"; {last.get('from')}->{last.get('to')}: {last.get('reason')}"
    return escape(text)


def _counts(states: list[str]) -> str:
    order = [s for s in STATE_STYLE if s in states] + sorted(set(states) - set(STATE_STYLE))
    return ", ".join(f"{_styled(s)} {states.count(s)}" for s in order) or "-"


def render_models(status: dict, console: Console | None = None) -> None:
    """`aivailable models`: each deployed model, its replicas ready of wanted, their states."""
    console = console or Console()
    table = Table(title="Models")
    for col in ("model", "source", "ready", "n_ctx", "instances", "note"):
        table.add_column(col)
    for model in status.get("models", []):
        states = [p.get("state", "?") for p in model.get("placements", [])]
        table.add_row(
            escape(str(model.get("name", "?"))),
            escape(str(model.get("source", ""))),
            f"{states.count('ready')}/{model.get('replicas', '?')}",
            str(model.get("n_ctx", "")),
            _counts(states),
            escape(model.get("unplaced", "")) + (" " + replicas_text(model))
            if model.get("scaling")
            else escape(model.get("unplaced", "")),
        )
    console.print(table)
    render_splits(status, console)


def render_splits(status: dict, console: Console) -> None:
    """A split instance's parts (placement/split.py): node, device, layers and bytes each."""
    rows = [
        (model.get("name", "?"), p)
        for model in status.get("models", [])
        for p in model.get("placements", [])
        if p.get("split")
    ]
    if not rows:
        return
    table = Table(title="Split instances")
    for col in ("model", "state", "part", "node", "device", "layers", "VRAM"):
        table.add_column(col)
    for name, placement in rows:
        for i, part in enumerate(placement.get("parts", [])):
            role = "primary" if part.get("node") == placement.get("node") else "helper"
            table.add_row(
                escape(str(name)) if i == 0 else "",
                _styled(placement.get("state", "?")) if i == 0 else "",
                role,
                escape(str(part.get("node"))),
                escape(str(part.get("gpu"))),
                str(part.get("layers")),
                f"{part.get('vram', 0) / (1 << 20):.0f} MiB",
            )
    console.print(table)


def _percent(done: int, total: int | None) -> str:
    return f"{100 * done / total:.0f}%" if total else f"{done / (1 << 20):.0f} MiB"


def render_ps(status: dict, console: Console | None = None) -> None:
    """`aivailable ps`: the model instances on each node, and this peer's downloads."""
    console = console or Console()
    table = Table(title="Instances")
    for col in ("node", "node state", "model", "state", "GPUs", "queue"):
        table.add_column(col)
    for node in status.get("nodes", []):
        instances = node.get("instances") or [None]
        for i, inst in enumerate(instances):
            table.add_row(
                escape(node.get("id", "?")) if i == 0 else "",
                _styled(node.get("state", "?")) if i == 0 else "",
                escape(inst["model"]) if inst else "-",
                _styled(inst.get("state", "?")) if inst else "",
                escape(", ".join(inst.get("gpus", []))) if inst else "",
                str(inst.get("queue_depth", 0)) if inst else "",
            )
    console.print(table)
    render_splits(status, console)
    downloads = status.get("downloads") or []
    if downloads:
        table = Table(title=f"Downloads on {escape(str(status.get('node_id')))}")
        for col in ("source", "file", "progress"):
            table.add_column(col)
        for d in downloads:
            table.add_row(
                escape(str(d.get("source"))),
                escape(str(d.get("file"))),
                _percent(d.get("done", 0), d.get("total")),
            )
        console.print(table)
