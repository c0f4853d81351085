"""Plain Python values for what the server sends back, so callers never touch protobuf messages."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, replace

import grpc
from bitnet_grpc.client.errors import BitnetError
from bitnet_grpc.proto import generation_pb2 as pb

FINISH_REASONS = {
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_STOP_SEQUENCE: "stop_sequence",
    pb.FINISH_REASON_CONTEXT_FULL: "context_full",
}


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprobs:
    """The sampled token's log-probability and the best alternatives, best first."""

    chosen: TokenLogprob
    top: tuple[TokenLogprob, ...]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Timings:
    """Server-side timings in seconds, measured from the request's arrival."""

    queue_seconds: float
    time_to_first_token_seconds: float
    decode_tokens_per_second: float
    total_seconds: float


@dataclass(frozen=True)
class Chunk:
    """One streamed message; `finish_reason`, `usage` and `timings` are set on the last one only."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprobs, ...] = ()
    finish_reason: str | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    request_id: str = ""

    @property
    def is_last(self) -> bool:
        return self.finish_reason is not None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Completion:
    """A whole generation; in a batch a failed prompt has `error` set and the other fields empty."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprobs, ...] = ()
    finish_reason: str | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    request_id: str = ""
    error: BitnetError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def failed(cls, exc: Exception) -> Completion:
        """A batch entry for a prompt that failed: server errors as they are, bad prompts as
        INVALID_ARGUMENT (the server would have said the same)."""
        if isinstance(exc, BitnetError):
            return cls(error=exc)
        return cls(error=BitnetError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)))

    def to_dict(self) -> dict:
        data = asdict(replace(self, error=None))
        data["error"] = self.error.to_dict() if self.error else None
        return data


@dataclass(frozen=True)
class Tokenized:
    token_ids: list[int]
    tokens: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ModelInfo:
    """What the server reports about its model and its own settings (see ModelInfo in the proto)."""

    model_path: str
    architecture: str
    parameter_count: int
    weight_format: str
    context_size: int
    vocab_size: int
    bos_token_id: int
    stop_token_ids: tuple[int, ...]
    kernel_path: str
    threads: int
    max_batch: int
    max_queue: int
    activation: str
    layers: int
    hidden_size: int
    has_chat_template: bool

    @classmethod
    def from_proto(cls, message: pb.ModelInfo) -> ModelInfo:
        values = {f.name: getattr(message, f.name) for f in fields(cls)}
        values["stop_token_ids"] = tuple(message.stop_token_ids)
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


def _logprob(message: pb.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(message.token_id, message.token, message.logprob)


def chunk_from_proto(message: pb.GenerateResponse) -> Chunk:
    last = message.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    usage = timings = None
    if message.HasField("usage"):
        usage = Usage(message.usage.prompt_tokens, message.usage.completion_tokens)
    if message.HasField("timings"):
        t = message.timings
        timings = Timings(
            t.queue_seconds, t.time_to_first_token_seconds, t.decode_tokens_per_second, t.total_seconds
        )
    return Chunk(
        text=message.text,
        token_ids=tuple(message.token_ids),
        logprobs=tuple(
            TokenLogprobs(_logprob(lp.chosen), tuple(_logprob(t) for t in lp.top)) for lp in message.logprobs
        ),
        finish_reason=FINISH_REASONS.get(message.finish_reason, "unknown") if last else None,
        usage=usage,
        timings=timings,
        request_id=message.request_id,
    )


class CompletionBuilder:
    """Accumulates chunks into a Completion (shared by the sync and async clients)."""

    def __init__(self) -> None:
        self._text: list[str] = []
        self._ids: list[int] = []
        self._logprobs: list[TokenLogprobs] = []
        self._last: Chunk | None = None

    def add(self, chunk: Chunk) -> None:
        self._text.append(chunk.text)
        self._ids.extend(chunk.token_ids)
        self._logprobs.extend(chunk.logprobs)
        self._last = chunk

    def extend(self, chunks: Iterable[Chunk]) -> CompletionBuilder:
        for chunk in chunks:
            self.add(chunk)
        return self

    def build(self) -> Completion:
        last = self._last
        return Completion(
            text="".join(self._text),
            token_ids=tuple(self._ids),
            logprobs=tuple(self._logprobs),
            finish_reason=last.finish_reason if last else None,
            usage=last.usage if last else None,
            timings=last.timings if last else None,
            request_id=last.request_id if last else "",
        )
