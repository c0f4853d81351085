"""Channel target and options: several addresses, client-side load balancing and retries.

Everything is expressed as a gRPC service config, so the C core does the work: `round_robin` spreads
calls over every address that is up, and the retry policy re-sends a call that failed with UNAVAILABLE
(and RESOURCE_EXHAUSTED when asked) with exponential backoff. gRPC retries a streaming call only until
its first response has arrived, which is the right bound for generation: tokens are never duplicated.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass

SERVICE_NAME = "bitnet.v1.TextGeneration"
# gRPC caps retry policies at 5 attempts (one call plus four retries).
MAX_RETRIES = 4


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with full-jitter exponential backoff, as gRPC's retry policy defines them."""

    retries: int = 3
    initial_backoff: float = 0.2
    max_backoff: float = 2.0
    multiplier: float = 2.0
    resource_exhausted: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.retries, bool) or not isinstance(self.retries, int):
            raise ValueError(f"retries must be an integer, got {self.retries!r}")
        if not 0 <= self.retries <= MAX_RETRIES:
            raise ValueError(
                f"retries must be in [0, {MAX_RETRIES}] (gRPC allows 5 attempts), got {self.retries}"
            )
        if not 0 < self.initial_backoff <= self.max_backoff:
            raise ValueError("initial_backoff must be > 0 and <= max_backoff")
        if self.multiplier <= 0:
            raise ValueError("retry backoff multiplier must be > 0")

    def method_config(self) -> dict:
        codes = ["UNAVAILABLE"] + (["RESOURCE_EXHAUSTED"] if self.resource_exhausted else [])
        return {
            "name": [{"service": SERVICE_NAME}],
            "retryPolicy": {
                "maxAttempts": self.retries + 1,
                "initialBackoff": f"{self.initial_backoff:.3f}s",
                "maxBackoff": f"{self.max_backoff:.3f}s",
                "backoffMultiplier": self.multiplier,
                "retryableStatusCodes": codes,
            },
        }


def _split_host_port(address: str) -> tuple[str, int]:
    if address.startswith("["):  # [v6]:port
        host, _, port = address[1:].partition("]:")
    else:
        host, sep, port = address.rpartition(":")
        if not sep:
            raise ValueError(f"target {address!r} must be host:port")
    try:
        return host, int(port)
    except ValueError:
        raise ValueError(f"target {address!r} has no valid port") from None


def _resolve(address: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    host, port = _split_host_port(address)
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))


def multi_address_target(addresses: Sequence[str]) -> str:
    """One `ipv4:`/`ipv6:` target naming every address, so one channel balances over all of them.

    Host names are resolved here once; a name that resolves to several addresses contributes all.
    """
    entries: list[tuple[int, str]] = []
    for address in addresses:
        _, port = _split_host_port(address)
        for ip in _resolve(address):
            entries.append((ip.version, f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}"))
    versions = {version for version, _ in entries}
    if len(versions) != 1:
        raise ValueError(f"targets {list(addresses)} mix IPv4 and IPv6 addresses; give one family")
    scheme = "ipv4" if versions == {4} else "ipv6"
    return f"{scheme}:" + ",".join(dict.fromkeys(entry for _, entry in entries))


def channel_target(target: str | Sequence[str]) -> tuple[str, bool]:
    """The gRPC target string and whether it names several addresses."""
    if isinstance(target, str):
        return target, False
    targets = list(target)
    if not targets:
        raise ValueError("target must name at least one address")
    if len(targets) == 1:
        return targets[0], False
    return multi_address_target(targets), True


def channel_options(retry: RetryPolicy, load_balancing: str | None) -> list[tuple[str, object]]:
    config: dict = {}
    if load_balancing:
        config["loadBalancingConfig"] = [{load_balancing: {}}]
    if retry.retries:
        config["methodConfig"] = [retry.method_config()]
    return [
        ("grpc.service_config", json.dumps(config)),
        ("grpc.enable_retries", 1 if retry.retries else 0),
        # Reconnect quickly after a refused connection, so a retry can reach a server that just came up
        # (the default starts at 1 s and grows to 2 minutes).
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", max(1000, int(retry.max_backoff * 1000))),
    ]


def resolve_channel(
    target: str | Sequence[str], retry: RetryPolicy, load_balancing: str | None = None
) -> tuple[str, list[tuple[str, object]]]:
    """Target string and channel options; several addresses default to round_robin."""
    address, several = channel_target(target)
    if load_balancing is None and several:
        load_balancing = "round_robin"
    return address, channel_options(retry, load_balancing)
