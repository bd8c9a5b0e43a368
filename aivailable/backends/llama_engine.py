"""LlamaEngine: the parent side of one llama.cpp model worker (`llama_worker.py`).

The model runs in a child process so that a llama.cpp crash cannot take the peer down
and its exit frees the GPU memory. A supervisor (`run()`) spawns the child, reads its
frames, forwards its stderr to our log, and when the child dies fails the requests in
flight with EngineUnavailable and starts a new child after a backoff
("failed" -> "loading" -> "ready"). Requests queue in a bounded queue; closing a
generate() iterator early sends a cancel to the worker and frees the slot at once.

Two ways to drive it:
- `await engine.start()`: the engine owns its supervisor task; `await engine.stop()`
  stops the child and awaits that task.
- `tg.create_task(engine.run())` in the caller's TaskGroup, then
  `await engine.wait_ready()`; cancelling run() (or `stop()`) ends the child.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from aivailable.backends import lifecycle
from aivailable.backends import worker_protocol as wire
from aivailable.backends.base import (
    ChatRequest,
    CompletionRequest,
    ContextOverflow,
    Embeddings,
    Engine,
    EngineError,
    EngineUnavailable,
    Event,
    Finished,
    InstanceState,
    InvalidRequest,
    QueueFull,
    TextDelta,
    Timing,
)
from aivailable.backends.engine_config import EngineConfig
from aivailable.backends.scheduler import Admission

log = logging.getLogger(__name__)
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # so the child imports this code
WORKER_ARGV = (sys.executable, "-m", "aivailable.backends.llama_worker")


class LlamaEngine(Engine):
    def __init__(
        self,
        name: str,
        model_path: str | os.PathLike,
        n_ctx: int = 2048,
        n_gpu_layers: int = 0,
        queue_limit: int = 16,
        env: dict[str, str] | None = None,
        *,
        main_gpu: int | None = None,
        tensor_split: Sequence[float] | None = None,
        config: EngineConfig | None = None,
        n_parallel: int | None = None,
        kind: str = "chat",
        kv_type: str = "f16",
        on_state_change: Callable[[InstanceState], None] | None = None,
        worker_argv: Sequence[str] | None = None,
        rpc_servers: Sequence[str] = (),
    ):
        """`n_gpu_layers`: -1 offloads every layer (a node with a GPU), 0 keeps all on the
        CPU. `queue_limit`: requests waiting or running before QueueFull. `env`: added to
        the child's environment (CUDA_VISIBLE_DEVICES, HIP_VISIBLE_DEVICES, ...).
        `worker_argv`: the command that starts a worker (the model arguments follow);
        tests put stand-in workers here. `n_parallel`: slots (default from config).
        `kind`: "chat" generates text, "embedding" serves pooled embeddings.
        `rpc_servers`: llama.cpp RPC servers (host:port) holding layers of a split model;
        `tensor_split` then runs over [their devices..., local gpus...]."""
        self.name = name
        self.model_path = Path(model_path)
        self.n_ctx = n_ctx
        self.n_gpu_layers = n_gpu_layers
        self.queue_limit = queue_limit
        self.env = dict(env or {})
        self.main_gpu = main_gpu
        self.tensor_split = tuple(tensor_split) if tensor_split else None
        self.rpc_servers = tuple(rpc_servers)
        self.config = config or EngineConfig()
        self.on_state_change = on_state_change
        self.worker_argv = list(worker_argv or WORKER_ARGV)
        self.state: InstanceState = "pending"
        self.kind = kind
        self.kv_type = kv_type  # K and V cache type (llama_runtime.KV_GGML_TYPES)
        self.n_parallel = n_parallel or self.config.n_parallel or (8 if n_gpu_layers else 4)
        # a split whose first layers stay on this host's CPU computes them here: all cores
        on_gpu = n_gpu_layers and not (self.rpc_servers and not self.env)
        self.n_threads = self.config.n_threads or (4 if on_gpu else None)
        self._admission = Admission(self.n_parallel, self.config.max_queue_wait)
        self.restarts = 0  # children started after the first one
        self.last_error = ""  # why the last child failed, for status pages and logs
        self.last_exit_code: int | None = None
        self.load_failures = 0  # children that died or failed before ready
        self.cancelled = 0  # generations the worker stopped early on our cancel
        self._proc: asyncio.subprocess.Process | None = None
        self._pending: dict[int, asyncio.Queue] = {}  # request id -> its events
        self._ids = itertools.count(1)
        self._depth = 0
        self._state_changed = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._run_done = asyncio.Event()
        self._running = False  # a run() is under way or about to start
        self._supervising = False  # a run() body is executing
        self._runner: asyncio.Task | None = None
        self._stderr_tail: deque[str] = deque(maxlen=20)

    # --- state -------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The worker child's pid while one runs (tests kill it)."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    @property
    def queue_depth(self) -> int:
        return self._depth

    def admits(self) -> bool:
        """generate()'s own test of the queue bound, without a request."""
        return self._depth < self.queue_limit and self._admission.retry_after(self._depth) is None

    def _set_state(self, state: InstanceState) -> None:
        if state == self.state:
            return
        try:  # the one lifecycle table (backends/lifecycle.py): a skip is a bug
            lifecycle.advance(self.state, state)
        except lifecycle.IllegalTransition as exc:
            log.error("model %s: %s", self.name, exc)
        log.info("model %s: %s -> %s", self.name, self.state, state)
        self.state = state
        if state == "ready":
            self._measure_from_ready()
        self._state_changed.set()
        self._state_changed = asyncio.Event()
        if self.on_state_change is not None:
            try:
                self.on_state_change(state)
            except Exception:
                log.exception("on_state_change callback failed")

    async def wait_ready(self) -> None:
        """Return once ready; raise EngineUnavailable if a load attempt fails meanwhile
        (the supervisor keeps retrying with backoff) or the engine stops."""
        load_failures = self.load_failures
        while self.state != "ready":
            if self.load_failures > load_failures:
                raise EngineUnavailable("failed", self.last_error)
            if self._run_done.is_set() and not self._running:
                raise EngineUnavailable(self.state, "the engine is not running")
            await self._state_changed.wait()

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if not self._running and self._runner is None:
            self._prepare_run()
            # Owned: stop() cancels and awaits it.
            self._runner = asyncio.create_task(self.run(), name=f"engine:{self.name}")
        await self.wait_ready()

    def _prepare_run(self) -> None:
        self._stop_requested.clear()
        self._run_done.clear()
        self.last_error = ""
        self._running = True

    async def stop(self) -> None:
        if not self._running and self._runner is None:
            return
        was_ready = self.state == "ready"
        self._stop_requested.set()
        self._set_state("stopping")
        proc = self._proc
        if proc is not None:
            if was_ready:  # let it finish cleanly: it exits on SHUTDOWN or end of input
                self._send_quietly(proc, wire.Shutdown())
                with contextlib.suppress(Exception):
                    proc.stdin.close()
            else:  # still loading: nothing worth waiting for
                self._kill(proc)
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel.
                async with asyncio.timeout(self.config.stop_timeout):
                    await self._run_done.wait()
            except TimeoutError:
                self._kill(proc)
        if self._runner is not None:
            runner, self._runner = self._runner, None
            if not self._run_done.is_set():
                runner.cancel()
            await asyncio.wait([runner])  # a cancel of stop() itself still propagates
            if not runner.cancelled() and runner.exception() is not None:
                log.error("model %s: supervisor failed", self.name, exc_info=runner.exception())
        else:
            await self._run_done.wait()

    async def run(self) -> None:
        """Supervise the worker until cancelled or stopped: spawn, serve, restart."""
        if self._supervising:  # two supervisors would mean two children
            raise RuntimeError(f"engine {self.name} is already running")
        self._supervising = True
        if not self._running:
            self._prepare_run()
        loop = asyncio.get_running_loop()
        backoff = self.config.restart_backoff_initial
        first = True
        try:
            while not self._stop_requested.is_set():
                if not first:
                    self.restarts += 1
                first = False
                started = loop.time()
                await self._run_child()
                if self._stop_requested.is_set():
                    break
                if loop.time() - started >= self.config.stable_after:
                    backoff = self.config.restart_backoff_initial
                log.warning(
                    "model %s: worker failed (%s); restarting in %.1fs",
                    self.name,
                    self.last_error,
                    backoff,
                )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(backoff):
                        await self._stop_requested.wait()
                backoff = min(backoff * 2, self.config.restart_backoff_max)
        finally:
            if self._proc is not None:  # cancelled mid-child
                self._kill(self._proc)
                await self._proc.wait()
                self._proc = None
            self._fail_all(EngineUnavailable("stopping", "the model is being stopped"))
            self._running = False
            self._supervising = False
            self._set_state("stopping")  # cancelled without stop(): the same way down
            self._set_state("pending")
            self._run_done.set()

    def _command(self) -> list[str]:
        cmd = list(self.worker_argv)
        cmd += ["--model", str(self.model_path), "--n-ctx", str(self.n_ctx)]
        cmd += ["--n-gpu-layers", str(self.n_gpu_layers), "--n-batch", str(self.config.n_batch)]
        cmd += ["--n-parallel", str(self.n_parallel)]
        if self.kind == "embedding":
            cmd.append("--embedding")
        if self.kv_type != "f16":
            cmd += ["--kv-type", self.kv_type]
        if self.kind != "embedding" and self.config.prompt_cache_mib > 0:
            cmd += ["--prompt-cache-mib", str(self.config.prompt_cache_mib)]
        if self.main_gpu is not None:
            cmd += ["--main-gpu", str(self.main_gpu)]
        if self.tensor_split:
            cmd += ["--tensor-split", ",".join(str(x) for x in self.tensor_split)]
        if self.rpc_servers:
            cmd += ["--rpc", ",".join(self.rpc_servers)]
        if self.n_threads:
            cmd += ["--n-threads", str(self.n_threads)]
        if self.config.verbose:
            cmd.append("--verbose")
        return cmd

    def _child_env(self) -> dict[str, str]:
        env = {**os.environ, **self.env}
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = _PACKAGE_ROOT + (os.pathsep + path if path else "")
        # CUDA numbers devices fastest-first by default, NVML by PCI bus: make them agree.
        env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        return env

    async def _run_child(self) -> None:
        """One child's life: spawn, wait for ready, serve frames until it exits."""
        self._set_state("loading")
        self._stderr_tail.clear()
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._command(),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._child_env(),
                start_new_session=True,  # a Ctrl-C in the terminal goes to the peer only
            )
        except OSError as e:
            self.last_error = f"cannot start the worker: {e}"
            self.load_failures += 1
            self._set_state("failed")
            return
        self._proc = proc
        if self._stop_requested.is_set():  # stop() came while the child was being spawned:
            self._kill(proc)  # it saw no process to kill and waits for this run to end
        error = ""
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._forward_stderr(proc.stderr))
                try:
                    error = await self._serve_child(proc)
                finally:
                    self._kill(proc)  # stdout closed: make sure stderr ends too
        finally:
            code = await proc.wait()
            self._proc = None
            self.last_exit_code = code
            if not self._stop_requested.is_set():
                tail = " | ".join(self._stderr_tail)
                self.last_error = error or (
                    f"worker exited with code {code}" + (f": {tail}" if tail else "")
                )
            self._fail_all(EngineUnavailable("failed", self.last_error or "worker exited"))
            if not self._stop_requested.is_set():
                if self.state == "loading":
                    self.load_failures += 1
                self._set_state("failed")

    async def _serve_child(self, proc: asyncio.subprocess.Process) -> str:
        """Wait for ready, then route frames until the child's stdout ends. Returns an
        error message if the child reported one before ready."""
        try:
            async with asyncio.timeout(self.config.load_timeout):
                first = await self._read_frame(proc.stdout)
        except TimeoutError:
            return f"the model did not load within {self.config.load_timeout:.0f}s"
        if first is None:
            return ""
        match first:
            case wire.Error(message=message):
                return f"cannot load {self.model_path.name}: {message}"
            case wire.Ready():
                pass
            case _:
                return f"worker sent {first!r:.100} before ready"
        self.last_error = ""
        if self._stop_requested.is_set():  # stopped while loading: never "ready" again
            return ""
        self._set_state("ready")
        while (frame := await self._read_frame(proc.stdout)) is not None:
            self._route(frame)
        return ""

    async def _read_frame(self, stdout: asyncio.StreamReader) -> wire.Message | None:
        try:
            return await wire.read_frame_async(stdout)
        except wire.ProtocolError as e:  # the stream cannot be trusted: end this child
            log.error("model %s: corrupt frame from the worker: %s", self.name, e)
            return None

    async def _forward_stderr(self, stderr: asyncio.StreamReader) -> None:
        worker_log = logging.getLogger(f"aivailable.worker.{self.name}")
        while True:
            try:
                line = await stderr.readline()
            except ValueError:  # a line over the stream limit: skip what is buffered
                continue
            if not line:
                return
            text = line.decode(errors="replace").rstrip()
            if text:
                self._stderr_tail.append(text)
                worker_log.info("%s", text)

    def _route(self, frame: wire.Message) -> None:
        match frame:
            case wire.Deltas(items=items):
                for delta in items:
                    events = self._pending.get(delta.id)
                    if events is not None:  # else cancelled or failed already: dropped
                        logprobs = (delta.logprobs,) if delta.logprobs else ()
                        events.put_nowait(TextDelta(delta.text, delta.choice, logprobs))
                return
            case wire.Cancelled():
                self.cancelled += 1  # the worker stopped a generation we gave up on
            case wire.Done() | wire.Embeddings() | wire.Error():
                pass
            case _:
                log.warning("model %s: unexpected %r from the worker", self.name, frame)
                return
        events = self._pending.pop(frame.id, None)
        if events is not None:  # else cancelled or failed already: late frames are dropped
            events.put_nowait(self._outcome(frame))

    def _outcome(
        self, frame: wire.Done | wire.Embeddings | wire.Error | wire.Cancelled
    ) -> Finished | Embeddings | EngineError:
        """What a request's last frame means to its caller."""
        match frame:
            case wire.Done():
                reasons = frame.finish_reasons or ("length",)
                finish = "stop" if reasons[0] == "stop" else "length"
                end = time.time_ns()  # the worker's durations, dated by this frame's arrival
                first = end - frame.decode_ns
                return Finished(
                    finish,
                    frame.prompt_tokens,
                    frame.completion_tokens,
                    frame.cached_tokens,
                    reasons,
                    timing=Timing(first - frame.prefill_ns, first, end),
                    restored_tokens=frame.restored_tokens,
                )
            case wire.Embeddings(vectors=vectors, prompt_tokens=prompt_tokens):
                return Embeddings(vectors, prompt_tokens)
            case wire.Error(code=wire.ErrorCode.QUEUE_FULL):
                return QueueFull(self._admission.hold_estimate)
            case wire.Error(code=wire.ErrorCode.CONTEXT_OVERFLOW, message=message):
                return ContextOverflow(message)
            case wire.Error(code=wire.ErrorCode.BAD_REQUEST, message=message):
                return InvalidRequest(message)
            case wire.Error(message=message):  # INTERNAL, or a load error after ready
                return EngineError(message)
        # CANCELLED without our asking: end the stream
        return EngineUnavailable(self.state, "the worker dropped the request")

    def _fail_all(self, error: EngineError) -> None:
        pending, self._pending = self._pending, {}
        for events in pending.values():
            events.put_nowait(error)

    def _send(self, proc: asyncio.subprocess.Process, message: wire.Message) -> None:
        self._write(proc, wire.encode(message))

    def _write(self, proc: asyncio.subprocess.Process, frame: bytes) -> None:
        if proc.stdin is None or proc.stdin.is_closing() or proc.returncode is not None:
            raise EngineUnavailable(
                "failed", "the worker is gone", self.config.unavailable_retry_after
            )
        proc.stdin.write(frame)

    def _send_quietly(self, proc: asyncio.subprocess.Process, message: wire.Message) -> None:
        with contextlib.suppress(EngineError, OSError, RuntimeError):
            self._send(proc, message)

    @staticmethod
    def _kill(proc: asyncio.subprocess.Process) -> None:
        # os.kill, not proc.kill(): Popen.send_signal polls first and may reap the child
        # itself, and then asyncio's child watcher reports exit code 255 instead of the
        # real one.
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)

    # --- requests ----------------------------------------------------------------------

    async def embed(self, inputs: list[str]) -> Embeddings:
        if self.kind != "embedding":
            return await super().embed(inputs)
        proc = self._ready_proc()
        request_id, events = self._submit(proc, lambda rid: wire.Embed(rid, tuple(inputs)))
        try:
            result = await events.get()
        finally:
            self._depth -= 1
            self._pending.pop(request_id, None)
        if isinstance(result, BaseException):
            raise result
        return result

    def _ready_proc(self) -> asyncio.subprocess.Process:
        proc = self._proc
        if self.state != "ready" or proc is None:
            detail = self.last_error if self.state == "failed" else ""
            raise EngineUnavailable(self.state, detail, self.config.unavailable_retry_after)
        return proc

    def _submit(self, proc, message_for) -> tuple[int, asyncio.Queue]:
        """Send a request to the worker; its events arrive on the returned queue. The
        caller owns one unit of queue depth until it is done."""
        request_id = next(self._ids)
        try:
            frame = wire.encode(message_for(request_id))
        except wire.FrameTooLarge as e:
            raise InvalidRequest(f"the request is too large ({e.size} bytes)") from None
        events: asyncio.Queue = asyncio.Queue()
        self._write(proc, frame)
        self._pending[request_id] = events
        self._depth += 1
        return request_id, events

    async def generate(self, request: ChatRequest | CompletionRequest) -> AsyncIterator[Event]:
        if self.kind == "embedding":
            raise InvalidRequest(f"the model '{self.name}' is deployed for embeddings only")
        proc = self._ready_proc()
        if self._depth >= self.queue_limit:
            self._demand_refused()
            raise QueueFull(self.config.queue_retry_after)
        retry_after = self._admission.retry_after(self._depth)
        if retry_after is not None:  # it would wait longer than max_queue_wait for a slot
            self._demand_refused()  # the signal to scale, as much as the answer
            raise QueueFull(retry_after)
        request_id, events = self._submit(proc, lambda rid: _generate_message(rid, request))
        self._demand_admitted(self._depth)
        admitted = time.monotonic()
        first = True
        started = asyncio.get_running_loop().time()
        held = None  # an event taken while joining deltas, to yield next
        try:
            while True:
                event = held if held is not None else await events.get()
                event, held = _coalesce(event, events)
                if isinstance(event, BaseException):
                    raise event
                if first and isinstance(event, TextDelta):
                    first = False
                    self._demand_first_token(admitted)
                yield event
                if isinstance(event, Finished):
                    self._admission.record(asyncio.get_running_loop().time() - started)
                    return
        finally:
            self._depth -= 1
            self._demand_depth(self._depth)
            if self._pending.pop(request_id, None) is not None:
                # Closed early (client gone): stop the worker's generation too.
                self._send_quietly(proc, wire.Cancel(request_id))


def _coalesce(event, events: asyncio.Queue):
    """Join text deltas of one choice that are already queued: a client far behind the
    decode loop (or a relaying peer) gets them in one chunk, one write, one frame.
    Returns (event, the next event if one was taken that does not join, else None)."""
    while isinstance(event, TextDelta) and not events.empty():
        following = events.get_nowait()
        if not isinstance(following, TextDelta) or following.index != event.index:
            return event, following
        event = TextDelta(
            event.text + following.text, event.index, event.logprobs + following.logprobs
        )
    return event, None


def _generate_message(request_id: int, request: ChatRequest | CompletionRequest) -> wire.Generate:
    if isinstance(request, ChatRequest):
        return wire.Generate(
            request_id,
            "chat",
            request.params,
            messages=request.messages,
            tools=request.tools,
            continue_final_message=request.continue_final_message,
        )
    return wire.Generate(request_id, "completion", request.params, prompt=request.prompt)
