"""Prometheus metrics of one peer, in a registry of its own (several peers may share a process in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets in seconds: from a fast first token on a GPU to a long CPU generation.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "aivailable_requests",
            "API requests by endpoint, model and status",
            ["endpoint", "model", "status"],
            registry=r,
        )
        self.tokens = Counter(
            "aivailable_tokens",
            "Tokens processed, by model and kind (prompt/completion)",
            ["model", "kind"],
            registry=r,
        )
        self.latency = Histogram(
            "aivailable_request_latency_seconds",
            "Whole request latency",
            ["endpoint", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "aivailable_time_to_first_token_seconds",
            "Time to the first generated token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "aivailable_queue_depth",
            "Requests waiting or running per model",
            ["model"],
            registry=r,
        )
        self.vram = Gauge(
            "aivailable_gpu_vram_bytes",
            "GPU memory by GPU and kind (total/free)",
            ["gpu", "name", "kind"],
            registry=r,
        )
        # A gauge read from the engine at scrape time: the engine owns the count.
        self.engine_restarts = Gauge(
            "aivailable_engine_restarts",
            "Model worker restarts after a crash",
            ["model"],
            registry=r,
        )
        self.client_disconnects = Counter(
            "aivailable_client_disconnects",
            "Streams whose client went away mid-generation",
            ["model"],
            registry=r,
        )

        # Prefix-cache hits where the generation ran (usage.cached_tokens): what affinity
        # routing (peer/affinity.py) is for.
        self.prefix_cache = Counter(
            "aivailable_prefix_cache_requests",
            "Generations by model and whether the prefix cache served part of the prompt",
            ["model", "hit"],
            registry=r,
        )
        self.cached_tokens = Counter(
            "aivailable_prefix_cache_tokens",
            "Prompt tokens served from the prefix cache instead of evaluated",
            ["model"],
            registry=r,
        )
        # Of those, the hits a slot had lost and the host-memory prompt cache gave back
        # (backends/prompt_cache.py).
        self.prompt_cache_restores = Counter(
            "aivailable_prompt_cache_restores",
            "Generations whose prefix was restored from the host-memory prompt cache",
            ["model"],
            registry=r,
        )
        self.restored_tokens = Counter(
            "aivailable_prompt_cache_restored_tokens",
            "Prompt tokens restored from the host-memory prompt cache",
            ["model"],
            registry=r,
        )

        # Read from the gossip layer at scrape time (packets, rejections for a bad key,
        # probes, suspicions, ...): it owns the counts.
        self.gossip = Gauge(
            "aivailable_gossip",
            "Gossip and membership counters by name",
            ["counter"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
