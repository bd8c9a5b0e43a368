"""A deploy of a Hugging Face source records the checksum Hugging Face publishes (so every
replica runs the same bytes and peers copy the file from each other), and a peer finds a
file it downloaded before; against the imitation Hugging Face server."""

from __future__ import annotations

import asyncio
import hashlib

import aiohttp
import pytest

from aivailable.cluster.errors import ClusterError
from aivailable.cluster.raft import Proposer, RaftClusterView, apply_entry
from aivailable.cluster.state import ClusterState
from aivailable.cluster.view import ReadModel
from aivailable.models import hub, store
from aivailable.models.transfer import LocalModels
from tests.unit.hf_imitation import ImitationHub, Repo
from tests.unit.test_cluster_view import FakeDriver
from tests.unit.test_models_store import write_tiny_gguf


@pytest.fixture
async def hf(tmp_path, monkeypatch):
    async with ImitationHub() as imitation:
        imitation.repos["org/Tiny-GGUF"] = Repo(
            {
                "Tiny-Q4_K.gguf": write_tiny_gguf(tmp_path / "a.gguf", 900).read_bytes(),
                "Tiny-Q8_0.gguf": write_tiny_gguf(tmp_path / "b.gguf", 901).read_bytes(),
            }
        )
        imitation.repos["org/Gated-GGUF"] = Repo(
            {"Gated-Q8_0.gguf": write_tiny_gguf(tmp_path / "c.gguf", 902).read_bytes()},
            gated=True,
        )
        monkeypatch.setenv("HF_ENDPOINT", imitation.endpoint)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        yield imitation


def sha_of(hf: ImitationHub, repo: str, path: str) -> tuple[str, int]:
    data = hf.repos[repo].files[path]
    return hashlib.sha256(data).hexdigest(), len(data)


async def test_describe_gives_the_published_checksum_without_downloading(hf, tmp_path):
    cache = tmp_path / "cache"
    got = await asyncio.to_thread(store.describe, "hf://org/Tiny-GGUF:Q8_0", cache)
    assert got == sha_of(hf, "org/Tiny-GGUF", "Tiny-Q8_0.gguf")
    got = await asyncio.to_thread(store.describe, "hf://org/Tiny-GGUF/Tiny-Q4_K.gguf", cache)
    assert got == sha_of(hf, "org/Tiny-GGUF", "Tiny-Q4_K.gguf")
    assert hf.served("/cdn/") == [] and not cache.exists()
    assert store.describe("https://h.example/m.gguf", cache) is None
    assert store.describe("https://h.example/m.gguf#sha256=" + "a" * 64) == ("a" * 64, None)
    assert store.describe("builtin:smollm2-135m")[1] == store.BUILTINS["smollm2-135m"].size
    offline = hub.HubSettings(offline=True)
    with pytest.raises(hub.Unreachable, match="offline"):
        store.describe("hf://org/Tiny-GGUF:Q8_0", cache, settings=offline)
    await asyncio.to_thread(store.resolve, "hf://org/Tiny-GGUF:Q8_0", cache)
    got = store.describe("hf://org/Tiny-GGUF:Q8_0", cache, settings=offline)
    assert got == sha_of(hf, "org/Tiny-GGUF", "Tiny-Q8_0.gguf")


async def test_a_peer_finds_a_remote_model_it_downloaded_before(hf, tmp_path):
    local = LocalModels(tmp_path / "cache")
    source = "hf://org/Tiny-GGUF:Q4_K"
    assert not local.held_locally(source) and store.cached(source, local.cache_dir) is None
    model = await asyncio.to_thread(store.resolve, source, local.cache_dir)
    assert local.held_locally(source) and store.cached(source, local.cache_dir) == model.path
    assert not local.held_locally("hf://org/Tiny-GGUF:Q8_0")


async def test_a_deploy_records_hugging_face_s_checksum_and_refuses_what_it_cannot_get(
    hf, tmp_path, monkeypatch
):
    state = ClusterState()
    driver = FakeDriver()
    async with aiohttp.ClientSession() as session:
        proposer = Proposer(driver, session, lambda n: None, timeout_s=1.0)
        driver.appliers.append(apply_entry(state, [], proposer))
        view = RaftClusterView(
            "a", state, driver, proposer, ReadModel("a"), local_models=LocalModels(tmp_path / "c")
        )
        await view.deploy("tiny", "hf://org/Tiny-GGUF:Q8_0", 1, 1024)
        rec = state.models["tiny"]
        assert (rec.sha256, rec.size) == sha_of(hf, "org/Tiny-GGUF", "Tiny-Q8_0.gguf")
        for source, message in (
            ("hf://org/Gated-GGUF:Q8_0", "gated or private"),
            ("hf://org/Tiny-GGUF:Q2_K", "no Q2_K GGUF"),
            ("hf://org/Tiny-GGUF/None.gguf", "not found"),
        ):
            with pytest.raises(ClusterError, match=message) as info:
                await view.deploy("x", source, 1, 1024)
            assert info.value.status == 400 and info.value.param == "source"
        # Hugging Face out of reach from this peer: deployed anyway, the nodes fetch it later.
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
        await view.deploy("later", "hf://org/Tiny-GGUF:Q4_K", 1, 1024)
        assert state.models["later"].sha256 is None and "x" not in state.models
