"""Shared pytest fixtures. Each section belongs to one part of the project; keep them separate."""

from __future__ import annotations

# ==================================================================================================
# Service fixtures (servers on 127.0.0.1, ephemeral ports): owner, the service engineer.
# The model: the built-in default one when the package ships it, else a small random model written
# as GGUF with our writer (so subprocess servers can load it too).
# ==================================================================================================
import dataclasses
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

SERVICE_TESTS = Path(__file__).parent


@pytest.fixture(scope="session")
def service_model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    from bitnet_grpc.server.engine import DEFAULT_MODEL

    if DEFAULT_MODEL.is_file():
        return str(DEFAULT_MODEL)
    sys.path.insert(0, str(SERVICE_TESTS))
    from _formats_helpers import random_weights
    from bitnet_grpc.server.gguf_export import write_gguf

    path = tmp_path_factory.mktemp("service-model") / "random-bitnet.gguf"
    write_gguf(random_weights(seed=7), path, "i2_s")
    return str(path)


@pytest.fixture(scope="session")
def service_weights(service_model_path: str):
    from bitnet_grpc.server.loader import load_weights

    return load_weights(service_model_path)


@dataclasses.dataclass
class RunningServer:
    """An in-process server and what tests need to talk to it."""

    service: object  # serve.Service
    backend: object  # engine_backend.EngineBackend
    channel: grpc.Channel

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.service.port}"

    @property
    def stub(self):
        from bitnet_grpc.proto import generation_pb2_grpc

        return generation_pb2_grpc.TextGenerationStub(self.channel)

    @property
    def health(self):
        from grpc_health.v1 import health_pb2_grpc

        return health_pb2_grpc.HealthStub(self.channel)

    def metrics_text(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.service.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def metric(self, name: str, labels: str = "") -> float:
        """The value of one sample in the /metrics text (0 when absent)."""
        key = f"{name}{{{labels}}}" if labels else name
        for line in self.metrics_text().splitlines():
            if line.startswith(key + " "):
                return float(line.split()[-1])
        return 0.0

    def slow_down(self, seconds_per_step: float) -> None:
        """Make every engine step take at least this long, so a test's "while it runs" checks cannot race
        a fast machine. The model still computes every step; only a sleep is added."""
        model = self.backend.engine.model
        forward = model.forward

        def slow_forward(*args, **kwargs):
            time.sleep(seconds_per_step)
            return forward(*args, **kwargs)

        model.forward = slow_forward

    def wait_until(self, condition: Callable[[], bool], timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if condition():
                return True
            time.sleep(0.01)
        return condition()


@pytest.fixture
def make_server(service_weights) -> Iterator[Callable[..., RunningServer]]:
    """Factory: make_server(max_batch=4, max_queue=8, **ServeOptions fields) -> a SERVING server."""
    from bitnet_grpc.server.engine_backend import backend_from_weights
    from bitnet_grpc.server.serve import ServeOptions, Service

    started: list[RunningServer] = []

    def make(
        max_batch: int = 4, max_queue: int = 8, step_tokens: int | None = None, **options
    ) -> RunningServer:
        opts = ServeOptions(port=0, metrics_port=0, max_batch=max_batch, max_queue=max_queue, **options)
        service = Service(opts)
        service.start()
        backend = backend_from_weights(
            service_weights, max_batch=max_batch, max_queue=max_queue, step_tokens=step_tokens, threads=2
        )
        service.attach(backend)
        channel = grpc.insecure_channel(f"127.0.0.1:{service.port}")
        server = RunningServer(service, backend, channel)
        started.append(server)
        return server

    yield make
    for server in started:
        server.channel.close()
        server.service.shutdown(grace=5.0)


@pytest.fixture
def server(make_server) -> RunningServer:
    """A default-sized in-process server."""
    return make_server()


# ==================================================================================================
# Ternary kernel fixtures (test_kernels_ternary.py, test_ternary_batch.py): owner, the kernels.
# ==================================================================================================
TERNARY_PATHS = ["portable", "avx2", "avx512bw", "avx512vnni"]


@pytest.fixture(params=TERNARY_PATHS)
def kernel_path(request):
    """Run the test once per ternary matmul path this CPU has, restoring the previous choice after."""
    from bitnet_grpc.cyext import ternary

    name = request.param
    if name not in ternary.kernel_paths():
        pytest.skip(f"this CPU cannot run the {name} path")
    previous = ternary.get_kernel_path()
    ternary.set_kernel_path(name)
    yield name
    ternary.set_kernel_path(previous)


@pytest.fixture
def threads():
    """Lets a test change the ternary kernels' thread count; restores it afterwards."""
    from bitnet_grpc.cyext import ternary

    previous = ternary.get_num_threads()
    yield ternary.set_num_threads
    ternary.set_num_threads(previous)
