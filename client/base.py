"""Settings the sync and async clients share: where to connect, deadlines, retries, balancing."""

from __future__ import annotations

from collections.abc import Sequence

from bitnet_grpc.client.channel import RetryPolicy, resolve_channel

DEFAULT_TARGET = "127.0.0.1:50051"
UNSET = object()


class ClientSettings:
    """What the sync and async clients share: target, options, deadline and retry settings."""

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
        self.address, base_options = resolve_channel(target, self.retry, load_balancing)
        self.options = base_options + list(options)
        self.timeout = timeout
        self.wait_for_ready = wait_for_ready

    def deadline(self, timeout: object) -> float | None:
        """Per-call timeout: the call's own when given (None = no deadline), else the client's."""
        return self.timeout if timeout is UNSET else timeout  # type: ignore[return-value]
