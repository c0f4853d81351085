"""Prometheus metrics of the service, in a registry of their own.

A private registry keeps the HTTP endpoint free of the client library's process collectors' global
state, so several servers (tests run many in one process) never collide on metric names.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Latency buckets in seconds: a token takes milliseconds on a small model, a second on a 2B one under load.
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServiceMetrics:
    """The counters, gauges and histograms the servicer and scheduler update."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "bitnet_requests",
            "Finished RPCs by method and gRPC status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "bitnet_queue_depth", "Sequences waiting for a batch slot.", registry=self.registry
        )
        self.active_sequences = Gauge(
            "bitnet_active_sequences", "Sequences holding a KV slot.", registry=self.registry
        )
        self.time_to_first_token = Histogram(
            "bitnet_time_to_first_token_seconds",
            "From arrival to the first sampled token.",
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "bitnet_inter_token_latency_seconds",
            "Between consecutive tokens of one sequence.",
            buckets=_ITL_BUCKETS,
            registry=self.registry,
        )
        self.generated_tokens = Counter(
            "bitnet_generated_tokens", "Tokens sampled for clients.", registry=self.registry
        )
        self.prompt_tokens = Counter(
            "bitnet_prompt_tokens", "Prompt tokens of sequences that finished.", registry=self.registry
        )
        self._http: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None

    def track_occupancy(self, queue_depth: Callable[[], int], active: Callable[[], int]) -> None:
        """Read queue depth and active count from their owner at scrape time, so they are never stale."""
        self.queue_depth.set_function(lambda: float(queue_depth()))
        self.active_sequences.set_function(lambda: float(active()))

    def serve_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Start the /metrics endpoint on a daemon thread; returns the bound port (0 picks one)."""
        self._http, self._http_thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
