"""One exception type for every error the server (or the transport) reports.

Callers handle a failed call in one place whatever the RPC was; the gRPC status code says what kind of
failure it is and `retry_after` carries the server's `google.rpc.RetryInfo` hint when it sent one.
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class BitnetError(Exception):
    """A call failed: `code` is the gRPC status, `message` the server's text, `retry_after` in seconds."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.retry_after = retry_after

    def __reduce__(self):  # keep the fields when pickled (e.g. across processes)
        return (type(self), (self.code, self.message, self.retry_after))

    def to_dict(self) -> dict:
        return {"code": self.code.name, "message": self.message, "retry_after": self.retry_after}


def _retry_delay(call) -> float | None:
    """The RetryInfo delay from the rich status in the trailers, if any."""
    try:
        status = rpc_status.from_call(call)
    except ValueError:  # rich status inconsistent with the plain one: ignore the details
        return None
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None


def from_rpc_error(error: grpc.RpcError) -> BitnetError:
    """Translate a failed call (sync `grpc.Call` or `grpc.aio.AioRpcError`) into a BitnetError."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = error.details() if hasattr(error, "details") else str(error)
    retry_after = _retry_delay(error) if hasattr(error, "trailing_metadata") else None
    return BitnetError(code or grpc.StatusCode.UNKNOWN, message or "", retry_after)


def code_from_number(number: int) -> grpc.StatusCode:
    """grpc.StatusCode for a google.rpc.Code number (as in BatchError.code)."""
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN
