"""LlamaEngine with real llama.cpp on the real SmolLM2 model, fetched through the store
(slow), and with stand-in workers that misbehave in ways llama.cpp rarely does (fast).

Each real test starts its own worker child (about a second on a CPU) and keeps
generations short; the cancel and queue tests ask for long ones and stop them early.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from aivailable.backends import worker_protocol as wire
from aivailable.backends.base import (
    ChatRequest,
    CompletionRequest,
    ContextOverflow,
    EngineError,
    EngineUnavailable,
    Finished,
    QueueFull,
    SamplingParams,
    TextDelta,
)
from aivailable.backends.llama_engine import (
    WORKER_ARGV,
    EngineConfig,
    LlamaEngine,
)
from aivailable.backends.llama_factory import n_gpu_layers_for
from aivailable.gpu import GpuInfo, cpu_device, parse_fake_gpu

# Restart quickly: the test waits for it.
FAST = EngineConfig(restart_backoff_initial=0.1, stop_timeout=10.0)
HI = ChatRequest(
    messages=({"role": "user", "content": "Say hello in one short sentence."},),
    params=SamplingParams(max_tokens=12, temperature=0.0, seed=1),
)
LONG = CompletionRequest("Once upon a time", SamplingParams(max_tokens=400, temperature=0.8))


slow = pytest.mark.slow


@pytest.fixture(scope="session")
def smollm2(embedded_model) -> Path:
    return embedded_model


@pytest.fixture
async def engine(smollm2):
    states = []
    eng = LlamaEngine(
        "smollm2-135m",
        smollm2,
        n_ctx=512,
        queue_limit=2,
        config=FAST,
        n_parallel=1,  # one slot: the queue tests below need a request to wait
        on_state_change=states.append,
    )
    eng.states = states
    await eng.start()
    yield eng
    pid = eng.pid
    await eng.stop()
    assert eng.pid is None and eng.state == "pending"
    if pid is not None:
        with pytest.raises(ProcessLookupError):  # the child is gone (and reaped)
            os.kill(pid, 0)


async def collect(engine, request):
    return [event async for event in engine.generate(request)]


async def eventually(predicate) -> None:
    """Poll `predicate` for up to 30 s (generous: the machine's cores are shared)."""
    for _ in range(1500):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached within 30 s")


@slow
async def test_chat_streams_text_then_finished(engine):
    events = await collect(engine, HI)
    *deltas, finished = events
    assert deltas and all(isinstance(e, TextDelta) for e in deltas)
    assert "".join(d.text for d in deltas).strip()
    assert isinstance(finished, Finished)
    assert finished.prompt_tokens > 10  # the chat template's tokens are counted too
    assert 0 < finished.completion_tokens <= 12
    assert finished.finish_reason in ("stop", "length")
    assert engine.queue_depth == 0
    assert engine.states == ["loading", "ready"]


@slow
async def test_completion_respects_max_tokens_and_seed(engine):
    request = CompletionRequest("The sky is", SamplingParams(max_tokens=6, seed=42))
    first = await collect(engine, request)
    second = await collect(engine, request)
    assert first[-1] == Finished("length", first[-1].prompt_tokens, 6, 0, ("length",))
    text = lambda events: "".join(e.text for e in events[:-1])  # noqa: E731
    assert text(first) == text(second)  # same seed, same text
    assert second[-1].cached_tokens == first[-1].prompt_tokens - 1  # and from the prefix cache


@slow
async def test_cancel_mid_stream_frees_the_slot(engine):
    stream = engine.generate(LONG)
    for _ in range(3):
        assert isinstance(await anext(stream), TextDelta)
    assert engine.queue_depth == 1
    await stream.aclose()
    assert engine.queue_depth == 0
    await eventually(lambda: engine.cancelled == 1)  # the worker stopped it mid-generation
    assert (await collect(engine, HI))[-1].completion_tokens > 0


@slow
async def test_queue_full(engine):
    running, waiting = engine.generate(LONG), engine.generate(LONG)
    assert isinstance(await anext(running), TextDelta)
    queued = asyncio.ensure_future(anext(waiting))
    await eventually(lambda: engine.queue_depth == 2)
    with pytest.raises(QueueFull) as info:
        await collect(engine, HI)
    assert info.value.retry_after > 0
    await running.aclose()
    assert isinstance(await queued, TextDelta)  # the freed slot went to the waiting one
    await waiting.aclose()
    await eventually(lambda: engine.cancelled == 2)
    assert engine.queue_depth == 0


@slow
async def test_context_overflow(engine):
    with pytest.raises(ContextOverflow, match="context holds 512"):
        await collect(engine, CompletionRequest("word " * 600, SamplingParams(max_tokens=4)))
    assert (await collect(engine, HI))[-1].completion_tokens > 0  # still serving


@slow
async def test_killed_worker_fails_in_flight_then_restarts(engine):
    stream = engine.generate(LONG)
    await anext(stream)
    old_pid = engine.pid
    os.kill(old_pid, signal.SIGKILL)
    with pytest.raises(EngineUnavailable, match="exited with code -9"):
        async for _ in stream:
            pass
    await eventually(lambda: engine.state == "ready" and engine.pid not in (None, old_pid))
    assert engine.restarts == 1 and engine.last_exit_code == -signal.SIGKILL
    assert engine.states == ["loading", "ready", "failed", "loading", "ready"]
    assert (await collect(engine, HI))[-1].completion_tokens > 0


@slow
async def test_requests_while_not_ready_are_unavailable(smollm2):
    eng = LlamaEngine("smollm2-135m", smollm2, n_ctx=512, config=FAST)
    with pytest.raises(EngineUnavailable, match="pending"):
        await collect(eng, HI)


@slow
async def test_unloadable_model_fails_start_clearly(tmp_path):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"GGUF" + b"\x00" * 64)
    eng = LlamaEngine("bogus", bogus, config=FAST)
    with pytest.raises(EngineUnavailable, match="cannot load bogus.gguf"):
        await eng.start()
    assert eng.state in ("failed", "loading")  # the supervisor keeps retrying
    await eng.stop()
    assert eng.state == "pending" and eng.pid is None


@slow
async def test_run_in_a_task_group(smollm2):
    eng = LlamaEngine("smollm2-135m", smollm2, n_ctx=512, config=FAST)
    async with asyncio.TaskGroup() as tg:
        runner = tg.create_task(eng.run())
        await eng.wait_ready()
        pid = eng.pid
        assert (await collect(eng, HI))[-1].completion_tokens > 0
        runner.cancel()
    assert eng.state == "pending" and eng.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@slow
def test_worker_exits_when_its_parent_goes_away(smollm2):
    """A peer that dies closes the worker's stdin: the worker stops mid-generation and
    exits, so no orphan keeps holding the model (and its GPU memory)."""
    worker = subprocess.Popen(
        [*WORKER_ARGV, "--model", str(smollm2), "--n-ctx", "512"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=Path(wire.__file__).parents[2],  # python -m imports this checkout's package
    )
    try:
        assert isinstance(wire.read_frame(worker.stdout), wire.Ready)
        params = SamplingParams(max_tokens=400)
        generate = wire.Generate(1, "completion", params, prompt="Once upon a time")
        worker.stdin.write(wire.encode(generate))
        worker.stdin.flush()
        assert isinstance(wire.read_frame(worker.stdout), wire.Deltas)
        worker.stdin.close()
        assert worker.wait(timeout=60) == 0
        frames = []
        while (frame := wire.read_frame(worker.stdout)) is not None:
            frames.append(frame)
        assert frames[-1] == wire.Cancelled(1)  # stopped, not run to the end
        assert len(frames) < 400
    finally:
        worker.kill()
        worker.wait()


# --- stand-in workers ---------------------------------------------------------------

STAND_IN_WORKER = textwrap.dedent(
    """
    import sys, time
    from aivailable.backends import worker_protocol as p

    out = sys.stdout.buffer
    def send(message):
        out.write(p.encode(message))
        out.flush()

    mode = sys.argv[1]
    if mode == "hang":  # never becomes ready
        time.sleep(60)
    send(p.Ready(pid=0, n_ctx=64, n_parallel=1, n_gpu_layers=0, n_threads=1))
    if mode == "garbage":  # a frame that is not msgpack
        out.write(p.HEADER.pack(5) + b"hello")
        out.flush()
        time.sleep(60)
    while (m := p.read_frame(sys.stdin.buffer)) is not None:
        if isinstance(m, p.Shutdown):
            break
        if not isinstance(m, p.Generate):
            continue
        if m.prompt in ("context_overflow", "internal"):
            send(p.Error(m.id, p.ErrorCode(m.prompt), m.prompt + "!"))
            continue
        words = m.prompt.split()
        for word in words:
            send(p.Deltas((p.Delta(m.id, 0, word),)))
        send(p.Done(m.id, ("stop",), prompt_tokens=len(words), completion_tokens=len(words)))
    """
)


@pytest.fixture
def stand_in(tmp_path):
    script = tmp_path / "stand_in_worker.py"
    script.write_text(STAND_IN_WORKER)

    def make(mode: str, **kwargs) -> LlamaEngine:
        config = EngineConfig(restart_backoff_initial=0.05, load_timeout=1.0, stop_timeout=2.0)
        return LlamaEngine(
            "stand-in",
            tmp_path / "no-model.gguf",
            config=config,
            worker_argv=[sys.executable, str(script), mode],
            **kwargs,
        )

    return make


async def test_stand_in_protocol_round_trip(stand_in):
    engine = stand_in("echo")
    await engine.start()
    events = await collect(engine, CompletionRequest("a b c"))
    *deltas, finished = events
    assert "".join(d.text for d in deltas) == "abc"  # deltas already queued may be joined
    assert finished == Finished("stop", 3, 3, 0, ("stop",))
    with pytest.raises(ContextOverflow, match="context_overflow!"):
        await collect(engine, CompletionRequest("context_overflow"))
    with pytest.raises(EngineError, match="internal!"):
        await collect(engine, CompletionRequest("internal"))
    assert engine.queue_depth == 0
    await engine.stop()
    assert engine.last_exit_code == 0  # left on SHUTDOWN, not killed


async def test_worker_that_never_loads_times_out(stand_in):
    engine = stand_in("hang")
    with pytest.raises(EngineUnavailable, match="did not load within"):
        await engine.start()
    await engine.stop()
    assert engine.state == "pending" and engine.pid is None


async def test_stop_while_loading_kills_the_worker(stand_in):
    engine = stand_in("hang")
    starting = asyncio.ensure_future(engine.start())
    await eventually(lambda: engine.pid is not None)
    pid = engine.pid
    await engine.stop()
    with pytest.raises(EngineUnavailable):
        await starting
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_stop_while_the_worker_is_being_spawned_ends_it(stand_in, monkeypatch):
    # The reconciler may stop an instance a moment after starting it (a restarted peer
    # acts on its old plan until it has caught up): stop() then finds no child yet.
    spawning, release = asyncio.Event(), asyncio.Event()
    spawn = asyncio.create_subprocess_exec

    async def gated_spawn(*args, **kwargs):
        spawning.set()
        await release.wait()
        return await spawn(*args, **kwargs)

    monkeypatch.setattr(asyncio, "create_subprocess_exec", gated_spawn)
    engine = stand_in("echo")
    async with asyncio.TaskGroup() as tg:
        tg.create_task(engine.run())  # as Instances runs it
        await spawning.wait()
        stopping = tg.create_task(engine.stop())
        await eventually(lambda: engine.state == "stopping")
        release.set()
        await asyncio.wait_for(stopping, 10)
    assert engine.state == "pending" and engine.pid is None


async def test_corrupt_frame_fails_the_worker_and_restarts_it(stand_in):
    states = []
    engine = stand_in("garbage", on_state_change=states.append)
    await engine.start()
    await eventually(lambda: engine.restarts >= 1)
    assert states[:3] == ["loading", "ready", "failed"]
    await engine.stop()
    assert engine.pid is None


def test_full_offload_only_with_a_real_gpu():
    nvidia = GpuInfo("gpu0", "nvidia", "GTX 1080", 8 << 30, 8 << 30, "470", "6.1")
    amd = GpuInfo("gpu0", "amd", "RX 580", 8 << 30, 8 << 30, "6.7", "gfx803")
    assert n_gpu_layers_for([]) == 0
    assert n_gpu_layers_for([parse_fake_gpu("fake:X:8GiB"), cpu_device()]) == 0
    assert n_gpu_layers_for([cpu_device(), nvidia]) == -1
    assert n_gpu_layers_for([amd]) == -1
