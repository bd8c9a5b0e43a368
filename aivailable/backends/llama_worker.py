"""The model worker: one llama.cpp model in a child process, driven over stdin/stdout.

    python -m aivailable.backends.llama_worker --model PATH [--n-ctx 2048] [--n-gpu-layers -1]

A crash here (llama.cpp aborts, out of GPU memory) ends only this process, and its exit
frees the GPU memory. The parent (`llama_engine.LlamaEngine`) talks to it with
length-prefixed msgpack frames (see `protocol` below). Requests are multiplexed by id
and run one at a time, since a Llama object is not concurrent; a thread reads the pipe
so that a cancel arrives mid-generation and stops it between tokens. llama.cpp's own
logging goes to stderr, which the parent forwards to its log; stdout carries only frames.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import struct
import sys
import threading
from collections.abc import Iterator
from typing import BinaryIO

import msgpack

# --- protocol: shared with the parent ---------------------------------------------------
PROTOCOL_VERSION = 1
HEADER = struct.Struct(">I")  # frame length, big-endian
MAX_FRAME = 16 << 20  # bytes; a bigger length means a corrupt stream
# Message types (append-only). Parent -> worker:
GENERATE = 1  # id, kind "chat"|"completion", messages | prompt, params
CANCEL = 2  # id
SHUTDOWN = 3
# Worker -> parent:
READY = 10  # pid, n_ctx, n_gpu_layers
DELTA = 11  # id, text
DONE = 12  # id, finish_reason, prompt_tokens, completion_tokens
ERROR = 13  # id (absent for load errors), kind, message
CANCELLED = 14  # id: the request was stopped (or dropped before it started)
# ERROR kinds
LOAD_FAILED = "load_failed"
CONTEXT_OVERFLOW = "context_overflow"
BAD_REQUEST = "bad_request"
INTERNAL = "internal"


def encode_frame(message: dict) -> bytes:
    body = msgpack.packb({"v": PROTOCOL_VERSION, **message}, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> dict:
    message = msgpack.unpackb(body, raw=False)
    if not isinstance(message, dict) or message.get("v") != PROTOCOL_VERSION:
        raise ValueError(f"bad frame: {message!r:.200}")
    return message


def read_frame(stream: BinaryIO) -> dict | None:
    """Blocking read of one frame; None at a clean end of stream."""
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    (length,) = HEADER.unpack(header)
    if length > MAX_FRAME:
        raise ValueError(f"frame of {length} bytes")
    body = stream.read(length)
    if len(body) < length:
        return None
    return decode_body(body)


# --- the worker -------------------------------------------------------------------------


class _Inbox:
    """Frames from the parent, read by a thread so cancels arrive during a generation."""

    def __init__(self, stream: BinaryIO):
        self._stream = stream
        self.requests: queue.Queue[dict | None] = queue.Queue()  # None: shut down
        self._cancelled: set[int] = set()
        self._lock = threading.Lock()
        self.closed = threading.Event()

    def cancel(self, request_id: int) -> None:
        with self._lock:
            self._cancelled.add(request_id)

    def is_cancelled(self, request_id: int) -> bool:
        if self.closed.is_set():
            return True  # parent gone: stop whatever runs
        with self._lock:
            return request_id in self._cancelled

    def forget(self, request_id: int) -> None:
        with self._lock:
            self._cancelled.discard(request_id)

    def read_forever(self) -> None:
        try:
            while (message := read_frame(self._stream)) is not None:
                kind = message.get("type")
                if kind == GENERATE:
                    self.requests.put(message)
                elif kind == CANCEL:
                    self.cancel(message.get("id"))
                elif kind == SHUTDOWN:
                    break
        except (OSError, ValueError) as e:
            print(f"worker: bad input from the parent: {e}", file=sys.stderr)
        finally:
            self.closed.set()
            self.requests.put(None)


def _make_llama_class():
    import llama_cpp

    class CountingLlama(llama_cpp.Llama):
        """Llama that records prompt and completion token counts of the last generation,
        which llama-cpp-python's streaming chunks do not carry."""

        prompt_tokens = 0
        completion_tokens = 0

        def generate(self, tokens, *args, **kwargs):
            self.prompt_tokens = len(tokens)
            self.completion_tokens = 0
            for token in super().generate(tokens, *args, **kwargs):
                if not llama_cpp.llama_vocab_is_eog(self._model.vocab, token):
                    self.completion_tokens += 1
                yield token

    return CountingLlama


class Worker:
    def __init__(self, llm, out: BinaryIO, inbox: _Inbox):
        self.llm = llm
        self._out = out
        self.inbox = inbox

    def send(self, message: dict) -> None:
        self._out.write(encode_frame(message))
        self._out.flush()

    def serve(self) -> None:
        while (request := self.inbox.requests.get()) is not None:
            request_id = request.get("id")
            try:
                self.handle(request_id, request)
            except BrokenPipeError:
                return  # the parent is gone
            finally:
                self.inbox.forget(request_id)

    def handle(self, request_id: int, request: dict) -> None:
        if self.inbox.is_cancelled(request_id):
            self.send({"type": CANCELLED, "id": request_id})
            return
        try:
            chunks = self._stream(request)
            finish = "length"
            for text, finish_reason in self._texts(chunks, request):
                if self.inbox.is_cancelled(request_id):
                    chunks.close()  # stops llama.cpp between tokens
                    self.send({"type": CANCELLED, "id": request_id})
                    return
                if text:
                    self.send({"type": DELTA, "id": request_id, "text": text})
                if finish_reason:
                    finish = finish_reason
        except ValueError as e:
            kind = CONTEXT_OVERFLOW if "exceed context window" in str(e) else BAD_REQUEST
            self.send({"type": ERROR, "id": request_id, "kind": kind, "message": str(e)})
            return
        except (TypeError, KeyError) as e:
            self.send({"type": ERROR, "id": request_id, "kind": BAD_REQUEST, "message": str(e)})
            return
        except Exception as e:  # a bug or a llama.cpp failure: report it, keep serving
            message = f"{type(e).__name__}: {e}"
            self.send({"type": ERROR, "id": request_id, "kind": INTERNAL, "message": message})
            return
        self.send(
            {
                "type": DONE,
                "id": request_id,
                "finish_reason": "stop" if finish == "stop" else "length",
                "prompt_tokens": self.llm.prompt_tokens,
                "completion_tokens": self.llm.completion_tokens,
            }
        )

    def _stream(self, request: dict) -> Iterator[dict]:
        params = request.get("params") or {}
        max_tokens = params.get("max_tokens")
        sampling = {
            "temperature": float(params.get("temperature", 0.8)),
            "top_p": float(params.get("top_p", 0.95)),
            "stop": list(params.get("stop") or []),
            "seed": params.get("seed"),
            # llama-cpp-python reads 0 as "unlimited"; 0 is handled in _texts
            "max_tokens": None if max_tokens is None else max(1, int(max_tokens)),
            "stream": True,
        }
        if sampling["seed"] is not None:
            # Reusing a cached prompt prefix changes the logits in the last bits, and so
            # what a seed samples: evaluate the whole prompt afresh so a seed repeats.
            self.llm.reset()
        if request.get("kind") == "chat":
            return self.llm.create_chat_completion(messages=request["messages"], **sampling)
        return self.llm.create_completion(prompt=request["prompt"], **sampling)

    def _texts(self, chunks: Iterator[dict], request: dict) -> Iterator[tuple[str, str | None]]:
        """(text, finish_reason) per chunk, for chat and completion chunks alike."""
        zero = (request.get("params") or {}).get("max_tokens") == 0
        for chunk in chunks:
            choice = chunk["choices"][0]
            text = choice["delta"].get("content") if "delta" in choice else choice.get("text")
            if zero:  # the prompt was evaluated (so it fits): report no tokens
                chunks.close()
                self.llm.completion_tokens = 0
                yield "", "length"
                return
            yield text or "", choice.get("finish_reason")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m aivailable.backends.llama_worker")
    p.add_argument("--model", required=True, help="path of a GGUF file")
    p.add_argument("--n-ctx", type=int, default=2048, help="context window, tokens")
    p.add_argument("--n-gpu-layers", type=int, default=0, help="-1: all layers on the GPU")
    p.add_argument("--main-gpu", type=int, default=None)
    p.add_argument("--tensor-split", default=None, help="comma-separated GPU shares")
    p.add_argument("--n-threads", type=int, default=None)
    p.add_argument("--n-batch", type=int, default=512)
    p.add_argument("--verbose", action="store_true", help="all of llama.cpp's logging")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    # Frames go to a private copy of stdout; fd 1 itself now points at stderr, so stray
    # prints from llama.cpp or Python can never corrupt the frame stream.
    out = os.fdopen(os.dup(1), "wb", buffering=1 << 16)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    args = _parse_args(argv)
    inbox = _Inbox(sys.stdin.buffer)
    try:
        llama_class = _make_llama_class()
        kwargs = {}
        if args.main_gpu is not None:
            kwargs["main_gpu"] = args.main_gpu
        if args.tensor_split:
            kwargs["tensor_split"] = [float(x) for x in args.tensor_split.split(",")]
        if args.n_threads:
            kwargs["n_threads"] = args.n_threads
        llm = llama_class(
            model_path=args.model,
            n_ctx=args.n_ctx,
            n_gpu_layers=args.n_gpu_layers,
            n_batch=args.n_batch,
            verbose=args.verbose,
            **kwargs,
        )
    except Exception as e:  # bad file, out of memory, no GPU backend: say so and exit
        out.write(encode_frame({"type": ERROR, "kind": LOAD_FAILED, "message": str(e)}))
        out.flush()
        return 2
    if not args.verbose:  # after loading, warnings too (load chatter stays quiet)
        logging.getLogger("llama-cpp-python").setLevel(logging.WARNING)
    worker = Worker(llm, out, inbox)
    reader = threading.Thread(target=inbox.read_forever, name="inbox", daemon=True)
    reader.start()
    worker.send(
        {
            "type": READY,
            "pid": os.getpid(),
            "n_ctx": llm.n_ctx(),
            "n_gpu_layers": args.n_gpu_layers,
        }
    )
    worker.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
