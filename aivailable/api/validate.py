"""Check OpenAI-style request bodies and turn them into engine requests.

Pure: takes the decoded JSON, returns frozen requests, raises ApiError with the
parameter at fault. Unknown extra fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aivailable.api import structured
from aivailable.api.errors import bad_request
from aivailable.backends.base import ChatRequest, CompletionRequest, SamplingParams

ROLES = ("system", "user", "assistant", "tool", "developer")


@dataclass(frozen=True)
class EmbeddingRequest:
    inputs: tuple[str, ...]
    encoding: str = "float"  # "float" | "base64"
    dimensions: int | None = None  # what the caller expects; checked against the model


@dataclass(frozen=True)
class Parsed:
    """The one typed request of an inference call, whatever API it came through: access
    decides from it (aivailable/api/inference.py), the engine runs its `request`."""

    model: str
    request: ChatRequest | CompletionRequest | EmbeddingRequest
    stream: bool
    include_usage: bool = False  # stream_options.include_usage: a last chunk carries usage
    functions: tuple[dict, ...] = ()  # tools the model may call (chat)
    tool_mode: str | None = None  # None (text or a call), "required", or a function name

    @property
    def kind(self) -> str:
        if isinstance(self.request, ChatRequest):
            return "chat"
        return "completion" if isinstance(self.request, CompletionRequest) else "embedding"

    @property
    def max_tokens(self) -> int:
        """The most completion tokens it may cost: max_tokens for each of its n choices."""
        if isinstance(self.request, EmbeddingRequest):
            return 0
        return self.request.params.max_tokens * self.request.params.n


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value):
        raise bad_request(f"'{name}' must be a number", param=name)
    if not low <= value <= high:
        raise bad_request(f"'{name}' must be between {low} and {high}, got {value}", param=name)
    return float(value)


def _max_tokens(body: dict, limit: int, said_as: str | None) -> int:
    """The bound on completion tokens, never above `limit` (Config.max_tokens_limit), for
    every API; `said_as`: the field's name in the caller's API (Ollama's num_predict)."""
    name = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    value = body.get(name)
    name = said_as or name
    if value is None:
        return limit
    if not isinstance(value, int) or isinstance(value, bool):
        raise bad_request(f"'{name}' must be an integer", param=name)
    if value < 1:
        raise bad_request(f"'{name}' must be at least 1, got {value}", param=name)
    if value > limit:
        raise bad_request(f"'{name}' must be at most {limit}, got {value}", param=name)
    return value


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list) and all(isinstance(s, str) for s in value) and len(value) <= 4:
        return tuple(s for s in value if s)
    raise bad_request("'stop' must be a string or a list of at most 4 strings", param="stop")


def _seed(body: dict) -> int | None:
    value = body.get("seed")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise bad_request("'seed' must be an integer", param="seed")
    return value & 0xFFFFFFFF  # llama.cpp takes a 32-bit seed


def _int(body: dict, name: str, default: int, low: int, high: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise bad_request(f"'{name}' must be an integer from {low} to {high}", param=name)
    return value


def _logit_bias(body: dict) -> tuple[tuple[int, float], ...]:
    value = body.get("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, dict) or len(value) > 1024:
        raise bad_request("'logit_bias' must map at most 1024 token ids to numbers", "logit_bias")
    out = []
    for token, bias in value.items():
        if not str(token).isdigit() or not _is_number(bias) or not -100 <= bias <= 100:
            raise bad_request(
                "'logit_bias' maps token ids to numbers from -100 to 100", param="logit_bias"
            )
        out.append((int(token), -1e30 if bias == -100 else float(bias)))
    return tuple(out)


def _logprobs(body: dict, chat: bool) -> tuple[bool, int]:
    """Chat: logprobs (bool) + top_logprobs (0-20); completions: logprobs (int 0-5)."""
    value = body.get("logprobs")
    if chat:
        if value is not None and not isinstance(value, bool):
            raise bad_request("'logprobs' must be a boolean", param="logprobs")
        top = _int(body, "top_logprobs", 0, 0, 20)
        if top and not value:
            raise bad_request("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        return bool(value), top
    if value is None:
        return False, 0
    return True, _int(body, "logprobs", 0, 0, 5)


def _common(
    body: Any, max_tokens_limit: int, chat: bool, grammar: str | None, said_as: str | None
) -> tuple[str, SamplingParams, bool, bool]:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required and must be a non-empty string", param="model")
    n = _int(body, "n", 1, 1, 8)
    logprobs, top_logprobs = _logprobs(body, chat)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", param="stream_options")
    params = SamplingParams(
        max_tokens=_max_tokens(body, max_tokens_limit, said_as),
        temperature=_number(body, "temperature", 0.8, 0.0, 2.0),
        top_p=_number(body, "top_p", 0.95, 0.0, 1.0),
        stop=_stop(body),
        seed=_seed(body),
        top_k=_int(body, "top_k", 0, 0, 1000),
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        repeat_penalty=_number(body, "repeat_penalty", 1.0, 0.0, 2.0) or 1.0,
        logit_bias=_logit_bias(body),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        n=n,
        grammar=grammar or structured.response_format_grammar(body.get("response_format")),
    )
    return model, params, stream, bool(stream and options.get("include_usage"))


def _content_text(content: Any, index: int) -> str:
    """A message's content: a string, or a list of text parts (images are not supported)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise bad_request(
                    "only text content parts are supported", param=f"messages[{index}].content"
                )
            if not isinstance(part.get("text"), str):
                raise bad_request(
                    "a text part needs a string 'text'", param=f"messages[{index}].content"
                )
            texts.append(part["text"])
        return "".join(texts)
    if content is None:
        return ""
    raise bad_request("'content' must be a string or a list of parts", param=f"messages[{index}]")


def parse_chat(body: Any, max_tokens_limit: int, said_as: str | None = None) -> Parsed:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    functions, tool_mode = structured.parse_tools(body.get("tools"), body.get("tool_choice"))
    grammar = structured.tool_call_grammar(functions, tool_mode) if tool_mode else None
    model, params, stream, include_usage = _common(body, max_tokens_limit, True, grammar, said_as)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' is required and must be a non-empty list", param="messages")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request("each message must be an object", param=f"messages[{i}]")
        role = message.get("role")
        if role not in ROLES:
            raise bad_request(
                f"'role' must be one of {', '.join(ROLES)}", param=f"messages[{i}].role"
            )
        role = "system" if role == "developer" else role
        content = _content_text(message.get("content"), i)
        clean.append(structured.history_message({**message, "role": role}, content))
    if functions:
        clean.insert(0, structured.tools_system_message(functions))
    go_on = body.get("continue_final_message", False)
    if not isinstance(go_on, bool) or (go_on and clean[-1]["role"] != "assistant"):
        raise bad_request(
            "'continue_final_message' needs a boolean and a final assistant message",
            param="continue_final_message",
        )
    request = ChatRequest(tuple(clean), params, continue_final_message=go_on)
    return Parsed(model, request, stream, include_usage, tuple(functions), tool_mode)


def parse_completion(body: Any, max_tokens_limit: int, said_as: str | None = None) -> Parsed:
    model, params, stream, include_usage = _common(body, max_tokens_limit, False, None, said_as)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad_request("'prompt' is required and must be a string", param="prompt")
    return Parsed(model, CompletionRequest(prompt, params), stream, include_usage)


MAX_EMBEDDING_INPUTS = 256  # inputs per request; each is one decode in the worker


def parse_embeddings(body: Any, max_tokens_limit: int = 0) -> Parsed:
    """A /v1/embeddings body (`max_tokens_limit` is unused: embeddings generate nothing)."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required and must be a non-empty string", param="model")
    value = body.get("input")
    inputs = [value] if isinstance(value, str) else value
    if (
        not isinstance(inputs, list)
        or not inputs
        or len(inputs) > MAX_EMBEDDING_INPUTS
        or not all(isinstance(x, str) and x for x in inputs)
    ):
        raise bad_request(
            f"'input' must be a non-empty string or a list of 1 to {MAX_EMBEDDING_INPUTS} "
            "non-empty strings (token arrays are not supported)",
            param="input",
        )
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise bad_request("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and (
        not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1
    ):
        raise bad_request("'dimensions' must be a positive integer", param="dimensions")
    return Parsed(model, EmbeddingRequest(tuple(inputs), encoding, dimensions), stream=False)
