"""The model worker: one llama.cpp model in a child process, many sequences at once.

    python -m aivailable.backends.llama_worker --model PATH [--n-ctx 2048] [--n-parallel 4]

A crash here (llama.cpp aborts, out of GPU memory) ends only this process, and its exit
frees the GPU memory. The parent (`llama_engine.LlamaEngine`) talks to it with
length-prefixed msgpack frames (`worker_protocol.py`).

Continuous batching, as llama.cpp's server does it: one loop asks the scheduler core
(`scheduler.py`) for each step's batch (the next token of every decoding sequence, then
chunks of waiting prompts), decodes it in one `llama_decode`, samples every sequence
through its own sampler chain and sends all of the step's text in one frame. Requests
join at the next step and leave as soon as they finish or are cancelled. A reader thread
renders chat templates and tokenizes, so a huge prompt never stalls the decode loop;
llama.cpp's logging goes to stderr, which the parent forwards to its log.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import BinaryIO

from aivailable.backends.base import SamplingParams
from aivailable.backends.worker_protocol import (
    Cancel,
    Cancelled,
    Delta,
    Deltas,
    Done,
    Embed,
    Embeddings,
    Error,
    ErrorCode,
    FrameTooLarge,
    Generate,
    Message,
    Ready,
    Shutdown,
    encode,
    read_frame,
)

# --- the worker -------------------------------------------------------------------------


@dataclass
class _Choice:
    stream: object  # TextStream
    sampler: int | None
    tokens: int = 0
    finish: str | None = None


@dataclass
class _Live:
    """A request in the worker: its prompt, parameters (n and max_tokens resolved) and
    per-choice output state."""

    id: int
    prompt: list[int]
    params: SamplingParams
    choices: list[_Choice] = field(default_factory=list)
    cached: int = 0
    slot_ns: int = 0  # time.monotonic_ns() when a slot took it (traces: the queue wait ends)
    first_ns: int = 0  # ... when its first token was sampled (the prefill ends)
    restored: int = 0  # of `cached`, tokens restored from the host-memory prompt cache


@dataclass(frozen=True)
class _Tokenized:
    """An Embed request whose inputs the reader thread has tokenized."""

    id: int
    inputs: tuple[list[int], ...]


# What the reader thread hands the decode loop: typed, like the frames it came from.
_InboxItem = _Live | _Tokenized | Cancel | Shutdown


class Worker:
    def __init__(
        self,
        runtime,
        out: BinaryIO,
        n_ctx: int,
        n_parallel: int,
        n_batch: int,
        prompt_cache_bytes: int = 0,
    ):
        from aivailable.backends.prompt_cache import PromptCache
        from aivailable.backends.scheduler import Scheduler

        self.rt = runtime
        self._out = out
        self._out_lock = threading.Lock()  # the reader thread answers bad requests too
        cache = PromptCache(prompt_cache_bytes) if prompt_cache_bytes > 0 else None
        self.sched = Scheduler(n_parallel, n_ctx, n_batch, max_waiting=256, prompt_cache=cache)
        self.inbox: queue.Queue[_InboxItem] = queue.Queue()
        self.live: dict[int, _Live] = {}
        self._apply = {  # the decode loop's table: inbox item type -> its handler
            _Live: self._admit,
            _Tokenized: self._embed,
            Cancel: self._cancel,
        }

    def send(self, message: Message) -> None:
        frame = encode(message)
        with self._out_lock:
            self._out.write(frame)
            self._out.flush()

    def error(self, request_id: int | None, code: ErrorCode, message: str) -> None:
        self.send(Error(request_id, code, message))

    # --- the reader thread: frames in, prompts rendered and tokenized -------------------

    def read_forever(self, stream: BinaryIO) -> None:
        try:
            while (message := read_frame(stream)) is not None:
                match message:
                    case Generate():
                        self._prepare(message)
                    case Embed():
                        self._prepare_embed(message)
                    case Cancel():
                        self.inbox.put(message)
                    case Shutdown():
                        break
                    case _:
                        print(f"worker: the parent sent {message!r:.100}", file=sys.stderr)
        except (OSError, ValueError) as e:  # ProtocolError is a ValueError
            print(f"worker: bad input from the parent: {e}", file=sys.stderr)
        finally:
            self.inbox.put(Shutdown())

    def _prepare(self, message: Generate) -> None:
        from aivailable.backends.scheduler import PromptTooLong, SeqRequest

        params = message.params
        try:
            if message.kind == "chat":
                text = self.rt.chat_prompt(
                    [dict(m) for m in message.messages],
                    [dict(t) for t in message.tools] or None,
                    message.continue_final_message,
                )
                prompt = self.rt.tokenize(text, special=True)
            else:
                prompt = self.rt.tokenize(message.prompt, special=False)
            n = max(1, params.n)
            limit = self.sched.n_ctx if params.max_tokens is None else max(1, params.max_tokens)
            self.sched.check(SeqRequest(message.id, tuple(prompt), limit, n))
        except PromptTooLong as e:
            self.error(message.id, ErrorCode.CONTEXT_OVERFLOW, str(e))
            return
        except (ValueError, TypeError, KeyError) as e:  # Unschedulable among them
            self.error(message.id, ErrorCode.BAD_REQUEST, str(e))
            return
        live = _Live(message.id, prompt, replace(params, n=n, max_tokens=limit))
        try:  # here, not in the decode loop: a big schema's grammar takes a while to parse
            self._make_choices(live)
        except ValueError as e:  # a grammar llama.cpp refused: before it takes a slot
            self.error(message.id, ErrorCode.BAD_REQUEST, str(e))
            return
        self.inbox.put(live)

    def _make_choices(self, live: _Live) -> None:
        """A sampler chain and a text stream per choice (seeds seed, seed+1, ...)."""
        from aivailable.backends.text_stream import TextStream

        seed = live.params.seed
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "little")
        try:
            for i in range(live.params.n):
                sampler = self.rt.sampler(live.params, seed + i)
                live.choices.append(_Choice(TextStream(live.params.stop), sampler))
        except ValueError:
            for choice in live.choices:
                self._free(choice)
            raise

    def _prepare_embed(self, message: Embed) -> None:
        try:
            inputs = tuple(self.rt.tokenize(text, special=False) for text in message.inputs)
        except ValueError as e:
            self.error(message.id, ErrorCode.BAD_REQUEST, str(e))
            return
        self.inbox.put(_Tokenized(message.id, inputs))

    # --- the decode loop ----------------------------------------------------------------

    def serve(self) -> None:
        while True:
            try:
                if not self._take_inbox(block=not self.sched.busy):
                    return
            except BrokenPipeError:
                return
            if not self.sched.busy:
                continue
            try:
                self._step()
            except BrokenPipeError:
                return
            except Exception as e:  # a decode failed: fail what ran, keep serving
                message = f"{type(e).__name__}: {e}"
                for request_id in list(self.live):
                    self._drop(request_id)
                    self.error(request_id, ErrorCode.INTERNAL, message)
                self.rt.clear()  # what the cells hold is unknown now: start afresh
                self.sched.forget_cache()

    def _take_inbox(self, block: bool) -> bool:
        """Apply what arrived; False on shutdown."""
        while True:
            try:
                item = self.inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if type(item) is Shutdown:  # the parent is gone or asked us to stop
                for request_id in list(self.live):  # end what runs
                    self._drop(request_id)
                    self.send(Cancelled(request_id))
                return False
            self._apply[type(item)](item)

    def _admit(self, live: _Live) -> None:
        from aivailable.backends.scheduler import SeqRequest

        p = live.params
        if not self.sched.submit(SeqRequest(live.id, tuple(live.prompt), p.max_tokens, p.n)):
            for choice in live.choices:
                self._free(choice)
            self.error(live.id, ErrorCode.QUEUE_FULL, "the model's queue is full")
            return
        self.live[live.id] = live

    def _cancel(self, message: Cancel) -> None:
        if self._drop(message.id):
            self.send(Cancelled(message.id))

    def _embed(self, request: _Tokenized) -> None:
        try:
            vectors = tuple(tuple(self.rt.embed(tokens)) for tokens in request.inputs)
        except ValueError as e:
            self.error(request.id, ErrorCode.BAD_REQUEST, str(e))
            return
        total = sum(len(t) for t in request.inputs)
        try:
            self.send(Embeddings(request.id, vectors, total))
        except FrameTooLarge as e:  # so many inputs that the answer cannot travel
            self.error(request.id, ErrorCode.BAD_REQUEST, f"the embeddings are too large: {e}")

    def _drop(self, request_id: int) -> bool:
        live = self.live.pop(request_id, None)
        self.sched.cancel(request_id)
        if live is None:
            return False
        for choice in live.choices:
            self._free(choice)
        return True

    def _free(self, choice: _Choice) -> None:
        if choice.sampler is not None:
            self.rt.free_sampler(choice.sampler)
            choice.sampler = None

    def _step(self) -> None:
        step = self.sched.next_step()
        for started in step.started:
            live = self.live[started.request_id]
            live.cached, live.restored = started.reused, started.restored
            live.slot_ns = time.monotonic_ns()
        for src, dst, _ in step.copies:
            self.rt.copy_cells(src, dst)
        for seq, tokens in step.saves:  # before the trims drop these cells
            self.sched.prompt_cache.put(tokens, self.rt.save_seq(seq))
        for seq, data in step.restores:
            self.rt.restore_seq(seq, data)
        for seq, p0 in step.trims:
            self.rt.trim(seq, p0)
        if not step.tokens:
            return
        # Every token is decoded, a dropped request's too: the scheduler counts its cells
        # as cached, so they must really be there.
        rows = self.rt.decode(step.tokens)
        items, finished = [], []
        for slot in sorted(rows):
            request = self.sched.request_of(slot)
            live = self.live.get(request.id) if request is not None else None
            if live is None:
                continue
            index = self.sched.choice_of(slot)
            choice = live.choices[index]
            token = self.rt.sample(choice.sampler, rows[slot])
            live.first_ns = live.first_ns or time.monotonic_ns()  # once per request
            eog = self.rt.is_eog(token)
            logprobs = self._logprobs(live, rows[slot], token) if not eog else None
            reason = self.sched.accept(slot, token, eog)
            text = "" if eog else choice.stream.feed(self.rt.piece(token))
            if not eog:
                choice.tokens += 1
            if choice.stream.stopped and reason is None:
                self.sched.finish(slot)
                reason = "stop"
            if reason is not None:
                text += choice.stream.finish()
                choice.finish = reason
                self._free(choice)
            if text or logprobs:
                items.append(Delta(live.id, index, text, logprobs))
            if all(c.finish for c in live.choices):
                finished.append(live)
        if items:
            self.send(Deltas(tuple(items)))
        for live in finished:
            del self.live[live.id]
            first = live.first_ns or time.monotonic_ns()
            self.send(
                Done(
                    live.id,
                    finish_reasons=tuple(c.finish for c in live.choices),
                    prompt_tokens=len(live.prompt),
                    completion_tokens=sum(c.tokens for c in live.choices),
                    cached_tokens=live.cached,
                    prefill_ns=max(0, first - live.slot_ns),
                    decode_ns=max(0, time.monotonic_ns() - first),
                    restored_tokens=live.restored,
                )
            )

    def _logprobs(self, live: _Live, row: int, token: int) -> dict | None:
        """OpenAI's shape for one token: its log-probability and the top alternatives."""
        if not live.params.logprobs:
            return None
        import numpy as np

        lp = self.rt.log_probs(row)
        top_n = live.params.top_logprobs
        top = np.argpartition(lp, -top_n)[-top_n:] if top_n else []
        top = sorted(top, key=lambda t: -lp[t])

        def entry(t: int) -> dict:
            raw = self.rt.piece(int(t))
            text = raw.decode("utf-8", errors="replace")
            return {"token": text, "logprob": float(lp[t]), "bytes": list(raw)}

        return {**entry(token), "top_logprobs": [entry(t) for t in top]}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m aivailable.backends.llama_worker")
    p.add_argument("--model", required=True, help="path of a GGUF file")
    p.add_argument("--n-ctx", type=int, default=2048, help="context window per sequence")
    p.add_argument("--n-parallel", type=int, default=1, help="sequences decoded together")
    p.add_argument("--n-gpu-layers", type=int, default=0, help="-1: all layers on the GPU")
    p.add_argument("--main-gpu", type=int, default=None)
    p.add_argument("--tensor-split", default=None, help="comma-separated GPU shares")
    p.add_argument("--rpc", default=None, help="comma-separated llama.cpp RPC servers (host:port)")
    p.add_argument("--n-threads", type=int, default=None, help="default: physical cores")
    p.add_argument("--n-threads-batch", type=int, default=None, help="default: n-threads")
    p.add_argument("--n-batch", type=int, default=512, help="tokens per decode at most")
    p.add_argument("--embedding", action="store_true", help="serve embeddings, not text")
    p.add_argument("--kv-type", default="f16", help="KV cache type: f16, q8_0 or q4_0")
    p.add_argument(
        "--prompt-cache-mib", type=int, default=0, help="host memory for evicted prompts' KV"
    )
    p.add_argument("--verbose", action="store_true", help="all of llama.cpp's logging")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    # Frames go to a private copy of stdout; fd 1 itself now points at stderr, so stray
    # prints from llama.cpp or Python can never corrupt the frame stream.
    out = os.fdopen(os.dup(1), "wb", buffering=1 << 16)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    args = _parse_args(argv)
    try:
        import llama_cpp

        from aivailable.backends.llama_runtime import LlamaRuntime, RuntimeConfig, physical_cores

        if not args.verbose:  # llama.cpp's load chatter: warnings and errors only
            llama_cpp.llama_log_set(_quiet_log(), None)
        threads = args.n_threads or physical_cores()
        config = RuntimeConfig(
            model_path=args.model,
            n_ctx=args.n_ctx,
            n_parallel=args.n_parallel,
            n_batch=args.n_batch,
            n_threads=threads,
            n_threads_batch=args.n_threads_batch or threads,
            n_gpu_layers=args.n_gpu_layers,
            embedding=args.embedding,
            kv_type=args.kv_type,
            main_gpu=args.main_gpu,
            tensor_split=tuple(float(x) for x in args.tensor_split.split(","))
            if args.tensor_split
            else None,
            rpc_servers=tuple(args.rpc.split(",")) if args.rpc else (),
        )
        runtime = LlamaRuntime(config)
    except Exception as e:  # bad file, out of memory, no GPU backend: say so and exit
        out.write(encode(Error(None, ErrorCode.LOAD_FAILED, str(e))))
        out.flush()
        return 2
    worker = Worker(
        runtime, out, args.n_ctx, args.n_parallel, args.n_batch, args.prompt_cache_mib << 20
    )
    reader = threading.Thread(
        target=worker.read_forever, args=(sys.stdin.buffer,), name="inbox", daemon=True
    )
    reader.start()
    worker.send(
        Ready(
            pid=os.getpid(),
            n_ctx=args.n_ctx,
            n_parallel=args.n_parallel,
            n_gpu_layers=args.n_gpu_layers,
            n_threads=threads,
        )
    )
    worker.serve()
    return 0


_log_callback = None  # kept alive: llama.cpp calls it for as long as the process runs


def _quiet_log():
    """A llama.cpp log callback that passes on warnings and errors only."""
    global _log_callback
    if _log_callback is None:
        import ctypes

        import llama_cpp

        @llama_cpp.llama_log_callback
        def quiet(level, text, user_data):
            if level in (3, 4):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
                sys.stderr.write(ctypes.string_at(text).decode("utf-8", errors="replace"))

        _log_callback = quiet
    return _log_callback


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
