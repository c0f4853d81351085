"""The blocking Python client: one channel, the generated stubs, plain results and one error type."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
from bitnet_grpc.client.base import UNSET, ClientBase
from bitnet_grpc.client.errors import BitnetError, from_rpc_error
from bitnet_grpc.client.params import (
    GenerationParams,
    Message,
    Prompt,
    chat_request,
    check_token_ids,
    prompt_request,
)
from bitnet_grpc.client.results import (
    Chunk,
    Completion,
    CompletionBuilder,
    ModelInfo,
    Tokenized,
    chunk_from_proto,
)
from bitnet_grpc.proto import generation_pb2 as pb
from grpc_health.v1 import health_pb2


class Client(ClientBase):
    """Blocking client for bitnet.v1.TextGeneration; settings are ClientBase's. Every failed call
    raises BitnetError; parameters out of range raise ValueError before anything is sent."""

    def _open_channel(self, address: str, credentials, options: list) -> grpc.Channel:
        if credentials is None:
            return grpc.insecure_channel(address, options=options)
        return grpc.secure_channel(address, credentials, options=options)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _unary(self, method, request, timeout: object):
        try:
            return method(request, **self._call_options(timeout))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    # -- generation -------------------------------------------------------------------------------------

    def _stream(self, request: pb.GenerateRequest, timeout: object) -> Iterator[Chunk]:
        call = self._stub.Generate(request, **self._call_options(timeout))
        return self._iterate(call)

    @staticmethod
    def _iterate(call) -> Iterator[Chunk]:
        try:
            for message in call:
                yield chunk_from_proto(message)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()  # frees the server's slot when the caller stops early; no-op once finished

    def generate(self, prompt: Prompt, *, timeout: object = UNSET, **params) -> Iterator[Chunk]:
        """Stream the continuation of `prompt` (text or token ids); the last chunk has finish_reason,
        usage and timings. Parameters are the GenerateRequest fields (max_tokens, temperature, ...)."""
        return self._stream(prompt_request(prompt, GenerationParams(**params)), timeout)

    def complete(self, prompt: Prompt, *, timeout: object = UNSET, **params) -> Completion:
        """The whole continuation of `prompt` at once."""
        return CompletionBuilder().extend(self.generate(prompt, timeout=timeout, **params)).build()

    def chat_stream(
        self, messages: Iterable[Message], *, timeout: object = UNSET, **params
    ) -> Iterator[Chunk]:
        """Stream the assistant's reply to a conversation (rendered with the model's chat template)."""
        return self._stream(chat_request(messages, GenerationParams(**params)), timeout)

    def chat(self, messages: Iterable[Message], *, timeout: object = UNSET, **params) -> Completion:
        """The assistant's whole reply to a conversation of {"role", "content"} messages."""
        return CompletionBuilder().extend(self.chat_stream(messages, timeout=timeout, **params)).build()

    def generate_batch(
        self, prompts: Sequence[Prompt], *, max_concurrency: int = 4, timeout: object = UNSET, **params
    ) -> list[Completion]:
        """Complete every prompt, at most `max_concurrency` calls at once over this client's channel.

        Results come in input order; a prompt that fails gets a Completion with `error` set and the
        others are unaffected. Invalid shared parameters raise ValueError before anything is sent.
        """
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ValueError(f"max_concurrency must be a positive integer, got {max_concurrency!r}")
        shared = GenerationParams(**params)

        def one(prompt: Prompt) -> Completion:
            try:
                request = prompt_request(prompt, shared)
                return CompletionBuilder().extend(self._stream(request, timeout)).build()
            except (BitnetError, ValueError) as exc:
                return Completion.failed(exc)

        prompts = list(prompts)
        if not prompts:
            return []
        with ThreadPoolExecutor(max_workers=min(max_concurrency, len(prompts))) as pool:
            return list(pool.map(one, prompts))

    # -- tokens and model -------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special_tokens: bool = True, timeout: object = UNSET) -> Tokenized:
        if not isinstance(text, str):
            raise ValueError(f"text must be a string, got {type(text).__name__}")
        request = pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        reply = self._unary(self._stub.Tokenize, request, timeout)
        return Tokenized(list(reply.token_ids), list(reply.tokens))

    def detokenize(self, token_ids: Sequence[int], *, timeout: object = UNSET) -> str:
        ids = check_token_ids(token_ids)
        return self._unary(self._stub.Detokenize, pb.DetokenizeRequest(token_ids=ids), timeout).text

    def model_info(self, *, timeout: object = UNSET) -> ModelInfo:
        return ModelInfo.from_proto(self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout))

    def health(self, service: str = "", *, timeout: object = UNSET) -> str:
        """The grpc.health.v1 status name ("SERVING", "NOT_SERVING", ...) of the server or one service."""
        reply = self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
