"""`aivailable models` and `aivailable ps`: tables from a peer's /cluster/status."""

import asyncio
import io
import json

from aiohttp.test_utils import TestServer
from rich.console import Console

from aivailable import cli
from aivailable.api.app import build_app
from aivailable.api.cluster_api import ClusterApi
from aivailable.metrics import Metrics
from aivailable.status_view import render_models, render_ps

STATUS = {
    "node_id": "a",
    "leader": "a",
    "term": 2,
    "nodes": [
        {
            "id": "a",
            "state": "alive",
            "gpus": [],
            "instances": [
                {"model": "chat-big", "state": "ready", "queue_depth": 3, "gpus": ["a/gpu0"]},
                {"model": "smol", "state": "loading", "queue_depth": 0, "gpus": ["a/gpu1"]},
            ],
        },
        {"id": "b", "state": "suspect", "gpus": [], "instances": []},
    ],
    "models": [
        {
            "name": "chat-big",
            "source": "hf://org/Big-GGUF:Q4_K_M",
            "replicas": 2,
            "n_ctx": 4096,
            "placements": [
                {"node": "a", "gpus": ["a/gpu0"], "state": "ready"},
                {"node": "b", "gpus": ["b/gpu0"], "state": "loading"},
            ],
        },
        {
            "name": "huge",
            "source": "hf://org/Huge-GGUF/huge-[F16].gguf",
            "replicas": 1,
            "n_ctx": 2048,
            "placements": [],
            "unplaced": "1 replica(s) unplaced: needs 40 GiB",
        },
    ],
    "downloads": [
        {"source": "org/Big-GGUF/big-Q4_K_M.gguf", "file": "big-Q4_K_M.gguf", "done": 1, "total": 4}
    ],
}


def text_of(render) -> str:
    out = io.StringIO()
    render(STATUS, Console(file=out, width=200, color_system=None))
    return out.getvalue()


def row(text: str, first_cell: str) -> str:
    return next(line for line in text.splitlines() if f" {first_cell} " in line)


def test_models_shows_ready_of_wanted_states_and_why_unplaced():
    text = text_of(render_models)
    big = row(text, "chat-big")
    assert "1/2" in big and "ready 1" in big and "loading 1" in big and "4096" in big
    huge = row(text, "huge")
    assert "0/1" in huge and "needs 40 GiB" in huge
    assert "huge-[F16].gguf" in huge  # rich markup in a name is printed, not parsed


def test_ps_shows_instances_per_node_and_downloads():
    text = text_of(render_ps)
    loading = row(text, "smol")
    assert "loading" in loading and "a/gpu1" in loading
    assert "3" in row(text, "chat-big")
    assert "suspect" in row(text, "b")
    assert "25%" in row(text, "org/Big-GGUF/big-Q4_K_M.gguf")


class View:
    def status(self) -> dict:
        return {k: v for k, v in STATUS.items() if k != "downloads"}


async def test_the_commands_read_a_real_peer(capsys):
    api = ClusterApi(View(), downloads=lambda: STATUS["downloads"])
    async with TestServer(build_app(Metrics(), lambda: True, [api.routes()])) as server:
        url = str(server.make_url(""))
        assert await asyncio.to_thread(cli.main, ["models", "--url", url]) == 0
        assert "chat-big" in capsys.readouterr().out
        assert await asyncio.to_thread(cli.main, ["ps", "--url", url, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["downloads"] == STATUS["downloads"]
        assert await asyncio.to_thread(cli.main, ["models", "--url", url, "--json"]) == 0
        assert [m["name"] for m in json.loads(capsys.readouterr().out)] == ["chat-big", "huge"]
    assert cli.main(["ps", "--url", "http://127.0.0.1:9"]) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_a_split_instance_shows_its_parts():
    status = {
        "nodes": [],
        "models": [
            {
                "name": "big",
                "replicas": 1,
                "placements": [
                    {
                        "node": "a",
                        "gpus": ["a/gpu0"],
                        "state": "ready",
                        "split": True,
                        "parts": [
                            {"node": "a", "gpu": "a/gpu0", "layers": 20, "vram": 300 << 20},
                            {"node": "b", "gpu": "b/gpu0", "layers": 11, "vram": 420 << 20},
                        ],
                    }
                ],
            }
        ],
    }
    for render in (render_models, render_ps):
        out = io.StringIO()
        render(status, Console(file=out, width=140))
        text = out.getvalue()
        assert "Split instances" in text and "primary" in text and "helper" in text
        assert "420 MiB" in text and "11" in text


def test_status_shows_each_gpu_s_backend_and_the_cards_the_build_cannot_drive():
    from aivailable.status_view import render_status

    node = {
        "id": "a",
        "state": "alive",
        "gpus": [
            {
                "name": "RX 580",
                "vendor": "amd",
                "backend": "Vulkan",
                "vram_total": 8 << 30,
                "vram_free": 8 << 30,
            },
        ],
        "unusable_gpus": [
            {"id": "gpu1", "vendor": "nvidia", "name": "GTX 1080", "reason": "no CUDA"}
        ],
        "instances": [],
    }
    out = io.StringIO()
    render_status({**STATUS, "nodes": [node]}, Console(file=out, width=200, color_system=None))
    text = out.getvalue()
    assert "RX 580 (amd, Vulkan)" in text
    assert "GTX 1080 (nvidia)" in text and "not usable" in text
