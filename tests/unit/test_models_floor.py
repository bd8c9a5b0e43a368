"""DESIGN.md "The app's floors": aivailable/models/ stands below cluster/, api/, access/,
backends/, server.py and config.py, and imports none of them."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
ALLOWED = {"aivailable.models", "aivailable.gpu", "aivailable.metrics"}


def imported(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module == "aivailable":  # from aivailable import x
                names.update(f"aivailable.{alias.name}" for alias in node.names)
    return names


def test_the_models_floor_imports_nothing_above_it():
    files = sorted((ROOT / "aivailable" / "models").glob("*.py"))
    assert files
    up = {
        f"{path.name}: {name}"
        for path in files
        for name in imported(path)
        if name.split(".")[0] == "aivailable"
        and name != "aivailable"
        and not any(name == a or name.startswith(a + ".") for a in ALLOWED)
    }
    assert not up, up
