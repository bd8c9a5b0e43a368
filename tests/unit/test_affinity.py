"""Prefix-affinity routing (peer/affinity.py) and its place in order_replicas."""

from dataclasses import replace
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from aivailable.api.openai_api import OpenAIApi
from aivailable.backends.base import Finished
from aivailable.metrics import Metrics
from peer.affinity import affinity_order, load_bound, prefix_key
from peer.availability import Replica, order_replicas

NODES = [f"n{i}" for i in range(8)]


def chat(*turns: str, system: str | None = "be brief") -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return {"model": "m", "messages": messages}


def first(key: str, loads: dict[str, int]) -> str:
    return affinity_order(key, list(loads), lambda n: n, loads.__getitem__)[0]


def test_every_turn_of_a_conversation_has_the_key_of_its_first():
    key = prefix_key(chat("hello"))
    assert key == prefix_key(chat("hello", "hi there", "and then?"))
    assert key == prefix_key(chat("hello", "hi there", "and then?", "so", "more"))
    assert key != prefix_key(chat("goodbye"))
    assert key != prefix_key(chat("hello", system="be verbose"))
    # A completion prompt by its head; Ollama's separate system prompt counts.
    long = "x" * 2000
    assert prefix_key({"prompt": long + "a"}) == prefix_key({"prompt": long + "b"})
    assert prefix_key({"prompt": "p", "system": "a"}) != prefix_key({"prompt": "p"})
    for nothing in ({}, {"messages": []}, {"prompt": ""}, [1], {"input": "x"}, None):
        assert prefix_key(nothing) is None


keys = st.text(min_size=1, max_size=12)
load_maps = st.dictionaries(st.sampled_from(NODES), st.integers(0, 20), min_size=1, max_size=8)


@settings(max_examples=300, deadline=None)
@given(keys, load_maps)
def test_the_choice_is_always_under_the_load_bound(key, loads):
    chosen = first(key, loads)
    assert loads[chosen] < load_bound(list(loads.values()))


@settings(max_examples=200, deadline=None)
@given(st.lists(keys, min_size=1, max_size=200), st.integers(1, 8))
def test_no_replica_is_ever_given_more_than_the_bound(stream, n):
    """Requests arriving one by one (none finishing): after each, every replica's load is
    at most the bound of that moment, 1.25x the mean rounded up."""
    loads = dict.fromkeys(NODES[:n], 0)
    for key in stream:
        bound = load_bound(list(loads.values()))
        loads[first(key, loads)] += 1
        assert max(loads.values()) <= bound


@settings(max_examples=200, deadline=None)
@given(st.lists(keys, min_size=1, max_size=200), st.integers(1, 8), st.integers(1, 8))
def test_with_slots_a_replica_takes_more_only_while_it_has_a_free_one(stream, n, slots):
    """The bound with slots: a replica past 1.25x the mean takes more only into a free
    slot, so its load never exceeds the larger of its slots and the bound."""
    loads = dict.fromkeys(NODES[:n], 0)
    for key in stream:
        bound = load_bound(list(loads.values()))
        chosen = affinity_order(
            key, list(loads), lambda x: x, loads.__getitem__, lambda x: loads[x] < slots
        )[0]
        loads[chosen] += 1
        assert max(loads.values()) <= max(bound, slots)


def test_a_free_slot_keeps_the_conversation_home_whatever_the_mean():
    key = prefix_key(chat("hello"))
    loads = {"a": 0, "b": 0}
    home = first(key, loads)
    other = "b" if home == "a" else "a"
    busier = {home: 3, other: 0}  # bound ceil(1.25 * 4 / 2) = 3: over it
    assert first(key, busier) == other  # without slots known: the bound moves it
    order = affinity_order(key, list(busier), lambda x: x, busier.__getitem__, lambda x: True)
    assert order[0] == home  # with a free slot it stays where its prefix is cached


@settings(max_examples=200, deadline=None)
@given(keys, st.permutations(NODES[:5]), st.integers(0, 3))
def test_the_same_conversation_goes_to_the_same_replica_from_any_entry_peer(key, order, load):
    """No shared state: any peer, listing the replicas in any order, picks the same one."""
    loads = dict.fromkeys(NODES[:5], load)
    shuffled = {n: loads[n] for n in order}
    assert first(key, loads) == first(key, shuffled)


@settings(max_examples=200, deadline=None)
@given(keys)
def test_a_conversation_moves_when_its_replica_is_overloaded_and_comes_back(key):
    loads = dict.fromkeys(NODES[:4], 2)
    home = first(key, loads)
    assert first(key, {**loads, home: 3}) == home  # 3 < ceil(1.25 * 10 / 4) = 4: allowed
    moved = first(key, {**loads, home: 9})
    assert moved != home
    assert first(key, loads) == home  # its load back down: home again


@settings(max_examples=200, deadline=None)
@given(st.lists(keys, min_size=1, max_size=50, unique=True), st.sampled_from(NODES[:4]))
def test_a_dead_replica_moves_only_its_own_conversations(conversations, dead):
    loads = dict.fromkeys(NODES[:4], 0)
    survivors = {n: 0 for n in loads if n != dead}
    for key in conversations:
        before, after = first(key, loads), first(key, survivors)
        assert after != dead
        if before != dead:
            assert after == before


def rep(node: str, depth: int = 0, free: int = 4, local: bool = False, **kw) -> Replica:
    return Replica(node, f"{node}:1", local, "ready", depth, free_slots=free, **kw)


def test_order_replicas_by_affinity_prefers_a_free_slot_under_the_bound():
    key = prefix_key(chat("hello"))
    a, b = rep("a"), rep("b")
    home = order_replicas([a, b], key=key, routing="affinity")[0].node_id
    other = "b" if home == "a" else "a"
    # The home replica is full: the request goes where it can start at once.
    full = [rep(home, depth=4, free=0), rep(other, depth=2, free=2)]
    assert order_replicas(full, key=key, routing="affinity")[0].node_id == other
    # This peer's own replica refuses more (admits=False) and everything else is full:
    # the remote one is tried first, never a refusal here first.
    mine = rep(other, depth=9, free=0, local=True, admits=False)
    both_full = [rep(home, depth=4, free=0), mine]
    assert order_replicas(both_full, key=key, routing="affinity")[0].node_id == home
    # A suspect host only when nothing else is.
    suspect = [replace(a, member_state="suspect"), b]
    assert order_replicas(suspect, key=key, routing="affinity")[0].node_id == "b"
    # Without a key (embeddings) or with affinity off: the most free capacity.
    assert order_replicas(full, routing="affinity")[0].node_id == other


async def test_prefix_cache_use_is_counted_in_the_metrics():
    """What affinity routing is for shows in /metrics where the generation ran."""
    metrics = Metrics()
    api = OpenAIApi(lambda: {}, metrics, 64, 5)
    meter = SimpleNamespace(parsed=SimpleNamespace(model="m"), used=lambda *a: None)
    api.count(meter, Finished("stop", 100, 5, cached_tokens=80))
    api.count(meter, Finished("stop", 40, 5))
    text = metrics.render().decode()
    assert 'aivailable_prefix_cache_tokens_total{model="m"} 80.0' in text
    assert 'aivailable_prefix_cache_requests_total{hit="yes",model="m"} 1.0' in text
    assert 'aivailable_prefix_cache_requests_total{hit="no",model="m"} 1.0' in text


# --- "affinity_bounded": the bound alone moves a conversation off its home -------------


@settings(max_examples=200, deadline=None)
@given(st.lists(keys, min_size=1, max_size=200), st.integers(1, 8), st.integers(1, 8))
def test_bounded_affinity_never_passes_the_bound_but_into_a_free_slot(stream, n, slots):
    loads = dict.fromkeys(NODES[:n], 0)
    for key in stream:
        bound = load_bound(list(loads.values()))
        chosen = affinity_order(
            key,
            list(loads),
            lambda x: x,
            loads.__getitem__,
            lambda x: loads[x] < slots,
            room_first=False,
        )[0]
        assert loads[chosen] < max(bound, slots)
        loads[chosen] += 1


def test_bounded_affinity_queues_at_a_full_home_under_the_bound():
    key = prefix_key(chat("hello"))
    a, b = rep("a"), rep("b")
    home = order_replicas([a, b], key=key, routing="affinity_bounded")[0].node_id
    other = "b" if home == "a" else "a"
    # Full home at 4, the other at 2 with free slots: bound ceil(1.25 * 7 / 2) = 5.
    full = [rep(home, depth=4, free=0), rep(other, depth=2, free=2)]
    assert order_replicas(full, key=key, routing="affinity_bounded")[0].node_id == home
    assert order_replicas(full, key=key, routing="affinity")[0].node_id == other
    # Past the bound (5 of 5), the other replica's free slot takes it.
    over = [rep(home, depth=5, free=0), rep(other, depth=2, free=2)]
    assert order_replicas(over, key=key, routing="affinity_bounded")[0].node_id == other
