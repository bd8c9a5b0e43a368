"""DESIGN.md rule 1: the pure cores import no clock, socket, thread, event loop or global random.

Scanned: the fixed list of pure cores below, and every module whose docstring says it is
pure with the marker `Pure` (capital P: "Pure.", "Pure: no I/O", "Pure functions"). A
lowercase "pure" describes something else ("the asyncio adapter around the pure core").
"""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("aivailable", "consensus", "peer", "placement")
MARKER = re.compile(r"\bPure\b")
CORES = [
    "consensus/core.py",
    "consensus/replication.py",
    "consensus/progress.py",
    "consensus/log.py",
    "consensus/confchange.py",
    "consensus/wal.py",
    "peer/membership.py",
    "peer/availability.py",
    "peer/resume.py",
    "peer/awareness.py",
    "peer/broadcast.py",
    "peer/suspicion.py",
    "peer/wire.py",
    # The cluster floor's read model and pure steps (their runner does the I/O).
    "aivailable/cluster/controller.py",
    "aivailable/cluster/membership_policy.py",
    "aivailable/cluster/payload.py",
    "aivailable/cluster/reconciler.py",
    "aivailable/cluster/state.py",
    "aivailable/cluster/status.py",
    "aivailable/cluster/view.py",
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "placement").glob("*.py")),
]


def says_pure(path: pathlib.Path) -> bool:
    return bool(MARKER.search(ast.get_docstring(ast.parse(path.read_text())) or ""))


MARKED = sorted(
    str(p.relative_to(ROOT))
    for package in PACKAGES
    for p in (ROOT / package).rglob("*.py")
    if says_pure(p)
)
PURE = sorted(set(CORES) | set(MARKED))
FORBIDDEN_MODULES = {
    "asyncio",
    "socket",
    "threading",
    "time",
    "aiohttp",
    "uvloop",
    "random",
    "selectors",
    "subprocess",
    "multiprocessing",
    "secrets",  # random too, from the OS
    "uuid",  # uuid1 reads the clock, uuid4 the OS's randomness
}
# A seeded random.Random passed in is fine; the module-level functions share global state.
GLOBAL_RANDOM_CALLS = {"random", "randint", "choice", "shuffle", "uniform", "sample", "seed"}


def violations(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in FORBIDDEN_MODULES:
                    found.append(f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            top = node.module.split(".")[0]
            if top in FORBIDDEN_MODULES and not (
                top == "random" and {a.name for a in node.names} <= {"Random"}
            ):
                found.append(f"from {node.module} import ...")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "random"
            and node.func.attr in GLOBAL_RANDOM_CALLS
        ):
            found.append(f"random.{node.func.attr}()")
    return found


def test_the_marker_finds_the_modules_that_say_they_are_pure():
    assert "aivailable/backends/scheduler.py" in MARKED and "aivailable/access/limits.py" in MARKED
    assert "consensus/driver.py" not in MARKED  # "the asyncio adapter around the pure RaftNode"


def test_the_scanner_catches_what_it_must():
    bad = "import time\nfrom asyncio import sleep\nimport random\nrandom.choice([1])\n"
    assert len(violations(bad)) == 4
    assert violations("from random import Random\nimport dataclasses\n") == []


@pytest.mark.parametrize("relpath", PURE)
def test_pure_core_has_no_impure_imports(relpath):
    path = ROOT / relpath
    if not path.exists():
        pytest.fail(f"{relpath} is part of the DESIGN.md contract and must exist")
    assert violations(path.read_text()) == [], relpath


def local_imports(relpath: str) -> set[str]:
    """The consensus modules that `relpath` imports (relative imports), type-only ones too."""
    found = set()
    for node in ast.walk(ast.parse((ROOT / relpath).read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update([node.module] if node.module else [a.name for a in node.names])
    return found


def test_the_leader_replication_does_not_depend_on_the_node():
    # core.py builds a LeaderReplication; the reverse import would be a cycle, and a sign
    # that replication reaches into the node's private state again.
    assert "replication" in local_imports("consensus/core.py")
    assert "core" not in local_imports("consensus/replication.py")
    assert "._" not in (ROOT / "consensus/replication.py").read_text().replace("self._", "")


def test_peer_knows_nothing_of_the_api():
    """peer/ raises its own errors; aivailable/api maps them to HTTP (issue 13)."""
    offenders = []
    for path in sorted((ROOT / "peer").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("aivailable.api")]
    assert offenders == []
