"""What the sync and async clients share: the constructor, the channel's target and options, deadlines."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from bitnet_grpc.client.channel import RetryPolicy, resolve_channel
from bitnet_grpc.proto import generation_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
UNSET = object()  # "no per-call timeout given": use the client's (None would mean no deadline)


class ClientBase:
    """Builds one channel and the stubs over it; subclasses say which gRPC flavour (sync or aio).

    `target` is "host:port", any gRPC target URI ("dns:///svc:50051", "unix:/path"), or a list of
    "host:port" addresses that one channel balances over with round_robin (`load_balancing` names
    another policy, or asks for round_robin over the addresses a single DNS name resolves to).
    `timeout` is each call's deadline in seconds (None: none; methods take their own `timeout=`).
    `retries` (0..4) re-sends a call that failed with UNAVAILABLE, and RESOURCE_EXHAUSTED when
    `retry_resource_exhausted`, after full-jitter exponential backoff from `initial_backoff` up to
    `max_backoff` seconds. `wait_for_ready` makes calls wait for a connection (up to their deadline)
    instead of failing while the server is unreachable.
    """

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        timeout: float | None = 300.0,
        retries: int = 3,
        retry_resource_exhausted: bool = False,
        initial_backoff: float = 0.2,
        max_backoff: float = 2.0,
        load_balancing: str | None = None,
        wait_for_ready: bool = False,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, object]] = (),
    ) -> None:
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {timeout}")
        self.retry = RetryPolicy(
            retries=retries,
            initial_backoff=initial_backoff,
            max_backoff=max_backoff,
            resource_exhausted=retry_resource_exhausted,
        )
        self.address, channel_options = resolve_channel(target, self.retry, load_balancing)
        self.timeout = timeout
        self.wait_for_ready = wait_for_ready
        self._channel = self._open_channel(self.address, credentials, channel_options + list(options))
        self._stub = pb_grpc.TextGenerationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _open_channel(self, address: str, credentials, options: list) -> grpc.Channel:
        raise NotImplementedError

    def _call_options(self, timeout: object) -> dict:
        """Per-call timeout: the call's own when given (None = no deadline), else the client's."""
        deadline = self.timeout if timeout is UNSET else timeout
        return {"timeout": deadline, "wait_for_ready": self.wait_for_ready}
