"""The chaos lab itself: hosts reach each other, and its faults really cut and heal links."""

import socket
import subprocess
import sys
import time

import pytest

from tests.chaos.netns import Lab, available

pytestmark = pytest.mark.chaos


def can_connect(addr: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((addr, port), timeout=timeout):
            return True
    except OSError:
        return False


@pytest.fixture
def lab():
    reason = available()
    if reason:
        pytest.fail(f"chaos tests need network namespaces: {reason}")
    with Lab(2) as lab:
        servers = [
            subprocess.Popen(
                [*h.exec_prefix(), sys.executable, "-m", "http.server", "8123", "--bind", h.addr],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for h in lab.hosts
        ]
        try:
            deadline = time.monotonic() + 10
            while not all(can_connect(h.addr, 8123) for h in lab.hosts):
                assert time.monotonic() < deadline, "lab servers did not start"
                time.sleep(0.05)
            yield lab
        finally:
            for s in servers:
                s.kill()
                s.wait()


def test_partition_cuts_a_host_off_and_heal_restores_it(lab):
    a, b = lab.hosts
    lab.partition(a)
    assert not can_connect(a.addr, 8123)
    assert can_connect(b.addr, 8123)
    lab.heal(a)
    assert can_connect(a.addr, 8123)


def test_total_loss_drops_everything_and_partial_loss_some(lab):
    a, _ = lab.hosts
    lab.loss(a, 100)
    assert not can_connect(a.addr, 8123)
    lab.loss(a, 30)
    results = [can_connect(a.addr, 8123, timeout=0.3) for _ in range(30)]
    assert any(results)  # 30% loss each way still lets most connections through
    lab.heal(a)
    assert can_connect(a.addr, 8123)


def connects_from(host, addr: str, port: int) -> bool:
    """Whether `host` (inside its namespace) reaches addr:port."""
    code = f"import socket; socket.create_connection(({addr!r}, {port}), timeout=0.5)"
    return subprocess.run([*host.exec_prefix(), sys.executable, "-c", code]).returncode == 0


def test_a_watchable_partition_still_lets_the_test_process_in(lab):
    a, b = lab.hosts
    assert connects_from(b, a.addr, 8123)
    lab.partition(a, watchable=True)
    assert can_connect(a.addr, 8123)  # the test still sees it
    assert not connects_from(b, a.addr, 8123)  # its peers do not
    lab.isolate_group([a], watchable=True)
    assert can_connect(a.addr, 8123)
    assert not connects_from(b, a.addr, 8123)
    lab.heal(a)
    assert connects_from(b, a.addr, 8123)
