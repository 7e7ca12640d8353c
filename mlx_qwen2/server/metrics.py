"""Prometheus metrics of one server: counters the routes update, and gauges read from the engine when scraped."""

from __future__ import annotations

from collections.abc import Iterator

import mlx.core as mx
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .runner import EngineRunner

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """Each server has its own registry, so several can live in one process (tests)."""

    def __init__(self, runner: EngineRunner):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mlx_qwen2_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("mlx_qwen2_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("mlx_qwen2_generation_tokens", "tokens generated", registry=r)
        self.cached_tokens = Counter(
            "mlx_qwen2_cached_tokens", "prompt tokens served from the prefix cache", registry=r
        )
        self.ttft = Histogram(
            "mlx_qwen2_time_to_first_token_seconds",
            "time from a request's arrival to its first token",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        r.register(_EngineCollector(runner))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """Queue depth, running sequences, cache hits and memory, read at scrape time."""

    def __init__(self, runner: EngineRunner):
        self.runner = runner

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        engine = self.runner.engine
        yield GaugeMetricFamily("mlx_qwen2_queue_depth", "sequences waiting for a place", value=len(engine.waiting))
        yield GaugeMetricFamily("mlx_qwen2_running_sequences", "sequences being decoded", value=len(engine.running))
        yield GaugeMetricFamily("mlx_qwen2_active_sequences", "sequences running or queued", value=self.runner.active)
        yield GaugeMetricFamily("mlx_qwen2_mlx_active_memory_bytes", "MLX memory in use", value=mx.get_active_memory())
        prefix = engine.prefix_cache
        if prefix is not None:
            yield CounterMetricFamily(
                "mlx_qwen2_prefix_cache_hits", "prompts that reused a cached prefix", value=prefix.hits
            )
            yield CounterMetricFamily(
                "mlx_qwen2_prefix_cache_misses", "prompts with no cached prefix", value=prefix.misses
            )
            yield GaugeMetricFamily(
                "mlx_qwen2_prefix_cache_bytes", "bytes held by the prefix cache", value=prefix.nbytes
            )
