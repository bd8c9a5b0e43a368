"""Discovery's safety rules and filtering, and the agent's flag parsing (no network)."""

import pytest

from peer.__main__ import parse_fake_gpu, parse_size
from peer.discovery import Discovery


class FakeInfo:
    def __init__(self, props, port=7946, addresses=("127.0.0.1",)):
        self.properties = props
        self.port = port
        self._addresses = list(addresses)

    def parsed_addresses(self, version=None):
        return self._addresses


def discovery(found):
    return Discovery("me", "cluster-1", "127.0.0.1", 7946, lambda *a: found.append(a))


def test_announcing_on_every_interface_is_refused():
    with pytest.raises(ValueError):
        Discovery("me", "c", "0.0.0.0", 1, lambda *a: None)
    assert Discovery("me", "c", "0.0.0.0", 1, lambda *a: None, announce_host="127.0.0.1").host == (
        "127.0.0.1"
    )


def test_only_peers_of_the_same_cluster_are_offered_to_gossip():
    found = []
    d = discovery(found)
    d._consider(FakeInfo({b"id": b"other", b"cluster": b"cluster-2"}))
    d._consider(FakeInfo({b"id": b"me", b"cluster": b"cluster-1"}))
    d._consider(FakeInfo({b"cluster": b"cluster-1"}))
    d._consider(FakeInfo({b"id": b"peer", b"cluster": b"cluster-1"}, port=8001))
    assert found == [("peer", "127.0.0.1", 8001)]
    assert d.ignored_other_cluster == 1


@pytest.mark.parametrize(
    "text,size",
    [("8GiB", 8 << 30), ("12GB", 12 * 10**9), ("4096MiB", 4 << 30), ("1.5GiB", 3 << 29)],
)
def test_vram_sizes(text, size):
    assert parse_size(text) == size


def test_fake_gpu_names_may_contain_spaces_and_colons():
    gpu = parse_fake_gpu("fake:GeForce GTX 1080 Ti: OC:11GiB", "n1", 2)
    assert gpu == {"id": "n1/gpu2", "vendor": "fake", "name": "GeForce GTX 1080 Ti: OC",
                   "vram_total": 11 << 30, "vram_free": 11 << 30}  # fmt: skip
    for bad in ("nvidia:x:8GiB", "fake:8GiB", "fake:x:8 lightyears"):
        with pytest.raises(ValueError):
            parse_fake_gpu(bad, "n1", 0)
