"""`aivailable chat`: stream a model's answer into the terminal, one message or a conversation."""

from __future__ import annotations

import json
import sys

from aivailable.http_client import ClientError, open_request


def stream_chat(
    url: str, model: str, messages: list[dict], max_tokens: int, temperature: float, out=sys.stdout
) -> str:
    """Send one chat request with stream=true and print tokens as they arrive."""
    body = {
        "model": model,
        "messages": messages,
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": temperature,
    }
    pieces = []
    with open_request(f"{url}/v1/chat/completions", "POST", body, timeout=300) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise ClientError(event["error"].get("message", "stream failed"))
            for choice in event.get("choices", []):
                text = choice.get("delta", {}).get("content")
                if text:
                    pieces.append(text)
                    out.write(text)
                    out.flush()
    out.write("\n")
    return "".join(pieces)


def chat_loop(url: str, model: str, first: str, max_tokens: int, temperature: float) -> int:
    """One message from the command line, or a conversation read line by line from stdin."""
    if first:
        stream_chat(url, model, [{"role": "user", "content": first}], max_tokens, temperature)
        return 0
    messages: list[dict] = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        answer = stream_chat(url, model, messages, max_tokens, temperature)
        messages.append({"role": "assistant", "content": answer})
