"""Fixtures shared by the tests on real peer processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_cluster_peers import Cluster


@pytest.fixture
def cluster(tmp_path: Path):
    """Real `aivailable up` peers on loopback, all stopped at the end."""
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop_all()
