"""Sampling parameters checked on the client, and the GenerateRequest built from them.

The server validates everything again; the checks here only catch what is cheap to know locally so a
typo fails at once, with a ValueError naming the field, instead of after a network round trip. Limits
follow the comments in protos/bitnet/v1/generation.proto.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from bitnet_grpc.proto import generation_pb2 as pb

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
MAX_STOP_STRINGS = 16
MAX_STOP_BYTES = 256
MAX_LOGPROBS = 20
MAX_REQUEST_ID_CHARS = 128
CHAT_ROLES = ("system", "user", "assistant")

# A prompt is text or a list of token ids (sent as they are, no BOS added).
Prompt = str | Sequence[int]
# A chat message is a mapping with "role" and "content", or a (role, content) pair.
Message = Mapping[str, str] | tuple[str, str]


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


@dataclass(frozen=True)
class GenerationParams:
    """The request's sampling fields; None leaves a field unset so the server's default applies."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: Sequence[str] | str | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    request_id: str = ""

    def __post_init__(self) -> None:
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 1, UINT32_MAX)
        if self.temperature is not None and _check_float("temperature", self.temperature) < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None:
            _check_int("top_k", self.top_k, 0, UINT32_MAX)
        if self.top_p is not None and not 0 < _check_float("top_p", self.top_p) <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= _check_float("min_p", self.min_p) <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if (
            self.repetition_penalty is not None
            and _check_float("repetition_penalty", self.repetition_penalty) <= 0
        ):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value is not None and not -2 <= _check_float(name, value) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        if self.seed is not None:
            _check_int("seed", self.seed, 0, UINT64_MAX)
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}")
        for s in stops:
            if not isinstance(s, str) or not 1 <= len(s.encode("utf-8")) <= MAX_STOP_BYTES:
                raise ValueError(f"stop strings must be 1..{MAX_STOP_BYTES} bytes of text, got {s!r}")
        object.__setattr__(self, "stop", tuple(stops))
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        if not isinstance(self.request_id, str):
            raise ValueError(f"request_id must be a string, got {self.request_id!r}")
        if len(self.request_id) > MAX_REQUEST_ID_CHARS or not self.request_id.isprintable():
            raise ValueError(f"request_id must be at most {MAX_REQUEST_ID_CHARS} printable characters")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def fill(self, request: pb.GenerateRequest) -> pb.GenerateRequest:
        """Copy the set fields into `request` (unset optionals stay unset on the wire)."""
        for name in self.names():
            value = getattr(self, name)
            if name == "stop":
                request.stop.extend(value)
            elif value is not None:
                setattr(request, name, value)
        return request


def check_token_ids(token_ids: Iterable[int], name: str = "token_ids") -> list[int]:
    ids = list(token_ids)
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token <= UINT32_MAX:
            raise ValueError(f"{name} must be integers in [0, {UINT32_MAX}], got {token!r}")
    return ids


def prompt_request(prompt: Prompt, params: GenerationParams) -> pb.GenerateRequest:
    """A GenerateRequest for raw text or for token ids."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt must not be empty")
        return params.fill(pb.GenerateRequest(prompt=prompt))
    if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, Iterable):
        raise ValueError(f"prompt must be text or a sequence of token ids, got {type(prompt).__name__}")
    ids = check_token_ids(prompt, "prompt token ids")
    if not ids:
        raise ValueError("prompt token ids must not be empty")
    return params.fill(pb.GenerateRequest(prompt_token_ids=ids))


def chat_messages(messages: Iterable[Message]) -> list[pb.ChatMessage]:
    """ChatMessage protos from dicts or (role, content) pairs, roles checked."""
    result = []
    for i, message in enumerate(messages):
        if isinstance(message, Mapping):
            role, content = message.get("role"), message.get("content")
        elif isinstance(message, pb.ChatMessage):
            role, content = message.role, message.content
        else:
            try:
                role, content = message
            except (TypeError, ValueError):
                raise ValueError(f"messages[{i}] must be a mapping or a (role, content) pair") from None
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string, got {content!r}")
        result.append(pb.ChatMessage(role=role, content=content))
    if not result:
        raise ValueError("messages must not be empty")
    return result


def chat_request(messages: Iterable[Message], params: GenerationParams) -> pb.GenerateRequest:
    return params.fill(pb.GenerateRequest(messages=chat_messages(messages)))
