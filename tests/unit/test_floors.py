"""The floors of aivailable/ (docs/contracts.md): every import runs down, never up.

Each module of aivailable/ stands on one floor; it may import its own floor and the floors
below it, never a floor above it nor one beside it. The lower packages (consensus/, peer/,
placement/) never import aivailable/. Every import counts: at the top, inside a function,
under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
APP = "aivailable"
LOWER_PACKAGES = ("consensus", "peer", "placement")

# Top to bottom. Floors in one tuple stand side by side: neither imports the other.
FLOORS: list[tuple[str, ...]] = [
    ("cli",),
    ("wiring", "client"),
    ("api",),
    ("access",),
    ("cluster",),
    ("backends",),
    ("models",),
    ("gpu", "metrics"),
]
# aivailable/PACKAGE/... stands on the floor of that name.
PACKAGE_FLOORS = {name: name for name in ("api", "access", "cluster", "backends", "models", "gpu")}
# Top-level modules of aivailable/, by name.
MODULE_FLOORS = {
    "__main__": "cli",
    "cli": "cli",
    "server": "wiring",  # the one place that builds the parts and hands them to each other
    "config": "wiring",  # composes every part's config dataclass; read by cli and server only
    "demo": "client",  # the client side of the CLI: talks HTTP to peers, never imports them
    "local_peers": "client",
    "chat_client": "client",
    "status_view": "client",
    "http_client": "client",
    "metrics": "metrics",
}
RANK = {floor: rank for rank, side in enumerate(FLOORS) for floor in side}


def module_name(relpath: str) -> str:
    parts = list(pathlib.PurePosixPath(relpath).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def floor_of(module: str) -> str | None:
    """The floor of a module of aivailable/ ("aivailable.cluster.node" -> "cluster"); None for
    the package itself (its empty __init__). KeyError for a module no floor names."""
    parts = module.split(".")
    if len(parts) == 1:
        return None
    if parts[1] in PACKAGE_FLOORS:
        return PACKAGE_FLOORS[parts[1]]
    return MODULE_FLOORS[parts[1]]


def is_module(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def imported(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, module) of every import in the tree; `from X import name` names X.name when
    that is a module (`from aivailable import store`), else X."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.append((node.lineno, full if is_module(full) else base))
    return sorted(set(found))


def violations(relpath: str, source: str) -> list[str]:
    module = module_name(relpath)
    top = module.split(".")[0]
    tree = ast.parse(source)
    is_package = relpath.endswith("__init__.py")
    out = []
    for line, target in imported(tree, module, is_package):
        if target.split(".")[0] != APP:
            continue
        where = f"{relpath}:{line}: imports {target}"
        if top in LOWER_PACKAGES:
            out.append(f"{where}, but {top}/ stands below aivailable/ and never imports it")
            continue
        if top != APP:
            continue
        mine, theirs = floor_of(module), floor_of(target)
        if mine is None or theirs is None or mine == theirs:
            continue
        if RANK[theirs] < RANK[mine]:
            out.append(f"{where}: the {mine} floor imports the {theirs} floor, which is above it")
        elif RANK[theirs] == RANK[mine]:
            out.append(
                f"{where}: the {mine} floor imports the {theirs} floor, which stands beside it"
            )
    return out


def sources() -> list[str]:
    return sorted(
        str(path.relative_to(ROOT))
        for package in (APP, *LOWER_PACKAGES)
        for path in (ROOT / package).rglob("*.py")
    )


def test_every_module_of_the_app_stands_on_a_floor():
    unplaced = []
    for relpath in sources():
        if relpath.startswith(f"{APP}/"):
            try:
                floor_of(module_name(relpath))
            except KeyError:
                unplaced.append(relpath)
    assert unplaced == [], "give these a floor in FLOORS (and docs/contracts.md)"


@pytest.mark.parametrize("relpath", sources())
def test_no_import_runs_up_the_floors(relpath):
    assert violations(relpath, (ROOT / relpath).read_text()) == []


def test_the_scanner_catches_what_it_must():
    code = (
        "from typing import TYPE_CHECKING\n"
        "from aivailable.api.errors import ApiError\n"  # up
        "from aivailable import store\n"  # down: fine
        "if TYPE_CHECKING:\n"
        "    from aivailable.config import Config\n"  # up, even for types only
        "def f():\n"
        "    import aivailable.cli\n"  # up, inside a function
    )
    found = violations("aivailable/cluster/x.py", code)
    assert [v.split(":")[1] for v in found] == ["2", "5", "7"]
    assert "the cluster floor imports the api floor" in found[0]
    beside = violations("aivailable/server.py", "from aivailable.demo import main\n")
    assert beside and "beside it" in beside[0]
    lower = violations("peer/x.py", "def f():\n    from aivailable.gpu import GpuInfo\n")
    assert lower and "peer/x.py:2" in lower[0]
    assert violations("aivailable/cli.py", "from aivailable.server import serve\n") == []
    assert violations("aivailable/models/store.py", "from aivailable.gpu import GpuInfo\n") == []
