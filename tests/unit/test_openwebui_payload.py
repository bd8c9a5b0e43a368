"""What Open WebUI 0.12.4's page sends with every chat, without Open WebUI installed: a short
question and its 36 built-in tools (memory, notes, knowledge, calendar, ...), about 6,000
prompt tokens, more than the default model's 2,048-token context. The refusal must say that
the tools are what filled it (tools/check_openwebui.py saw this end to end)."""

import pytest
from aiohttp.test_utils import TestClient, TestServer

from aivailable.api.app import build_app
from aivailable.api.openai_api import OpenAIApi
from aivailable.backends.fake_engine import FakeEngine
from aivailable.metrics import Metrics
from tests.unit.test_openai_api import instance

# The names Open WebUI 0.12.4 sent (captured through a loopback proxy); the schemas are ours.
OPEN_WEBUI_TOOLS = [
    "get_current_timestamp",
    "calculate_timestamp",
    "ask_user",
    "list_knowledge_bases",
    "search_knowledge_bases",
    "query_knowledge_bases",
    "grep_knowledge_files",
    "search_knowledge_files",
    "query_knowledge_files",
    "view_knowledge_file",
    "search_chats",
    "view_chat",
    "search_memories",
    "list_memory_paths",
    "read_memory_path",
    "list_memories",
    "update_memory",
    "add_memory",
    "replace_memory_content",
    "delete_memory",
    "search_notes",
    "view_note",
    "write_note",
    "replace_note_content",
    "create_skill",
    "create_tasks",
    "update_task",
    "create_automation",
    "update_automation",
    "list_automations",
    "toggle_automation",
    "delete_automation",
    "search_calendar_events",
    "create_calendar_event",
    "update_calendar_event",
    "delete_calendar_event",
]


def page_chat(stream: bool) -> dict:
    """The body shape Open WebUI's page sends on: model, messages, stream, tools."""
    tools = [
        {
            "type": "function",
            "function": {
                "name": name,
                "description": f"{name.replace('_', ' ')} for the signed-in user",
                "parameters": {
                    "type": "object",
                    "properties": {"query": {"type": "string", "description": "what to find"}},
                    "required": [],
                },
            },
        }
        for name in OPEN_WEBUI_TOOLS
    ]
    question = [{"role": "user", "content": "Say hello to the lab in one sentence."}]
    return {"stream": stream, "model": "fake", "messages": question, "tools": tools}


@pytest.fixture
async def client():
    engine = FakeEngine("fake", reply="hello lab", n_ctx=200)  # the question alone fits
    await engine.start()
    instances = {"fake": instance(engine)}
    api = OpenAIApi(lambda: instances, Metrics(), max_tokens_limit=64, request_timeout_s=5)
    client = TestClient(TestServer(build_app(Metrics(), lambda: True, [api.routes()])))
    await client.start_server()
    yield client
    await client.close()


@pytest.mark.parametrize("stream", [False, True])
async def test_the_overflow_names_the_tools_that_filled_the_context(client, stream):
    assert len(OPEN_WEBUI_TOOLS) == 36
    resp = await client.post("/v1/chat/completions", json=page_chat(stream))
    assert resp.status == 400  # a stream refused before its first token: plain JSON
    error = (await resp.json())["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert "the definitions of the 36 tools sent with it are part of the prompt" in error["message"]
    assert "larger n_ctx" in error["message"]


async def test_the_same_question_without_tools_is_answered(client):
    body = page_chat(stream=False)
    del body["tools"]
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 200
    assert (await resp.json())["choices"][0]["message"]["content"] == "hello lab"


async def test_an_overflow_without_tools_says_nothing_of_tools(client):
    body = page_chat(stream=False)
    del body["tools"]
    body["messages"][0]["content"] = "word " * 400
    resp = await client.post("/v1/chat/completions", json=body)
    error = (await resp.json())["error"]
    assert resp.status == 400 and error["code"] == "context_length_exceeded"
    assert "tools" not in error["message"]
