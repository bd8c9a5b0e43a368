"""Scripted Raft scenarios compared with checked-in transcripts (etcd-raft's testdata style).

Each tests/unit/testdata/raft/*.txt holds commands and the output each printed: every Ready
(hard state, entries, messages, committed) and every message delivered. A change in behaviour
shows up as a diff of the transcript. To record a new scenario or accept a change after
reading the diff:  AIVAILABLE_REWRITE=1 python -m pytest tests/unit/test_consensus_transcripts.py
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest

from .raft_transcript import Transcript, parse, run_file

TESTDATA = Path(__file__).parent / "testdata" / "raft"
SCENARIOS = sorted(TESTDATA.glob("*.txt"))


def test_there_are_scenarios_for_each_feature():
    names = {p.stem for p in SCENARIOS}
    assert {
        "prevote",
        "checkquorum",
        "transfer",
        "confchange",
        "snapshot",
        "readindex",
        "rejoin",
    } <= names


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_transcript(path):
    expected, actual = run_file(path)
    if os.environ.get("AIVAILABLE_REWRITE") == "1":
        path.write_text(actual)
        return
    diff = "".join(
        difflib.unified_diff(
            expected.splitlines(True), actual.splitlines(True), "checked in", "now"
        )
    )
    assert actual == expected, f"{path.name} changed (AIVAILABLE_REWRITE=1 to accept):\n{diff}"


def test_the_runner_reports_a_changed_outcome():
    text = "nodes n1 n2\n----\nwrong output\n"
    (command_block,) = parse(text)
    assert Transcript().run(command_block[1]) != command_block[2]
