"""Request checking for the gRPC layer: every bad field becomes one `InvalidField` naming it.

Also the request decoder. grpcio parses a request before the handler runs and answers a parse failure
with INTERNAL, which would blame the server for a client's invalid UTF-8. `tolerant_deserializer`
catches the protobuf DecodeError and hands the handler an `UndecodableRequest` naming the bad field,
found by walking the wire format, so the servicer can answer INVALID_ARGUMENT instead.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bitnet_grpc.server.sampling import InvalidParameter, SamplingParams
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

DEFAULT_MAX_TOKENS = 128
MAX_REQUEST_ID_CHARS = 128
CHAT_ROLES = ("system", "user", "assistant")


class InvalidField(ValueError):
    """A request field out of range; `field` is its path, e.g. `stop[2]` or `messages[0].role`."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class UndecodableRequest:
    """Stands in for a request grpcio could not parse; the handler turns it into INVALID_ARGUMENT."""

    error: InvalidField


def tolerant_deserializer(message_class: type[Message]) -> Callable[[bytes], Any]:
    """A request deserializer that never raises: bad bytes become an `UndecodableRequest`."""

    def deserialize(data: bytes) -> Message | UndecodableRequest:
        try:
            return message_class.FromString(data)
        except DecodeError:
            bad = _find_invalid_utf8(data, message_class.DESCRIPTOR, "")
            if bad is not None:
                return UndecodableRequest(InvalidField(bad, "is not valid UTF-8"))
            return UndecodableRequest(InvalidField("request", "is not a valid protobuf message"))

    return deserialize


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise DecodeError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _find_invalid_utf8(data: bytes, descriptor: Descriptor, prefix: str) -> str | None:
    """The path of the first string field whose bytes are not UTF-8, recursing into sub-messages."""
    seen: dict[int, int] = {}
    pos = 0
    try:
        while pos < len(data):
            key, pos = _read_varint(data, pos)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, pos = _read_varint(data, pos)
                continue
            if wire_type in (1, 5):
                pos += 8 if wire_type == 1 else 4
                continue
            if wire_type != 2:
                return None
            length, pos = _read_varint(data, pos)
            chunk, pos = data[pos : pos + length], pos + length
            fdesc = descriptor.fields_by_number.get(number)
            if fdesc is None:
                continue
            path = prefix + fdesc.name
            if fdesc.is_repeated:
                index = seen.get(number, 0)
                seen[number] = index + 1
                path += f"[{index}]"
            if fdesc.type == FieldDescriptor.TYPE_STRING:
                try:
                    chunk.decode("utf-8")
                except UnicodeDecodeError:
                    return path
            elif fdesc.type == FieldDescriptor.TYPE_MESSAGE:
                inner = _find_invalid_utf8(chunk, fdesc.message_type, path + ".")
                if inner is not None:
                    return inner
    except DecodeError:
        return None
    return None


@dataclass
class GenerationLimits:
    """What the loaded model and the server allow; the checks read nothing else."""

    vocab_size: int
    context_size: int
    has_chat_template: bool


@dataclass
class CheckedGenerate:
    """A GenerateRequest that passed every check: the prompt as token ids and the sampling settings."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


def check_sampling(request: Message) -> SamplingParams:
    """The sampling fields of a GenerateRequest with the API's defaults, range-checked by the engine's
    own `SamplingParams.validate` (so the API and the engine can never disagree on a range)."""
    optional = {
        name: getattr(request, name)
        for name in (
            "temperature",
            "top_k",
            "top_p",
            "min_p",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
            "seed",
            "logprobs",
        )
        if request.HasField(name)
    }
    params = SamplingParams(stop=list(request.stop), ignore_eos=bool(request.ignore_eos), **optional)
    try:
        return params.validate()
    except InvalidParameter as error:
        raise InvalidField(error.field, error.reason) from None


def check_request_id(request_id: str) -> str:
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidField("request_id", f"at most {MAX_REQUEST_ID_CHARS} characters")
    if any(not ch.isprintable() for ch in request_id):
        raise InvalidField("request_id", "must be printable text")
    return request_id or uuid.uuid4().hex


def check_token_ids(name: str, token_ids: Sequence[int], vocab_size: int) -> list[int]:
    for i, token in enumerate(token_ids):
        if token >= vocab_size:
            raise InvalidField(
                f"{name}[{i}]", f"token id {token} is not below the vocabulary size {vocab_size}"
            )
    return [int(t) for t in token_ids]


def check_messages(request: Message, has_chat_template: bool) -> list[dict[str, str]]:
    if not has_chat_template:
        raise InvalidField("messages", "this model has no chat template; send a prompt instead")
    out = []
    for i, message in enumerate(request.messages):
        if message.role not in CHAT_ROLES:
            raise InvalidField(f"messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}")
        out.append({"role": message.role, "content": message.content})
    return out


def prompt_source(request: Message) -> str:
    """Which of prompt, messages, prompt_token_ids the request uses; exactly one must be given."""
    given = [
        name
        for name, present in (
            ("prompt", bool(request.prompt)),
            ("messages", len(request.messages) > 0),
            ("prompt_token_ids", len(request.prompt_token_ids) > 0),
        )
        if present
    ]
    if not given:
        raise InvalidField("prompt", "one of prompt, messages or prompt_token_ids is required")
    if len(given) > 1:
        raise InvalidField(given[1], f"give only one of prompt, messages, prompt_token_ids (got {given})")
    return given[0]


def check_lengths(request: Message, source: str, prompt_len: int, context_size: int) -> int:
    """The max_tokens the request gets: checked against the context, the default clipped to it."""
    if prompt_len == 0:
        raise InvalidField(source, "encodes to no tokens")
    if prompt_len >= context_size:
        raise InvalidField(
            source, f"is {prompt_len} tokens; the context holds {context_size} (prompt plus at least one)"
        )
    room = context_size - prompt_len
    if not request.HasField("max_tokens"):
        return min(DEFAULT_MAX_TOKENS, room)
    if request.max_tokens < 1:
        raise InvalidField("max_tokens", "must be >= 1")
    if request.max_tokens > room:
        raise InvalidField(
            "max_tokens",
            f"{request.max_tokens} is beyond the context: {context_size} - {prompt_len} prompt tokens "
            f"leaves {room}",
        )
    return int(request.max_tokens)


def check_generate(
    request: Message,
    limits: GenerationLimits,
    encode_prompt: Callable[[str], list[int]],
    encode_chat: Callable[[list[dict[str, str]]], list[int]],
) -> CheckedGenerate:
    """Check every field of a GenerateRequest and tokenize its prompt (text, chat or ids)."""
    request_id = check_request_id(request.request_id)
    source = prompt_source(request)
    sampling = check_sampling(request)
    if source == "prompt":
        prompt_ids = encode_prompt(request.prompt)
    elif source == "messages":
        prompt_ids = encode_chat(check_messages(request, limits.has_chat_template))
    else:
        prompt_ids = check_token_ids("prompt_token_ids", request.prompt_token_ids, limits.vocab_size)
    sampling.max_tokens = check_lengths(request, source, len(prompt_ids), limits.context_size)
    return CheckedGenerate(request_id=request_id, prompt_ids=prompt_ids, params=sampling)
