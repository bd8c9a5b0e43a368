"""Prefix-affinity routing: the replica that holds a conversation's prefix gets its turns. Pure.

A chat resends its whole history each turn, and a replica keeps a finished request's KV
cells (aivailable/backends/scheduler.py), so the turn that lands where the previous one
ran evaluates only the new tokens. Every entry peer computes the same choice from the
request alone and the load already in gossip, so no routing state is shared:

- `prefix_key(body)`: what identifies the conversation: its messages up to and including
  the first user message (a chat's turns all begin so), or the head of a completion prompt;
- `affinity_order(key, replicas, load)`: consistent hashing with bounded load (Mirrokni,
  Thorup and Zadimoghaddam, 2018) over rendezvous hashing: each key ranks the replicas by
  a hash of (key, node), the same ranking on every peer, and moving a replica in or out
  moves only the keys it ranked first. A replica takes its affinity traffic while it has
  a free slot, or while its load stays under `ceil(factor * (total load + 1) / replicas)`;
  past both, the next one in the key's ranking. With few replicas a rendezvous ranking
  spreads keys more evenly than a ring of virtual nodes, and walking it is the ring's
  "next node".

  Why a free slot also counts as room: a request that starts at once costs its replica one
  more sequence in the batch, not a wait, so sending it elsewhere would only trade its
  cached prefix for a full prefill. With 2 replicas the bound alone is harsh (loads 2 and
  0 give a bound of 2), and it moved 2 of 8 later turns off their cache in bench/affinity.py
  while their home had slots free. The bound decides among replicas that would queue.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from typing import TypeVar

# Characters of a completion prompt that name its conversation: a chat template's system
# part and first turn fit, and prompts that agree that far share cache cells anyway.
PROMPT_HEAD_CHARS = 512
# The bound of Mirrokni et al. with epsilon 0.25: the "about 1.25x the mean".
LOAD_FACTOR = 1.25

R = TypeVar("R")


def prefix_key(body: object) -> str | None:
    """The conversation's key of a chat or completion body (OpenAI or Ollama), or None
    when the body names no prefix (embeddings, an empty prompt, a malformed body)."""
    if not isinstance(body, dict):
        return None
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        head = []
        for message in messages:
            head.append(message)
            if isinstance(message, dict) and message.get("role") == "user":
                break
        text = json.dumps(head, sort_keys=True, separators=(",", ":"), default=str)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt:  # OpenAI allows a list: its first prompt
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            return None
        text = prompt[:PROMPT_HEAD_CHARS]
    system = body.get("system")  # Ollama's generate carries its system prompt apart
    if isinstance(system, str):
        text = system + "\0" + text
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _rank(key: str, node_id: str) -> int:
    digest = hashlib.blake2b(f"{key}\0{node_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def load_bound(loads: Sequence[int], factor: float = LOAD_FACTOR) -> int:
    """A replica under this load may take one more request: `factor` times the mean load
    once this request is counted, rounded up (so the least loaded is always under it)."""
    if not loads:
        return 0
    return math.ceil(factor * (sum(loads) + 1) / len(loads))


def affinity_order(
    key: str,
    replicas: Sequence[R],
    node_of: Callable[[R], str],
    load_of: Callable[[R], int],
    has_room: Callable[[R], bool] = lambda r: False,
    factor: float = LOAD_FACTOR,
    room_first: bool = True,
) -> list[R]:
    """`replicas` best first for `key`: in the key's ranking, those that can start it at
    once (`has_room`; unknown: none), then those under the load bound that would queue it,
    then the rest, least loaded first (tried only when the better ones fail).

    `room_first=False` ("affinity_bounded"): the bound alone decides along the ranking,
    a free slot counting as under it, so a full home under the bound queues the turn
    beside its cached prefix instead of sending it to a free slot that would prefill the
    whole history (8 chats hashed 5/3 onto 2 replicas of 4 slots: the fifth of the busier
    home's chats went to the other replica nearly every turn)."""
    if not replicas:
        return []
    bound = load_bound([load_of(r) for r in replicas], factor)
    ranked = sorted(replicas, key=lambda r: (-_rank(key, node_of(r)), node_of(r)))
    if not room_first:
        fits = [r for r in ranked if has_room(r) or load_of(r) < bound]
        over = [r for r in ranked if not (has_room(r) or load_of(r) < bound)]
        return fits + sorted(over, key=lambda r: (load_of(r), node_of(r)))
    roomy = [r for r in ranked if has_room(r)]
    queue = [r for r in ranked if not has_room(r) and load_of(r) < bound]
    over = [r for r in ranked if not has_room(r) and load_of(r) >= bound]
    return roomy + queue + sorted(over, key=lambda r: (load_of(r), node_of(r)))
