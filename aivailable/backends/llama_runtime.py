"""The llama.cpp calls of the batching worker, through llama-cpp-python's low-level API.

llama-cpp-python's high-level `Llama` class decodes one sequence at a time; its C API
does not: one context holds `n_parallel` sequences over a unified KV cache of
`n_ctx x n_parallel` cells, `llama_decode` takes one `llama_batch` with a `seq_id` per
token, and each sequence samples through its own `llama_sampler` chain. The decisions
(which tokens go into a batch) live in `scheduler.py`; this module only moves them into
ctypes.
"""

from __future__ import annotations

import ctypes
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from aivailable.backends.base import SamplingParams
from aivailable.backends.scheduler import Token

# The ChatML template, for models whose GGUF carries none.
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# The "chain" of a request that is plain greedy (temperature 0, nothing else): no llama.cpp
# sampler at all. llama_sampler_sample copies every logit into a candidate array (49k for
# SmolLM2) before the greedy pass; an argmax over the logits picks the same token (the
# first of equal maxima, like llama.cpp's greedy) in a fraction of the time, and that time
# is spent between two decodes of a single stream, where nothing else runs.
ARGMAX = 0


class LlamaCallError(Exception):
    """llama.cpp refused: the model did not load, a decode failed, a grammar is invalid."""


@dataclass(frozen=True)
class RuntimeConfig:
    model_path: str
    n_ctx: int  # positions per sequence
    n_parallel: int  # sequences decoded together
    n_batch: int  # tokens per llama_decode at most
    n_threads: int
    n_threads_batch: int
    n_gpu_layers: int = 0
    main_gpu: int | None = None
    tensor_split: tuple[float, ...] | None = None
    embedding: bool = False  # an embedding instance: pooled vectors, no sampling
    # llama.cpp RPC servers (host:port, loopback: the peer's tunnels to helper peers) whose
    # devices hold part of the model; llama.cpp lists them before the local GPUs, so
    # tensor_split's shares run [rpc..., local GPUs...] and layers fill them in that order
    # after the n_layer + 1 - n_gpu_layers first layers, which stay on the CPU.
    rpc_servers: tuple[str, ...] = ()
    kv_type: str = "f16"  # K and V cache element type (KV_GGML_TYPES)


# The deploy's kv_type -> ggml type of the K and V caches. A quantized V cache is only
# implemented inside llama.cpp's flash-attention kernel, so those turn it on.
KV_GGML_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}  # GGML_TYPE_F16, GGML_TYPE_Q8_0, GGML_TYPE_Q4_0


def apply_kv_type(cparams, kv_type: str) -> None:
    """Set a context's cache types (and flash attention for quantized ones)."""
    if kv_type not in KV_GGML_TYPES:
        raise LlamaCallError(f"kv_type must be one of {', '.join(KV_GGML_TYPES)}, not {kv_type!r}")
    if kv_type != "f16":
        cparams.type_k = cparams.type_v = KV_GGML_TYPES[kv_type]
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED


def continued(prompt: str, messages: list[dict]) -> str:
    """A rendered conversation cut right after the final message's text (what Hugging
    Face's continue_final_message does), whatever the template puts after it."""
    last = str(messages[-1].get("content") or "")
    at = prompt.rfind(last) if last else -1
    if at < 0:
        raise ValueError("the chat template does not show the final message's text")
    return prompt[: at + len(last)]


def physical_cores() -> int:
    """Cores, not hyperthreads: llama.cpp's matmuls gain nothing from a sibling thread."""
    cores = set()
    for cpu in Path("/sys/devices/system/cpu").glob("cpu[0-9]*"):
        try:
            package = (cpu / "topology/physical_package_id").read_text().strip()
            core = (cpu / "topology/core_id").read_text().strip()
        except OSError:
            continue
        cores.add((package, core))
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    found = len(cores) or os.cpu_count() or 1
    return max(1, min(found, usable or found))


_backend_ready = False


def add_rpc_devices(endpoints: tuple[str, ...]) -> None:
    """Registers each RPC server's devices with ggml, so the next model load uses them
    (what llama-server's --rpc does). Connects to each server."""
    from aivailable.backends.rpc_server import ggml_lib

    rpc, ggml = ggml_lib("libggml-rpc"), ggml_lib("libggml")
    rpc.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
    rpc.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_register.argtypes = [ctypes.c_void_p]
    for endpoint in endpoints:
        reg = rpc.ggml_backend_rpc_add_server(endpoint.encode())
        if not reg:
            raise LlamaCallError(f"no llama.cpp RPC server answers at {endpoint}")
        ggml.ggml_backend_register(reg)


class LlamaRuntime:
    """One model, one context of n_parallel sequences, and the ctypes around them."""

    def __init__(self, config: RuntimeConfig):
        global _backend_ready
        if not _backend_ready:
            llama_cpp.llama_backend_init()
            _backend_ready = True
        self.config = config
        if config.rpc_servers:
            if not llama_cpp.llama_supports_rpc():
                raise LlamaCallError("this llama.cpp was built without RPC (GGML_RPC=on)")
            add_rpc_devices(config.rpc_servers)
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = config.n_gpu_layers
        if config.main_gpu is not None:
            mparams.main_gpu = config.main_gpu
        self._split = None
        if config.tensor_split:
            self._split = (ctypes.c_float * len(config.tensor_split))(*config.tensor_split)
            mparams.tensor_split = self._split
        self.model = llama_cpp.llama_model_load_from_file(config.model_path.encode(), mparams)
        if not self.model:
            raise LlamaCallError(f"llama.cpp could not load {Path(config.model_path).name}")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = config.n_ctx * config.n_parallel
        cparams.n_seq_max = config.n_parallel
        cparams.n_batch = config.n_batch
        cparams.n_ubatch = config.n_batch
        cparams.n_threads = config.n_threads
        cparams.n_threads_batch = config.n_threads_batch
        # n_ctx x n_parallel cells, each sequence in a stream of its own. A unified stream
        # computes each sequence's attention over every sequence's cells (masked), and that
        # changed greedy answers with what ran beside them: 3 of 4 differed on SmolLM2,
        # against 0 of 4 with separate streams (docs/backend.md).
        cparams.kv_unified = False
        apply_kv_type(cparams, config.kv_type)
        if config.embedding:
            cparams.embeddings = True
            # The model's own pooling when its GGUF names one (embedding models do); a
            # generative model has none, and the mean of its last hidden states is the
            # usual choice for it.
            cparams.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            if config.kv_type != "f16":  # llama.cpp refuses it when FA cannot run here
                raise LlamaCallError(
                    f"llama.cpp could not create a context with a {config.kv_type} KV cache: "
                    "this build or model has no flash attention for it (deploy with f16)"
                )
            raise LlamaCallError("llama.cpp could not create a context (out of memory?)")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self._logit_row = ctypes.c_float * self.n_vocab
        self._pieces: dict[int, bytes] = {}
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(config.n_batch, 0, 1)
        self.add_bos = llama_cpp.llama_vocab_get_add_bos(self.vocab)
        self._chat = self._chat_formatter()
        if config.embedding and llama_cpp.llama_pooling_type(self.ctx) == 0:  # NONE
            llama_cpp.llama_free(self.ctx)
            cparams.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
            self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
            self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_embd = llama_cpp.llama_model_n_embd(self.model)

    def close(self) -> None:
        if self.ctx:
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ctx)
            llama_cpp.llama_model_free(self.model)
            self.ctx = None

    # --- text <-> tokens ----------------------------------------------------------------

    def _meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace") if n >= 0 else None

    def _token_text(self, token: int) -> str:
        return self.piece(token, special=True).decode("utf-8", errors="replace")

    def _chat_formatter(self) -> Jinja2ChatFormatter:
        template = self._meta("tokenizer.chat_template") or CHATML
        eos = self._token_text(llama_cpp.llama_vocab_eos(self.vocab))
        bos = self._token_text(llama_cpp.llama_vocab_bos(self.vocab))
        return Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)

    def chat_prompt(
        self, messages: list[dict], tools: list[dict] | None = None, go_on: bool = False
    ) -> str:
        """The model's own chat template applied to the messages (ValueError if it
        refuses them, e.g. roles in an order it does not allow). `go_on`: the last message
        is an unfinished assistant answer; the prompt ends where its text ends (the
        template's end-of-turn after it cut off), so generation continues it."""
        try:
            if go_on:
                return continued(self._chat(messages=messages, tools=tools).prompt, messages)
            return self._chat(messages=messages, tools=tools).prompt
        except ValueError:
            raise
        except Exception as e:  # a template error is the request's, never the worker's
            raise ValueError(f"the chat template rejected the messages: {e}") from e

    def tokenize(self, text: str, special: bool) -> list[int]:
        """`special`: parse control tokens in the text (a rendered chat template has them;
        a client's raw completion prompt must not)."""
        data = text.encode("utf-8")
        size = len(data) + 8
        buf = (llama_cpp.llama_token * size)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, size, self.add_bos, special)
        if n < 0:  # never with size >= bytes + 2, but say so rather than cut
            raise ValueError(f"the prompt needs {-n} tokens")
        return list(buf[:n])

    def piece(self, token: int, special: bool = False) -> bytes:
        if not special:  # once per token id: every generated token asks
            cached = self._pieces.get(token)
            if cached is None:
                cached = self._pieces[token] = self._piece(token, False)
            return cached
        return self._piece(token, True)

    def _piece(self, token: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    # --- the KV cache and decoding ------------------------------------------------------

    def copy_cells(self, src: int, dst: int) -> None:
        """All of src's cells to dst. Each sequence has its own stream of cells, and
        llama.cpp copies across streams only whole; the scheduler copies a source that
        holds exactly the prompt."""
        llama_cpp.llama_memory_seq_rm(self.memory, dst, -1, -1)
        llama_cpp.llama_memory_seq_cp(self.memory, src, dst, -1, -1)

    def save_seq(self, seq: int) -> ctypes.Array:
        """The sequence's KV state (its cells and their positions) as a buffer."""
        size = llama_cpp.llama_state_seq_get_size(self.ctx, seq)
        data = (ctypes.c_uint8 * size)()
        if llama_cpp.llama_state_seq_get_data(self.ctx, data, size, seq) != size:
            raise LlamaCallError(f"llama.cpp could not save sequence {seq}")
        return data

    def restore_seq(self, seq: int, data: ctypes.Array) -> None:
        """A state from save_seq into `seq` (of this context; llama.cpp clears it first).
        It fits: it came from a sequence of the same size."""
        if llama_cpp.llama_state_seq_set_data(self.ctx, data, len(data), seq) == 0:
            raise LlamaCallError(f"llama.cpp could not restore sequence {seq}")

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(self.memory, True)

    def trim(self, seq: int, p0: int) -> None:
        llama_cpp.llama_memory_seq_rm(self.memory, seq, p0, -1)

    def decode(self, tokens: list[Token]) -> dict[int, int]:
        """Decode one batch; returns slot -> the batch row whose logits it samples."""
        batch = self.batch
        rows: dict[int, int] = {}
        for i, t in enumerate(tokens):
            batch.token[i] = t.token
            batch.pos[i] = t.pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = t.seq
            batch.logits[i] = 1 if t.sample_for else 0
            for slot in t.sample_for:
                rows[slot] = i
        batch.n_tokens = len(tokens)
        code = llama_cpp.llama_decode(self.ctx, batch)
        if code != 0:
            raise LlamaCallError(f"llama_decode returned {code}")
        return rows

    def embed(self, tokens: list[int]) -> list[float]:
        """The pooled, L2-normalised embedding of one input (sequence 0, cells cleared)."""
        self.clear()
        if not 0 < len(tokens) <= self.config.n_batch:  # pooling needs one batch
            raise ValueError(f"an input must have 1 to {self.config.n_batch} tokens")
        batch = self.batch
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1  # every token's state feeds the pooling
        batch.n_tokens = len(tokens)
        if llama_cpp.llama_decode(self.ctx, batch) != 0:
            raise LlamaCallError("llama_decode failed on an embedding input")
        ptr = llama_cpp.llama_get_embeddings_seq(self.ctx, 0)
        if not ptr:
            raise LlamaCallError("llama.cpp gave no pooled embedding")
        vector = np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).astype(np.float64)
        norm = float(np.linalg.norm(vector)) or 1.0
        return (vector / norm).tolist()

    def _logits(self, row: int) -> np.ndarray:
        """A view of the row's logits (valid until the next decode). Through a cached ctypes
        array type: np.ctypeslib.as_array builds one per call, slower than the argmax."""
        address = ctypes.cast(llama_cpp.llama_get_logits_ith(self.ctx, row), ctypes.c_void_p)
        return np.frombuffer(self._logit_row.from_address(address.value), dtype=np.float32)

    def log_probs(self, row: int) -> np.ndarray:
        """Log-probabilities of every token after this row (the model's, before sampling)."""
        logits = self._logits(row).astype(np.float64)
        peak = logits.max()
        return logits - (peak + math.log(np.exp(logits - peak).sum()))

    # --- sampling -----------------------------------------------------------------------

    def sampler(self, params: SamplingParams | Mapping, seed: int) -> int:
        """A sampler chain for one sequence, as llama.cpp's server builds it: logit bias,
        penalties, grammar, then top-k, top-p, min-p, temperature and the draw (greedy
        at temperature 0). Returns the chain's pointer, or ARGMAX for plain greedy; free
        it with free_sampler. A mapping is a few fields over SamplingParams' defaults (the
        benchmark's raw decode asks with one)."""
        if isinstance(params, Mapping):
            params = SamplingParams(**params)
        bias = params.logit_bias
        repeat, freq, present = (
            params.repeat_penalty,
            params.frequency_penalty,
            params.presence_penalty,
        )
        penalties = repeat != 1.0 or freq or present
        grammar = params.grammar
        temperature = params.temperature
        if temperature <= 0 and not (bias or penalties or grammar):
            return ARGMAX
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = lambda s: llama_cpp.llama_sampler_chain_add(chain, s)  # noqa: E731
        if bias:
            arr = (llama_cpp.llama_logit_bias * len(bias))()
            for i, (token, value) in enumerate(bias):
                arr[i].token, arr[i].bias = int(token), float(value)
            add(llama_cpp.llama_sampler_init_logit_bias(self.n_vocab, len(bias), arr))
        if penalties:
            add(llama_cpp.llama_sampler_init_penalties(self.n_vocab, 64, repeat, freq, present))
        if grammar:
            g = llama_cpp.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
            if not g:
                llama_cpp.llama_sampler_free(chain)
                raise ValueError("the output grammar is not valid GBNF")
            add(g)
        if temperature <= 0:
            add(llama_cpp.llama_sampler_init_greedy())
            return chain
        if params.top_k > 0:
            add(llama_cpp.llama_sampler_init_top_k(params.top_k))
        add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0:
            add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
        add(llama_cpp.llama_sampler_init_temp(temperature))
        add(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def sample(self, chain: int, row: int) -> int:
        if chain == ARGMAX:
            return int(self._logits(row).argmax())
        return llama_cpp.llama_sampler_sample(chain, self.ctx, row)

    @staticmethod
    def free_sampler(chain: int) -> None:
        if chain != ARGMAX:
            llama_cpp.llama_sampler_free(chain)
