"""A deploy of a source that can never load is refused at deploy time, with a 400."""

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from aivailable.api.app import build_app
from aivailable.api.cluster_api import ClusterApi
from aivailable.metrics import Metrics
from aivailable.models.check import refuse_reason


@pytest.fixture
def files(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    return gguf, text


def test_sources_that_can_never_load_are_refused(files, tmp_path):
    gguf, text = files
    assert refuse_reason(str(gguf)) is None
    for fine in ("builtin:smollm2-135m", "hf://org/repo/f.gguf", "https://x/f.gguf"):
        assert refuse_reason(fine) is None
    assert "not a regular file" in refuse_reason("/dev/zero")
    assert "not a regular file" in refuse_reason(str(tmp_path))
    assert "not a regular file" in refuse_reason(str(tmp_path / "missing.gguf"))
    assert "unknown model source" in refuse_reason("//x")
    assert "unknown model source" in refuse_reason("ftp://host/m.gguf")
    assert "not a GGUF file" in refuse_reason(str(text))


class View:
    def __init__(self):
        self.deployed = []

    def status(self):
        return {}

    async def deploy(self, name, source, replicas, n_ctx, **options):
        self.deployed.append(source)
        return {"name": name}

    async def undeploy(self, name):
        return False


async def test_a_bad_source_gets_400_and_is_never_proposed(files):
    gguf, _ = files
    view = View()
    app = build_app(Metrics(), lambda: True, [ClusterApi(view).routes()])
    server = TestServer(app)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as s:
            for source in ("/dev/zero", "//x"):
                async with s.post(server.make_url("/cluster/models"), json={"source": source}) as r:
                    assert r.status == 400
                    assert (await r.json())["error"]["code"] == "bad_source"
            async with s.post(server.make_url("/cluster/models"), json={"source": str(gguf)}) as r:
                assert r.status == 202
    finally:
        await server.close()
    assert view.deployed == [str(gguf)]
