"""The server process: gRPC server, health, reflection, metrics, signals, logging.

Thread arithmetic. grpcio's sync server gives each call a pool thread for its whole life, and
`maximum_concurrent_rpcs` counts every call, health checks included. So:
- generation calls are admitted inside the handler against `capacity = max_batch + max_queue`
  sequence units and refused at once beyond it: they never hold more than `capacity` threads;
- `workers >= capacity + MIN_SPARE_WORKERS` (default `capacity + SPARE_WORKERS`), so health checks,
  reflection and unary calls always find a free thread;
- `maximum_concurrent_rpcs = 2 * workers`: up to `workers` short calls may queue briefly for a thread
  under a flood, and only past that does grpcio refuse calls itself. Health `Watch` streams are served
  non-blocking and hold no thread.

Shutdown (SIGTERM/SIGINT): health NOT_SERVING, new calls UNAVAILABLE, in-flight streams run to their
end within `--grace` seconds, and only then `server.stop()` (which would cut them).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from bitnet_grpc.server.metrics import ServiceMetrics
from bitnet_grpc.server.servicer import SERVICE_NAME, Backend, TextGenerationServicer
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger("bitnet_grpc.serve")

SPARE_WORKERS = 16
MIN_SPARE_WORKERS = 4
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_QUEUE = 32
DEFAULT_METRICS_PORT = 9464
DEFAULT_STREAM_INTERVAL = 0.02


class StartupError(RuntimeError):
    """The server cannot start as configured (port in use, bad sizes, model file problems)."""


@dataclass
class ServeOptions:
    model: str | None = None  # None: the built-in default model
    host: str = "127.0.0.1"
    port: int = 50051
    threads: int | None = None  # kernel threads; None: all cores
    workers: int | None = None  # gRPC pool threads; None: capacity + SPARE_WORKERS
    max_batch: int = DEFAULT_MAX_BATCH
    max_queue: int = DEFAULT_MAX_QUEUE
    ctx_size: int | None = None  # None: the model's context length
    metrics_port: int | None = DEFAULT_METRICS_PORT  # None: no metrics endpoint; 0: pick a free port
    grace: float = 30.0
    step_tokens: int | None = None  # tokens per forward pass (decode rows + prefill chunks)
    stream_interval: float = DEFAULT_STREAM_INTERVAL  # seconds a stream may gather tokens per message

    @property
    def capacity(self) -> int:
        return self.max_batch + self.max_queue

    def pool_sizes(self) -> tuple[int, int]:
        """(workers, maximum_concurrent_rpcs), checked against the arithmetic in the module doc."""
        if self.max_batch < 1 or self.max_queue < 0:
            raise StartupError(
                f"--max-batch must be >= 1 and --max-queue >= 0 (got {self.max_batch}, {self.max_queue})"
            )
        workers = self.workers if self.workers is not None else self.capacity + SPARE_WORKERS
        if workers < self.capacity + MIN_SPARE_WORKERS:
            raise StartupError(
                f"--workers {workers} is too small: generation streams may hold --max-batch + --max-queue = "
                f"{self.capacity} threads, and health checks and unary calls need {MIN_SPARE_WORKERS} more"
            )
        return workers, 2 * workers


class Service:
    """One gRPC server and what it serves; usable in-process (tests) and by `serve_main`."""

    def __init__(self, options: ServeOptions, metrics: ServiceMetrics | None = None) -> None:
        self.options = options
        self.metrics = metrics or ServiceMetrics()
        self.workers, self.max_rpcs = options.pool_sizes()
        self.servicer = TextGenerationServicer(
            self.metrics, capacity=options.capacity, stream_interval=options.stream_interval
        )
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server: grpc.Server | None = None
        self.port = 0
        self.metrics_port: int | None = None
        self.backend: Backend | None = None
        self._stopped = threading.Event()
        self._shutdown_lock = threading.Lock()

    def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def start(self) -> None:
        """Bind and start serving health and reflection (NOT_SERVING until a backend is attached)."""
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="grpc-worker")
        server = grpc.server(
            pool,
            handlers=[self.servicer.handler()],
            maximum_concurrent_rpcs=self.max_rpcs,
            # grpcio sets SO_REUSEPORT by default, which lets a second server share a busy port silently.
            options=[("grpc.so_reuseport", 0)],
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        address = f"{self.options.host}:{self.options.port}"
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as error:
            raise StartupError(f"cannot listen on {address}: {error} (is the port in use?)") from None
        if port == 0:
            raise StartupError(f"cannot listen on {address} (is the port in use?)")
        if self.options.metrics_port is not None:
            try:
                self.metrics_port = self.metrics.serve_http(self.options.metrics_port, self.options.host)
            except OSError as error:
                server.stop(0)
                raise StartupError(
                    f"cannot serve metrics on port {self.options.metrics_port}: {error}"
                ) from None
        server.start()
        self.server, self.port = server, port

    def attach(self, backend: Backend) -> None:
        """Start serving generation on `backend` (its scheduler already running)."""
        self.backend = backend
        self.metrics.track_occupancy(backend.scheduler.queue_depth, backend.scheduler.active_count)
        self.servicer.attach(backend)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def shutdown(self, grace: float | None = None) -> bool:
        """Drain, then stop. Returns True when every in-flight stream finished within the grace."""
        grace = self.options.grace if grace is None else grace
        with self._shutdown_lock:
            if self._stopped.is_set():
                return True
            self.health.enter_graceful_shutdown()
            self.servicer.begin_drain()
            drained = self.servicer.wait_idle(grace)
            if self.server is not None:
                # Streams still open here overran the grace period; stop() cuts them with UNAVAILABLE.
                self.server.stop(0 if not drained else 1.0).wait()
            if self.backend is not None:
                self.backend.scheduler.stop(timeout=5.0)
            self.metrics.stop_http()
            self._stopped.set()
        return drained

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bitnet-grpc serve", description="Serve a BitNet b1.58 model over gRPC.")
    p.add_argument(
        "--model", default=None, help="GGUF file or Hugging Face folder (default: the built-in model)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument(
        "--port", type=int, default=50051, help="gRPC port; 0 picks a free one (default: %(default)s)"
    )
    p.add_argument("--threads", type=int, default=None, help="kernel threads (default: all cores)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"gRPC pool threads (default: max-batch + max-queue + {SPARE_WORKERS})",
    )
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE, help="sequences waiting for a slot")
    p.add_argument(
        "--ctx-size", type=int, default=None, help="context length per sequence (default: the model's)"
    )
    p.add_argument(
        "--step-tokens", type=int, default=None, help="tokens per forward pass (prefill chunking budget)"
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help="Prometheus /metrics port; 0 picks a free one, -1 turns it off (default: %(default)s)",
    )
    p.add_argument(
        "--stream-interval",
        type=float,
        default=DEFAULT_STREAM_INTERVAL,
        help="seconds a stream may gather tokens into one message after its first (0: one per step; "
        "default: %(default)s)",
    )
    p.add_argument("--grace", type=float, default=30.0, help="seconds in-flight streams get on shutdown")
    p.add_argument("--log-level", default=os.environ.get("BITNET_GRPC_LOG_LEVEL", "INFO"))
    return p


def options_from_args(args: argparse.Namespace) -> ServeOptions:
    return ServeOptions(
        model=args.model,
        host=args.host,
        port=args.port,
        threads=args.threads,
        workers=args.workers,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        ctx_size=args.ctx_size,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        grace=args.grace,
        step_tokens=args.step_tokens,
        stream_interval=args.stream_interval,
    )


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


def serve_main(
    argv: Sequence[str] | None = None, *, load_backend: Callable[[ServeOptions], Backend] | None = None
) -> int:
    """`bitnet-grpc serve`: run until SIGTERM/SIGINT, drain, exit 0."""
    args = build_arg_parser().parse_args(argv)
    configure_logging(args.log_level)
    options = options_from_args(args)
    if load_backend is None:
        from bitnet_grpc.server.engine_backend import load_engine_backend as load_backend
    stop = threading.Event()
    signals_seen = []

    def on_signal(signum: int, frame: object) -> None:
        signals_seen.append(signum)
        if len(signals_seen) > 1:
            log.warning("second signal: stopping now")
            os._exit(1)
        log.info("%s received: draining (grace %.1fs)", signal.Signals(signum).name, options.grace)
        stop.set()

    try:
        service = Service(options)
        service.start()
    except StartupError as error:
        log.error("%s", error)
        return 1
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info(
        "listening on %s:%d (health NOT_SERVING until the model loads); metrics %s",
        options.host,
        service.port,
        f"on http://{options.host}:{service.metrics_port}/metrics" if service.metrics_port else "off",
    )
    try:
        started = time.monotonic()
        backend = load_backend(options)
    except Exception as error:  # a model that cannot load is a startup error, not a crash
        log.error("cannot load the model: %s", error)
        service.shutdown(0)
        return 1
    if stop.is_set():
        backend.scheduler.stop()
        service.shutdown(0)
        return 0
    service.attach(backend)
    info = backend.model_info()
    log.info(
        "serving %s (%s, %s, %d layers) on %s:%d: kernel path %s, %d threads, max-batch %d, max-queue %d, "
        "workers %d, ctx %d; loaded in %.1fs",
        info.model_path,
        info.architecture,
        info.weight_format,
        info.layers,
        options.host,
        service.port,
        info.kernel_path,
        info.threads,
        options.max_batch,
        options.max_queue,
        service.workers,
        info.context_size,
        time.monotonic() - started,
    )
    while not stop.wait(0.5):
        pass
    drained = service.shutdown()
    log.info("stopped (%s)", "all streams finished" if drained else "grace period ran out; streams were cut")
    return 0
