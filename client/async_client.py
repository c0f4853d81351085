"""The asyncio client on grpc.aio: the same methods as Client, generation as an async iterator."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence

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


async def _collect(chunks: AsyncIterator[Chunk]) -> Completion:
    builder = CompletionBuilder()
    async for chunk in chunks:
        builder.add(chunk)
    return builder.build()


class AsyncClient(ClientBase):
    """asyncio client on grpc.aio with Client's methods; settings are ClientBase's. Use `async with`
    (or await close()); create it inside the event loop that will use it."""

    def _open_channel(self, address: str, credentials, options: list) -> grpc.aio.Channel:
        if credentials is None:
            return grpc.aio.insecure_channel(address, options=options)
        return grpc.aio.secure_channel(address, credentials, options=options)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def _unary(self, method, request, timeout: object):
        try:
            return await method(request, **self._call_options(timeout))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    # -- generation -------------------------------------------------------------------------------------

    async def _stream(self, request: pb.GenerateRequest, timeout: object) -> AsyncIterator[Chunk]:
        call = self._stub.Generate(request, **self._call_options(timeout))
        try:
            async for message in call:
                yield chunk_from_proto(message)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()  # frees the server's slot when the caller stops early; no-op once finished

    def generate(self, prompt: Prompt, *, timeout: object = UNSET, **params) -> AsyncIterator[Chunk]:
        """`async for chunk in client.generate(...)`; parameters are checked before anything is sent."""
        return self._stream(prompt_request(prompt, GenerationParams(**params)), timeout)

    async def complete(self, prompt: Prompt, *, timeout: object = UNSET, **params) -> Completion:
        return await _collect(self.generate(prompt, timeout=timeout, **params))

    def chat_stream(
        self, messages: Iterable[Message], *, timeout: object = UNSET, **params
    ) -> AsyncIterator[Chunk]:
        return self._stream(chat_request(messages, GenerationParams(**params)), timeout)

    async def chat(self, messages: Iterable[Message], *, timeout: object = UNSET, **params) -> Completion:
        return await _collect(self.chat_stream(messages, timeout=timeout, **params))

    async def generate_batch(
        self, prompts: Sequence[Prompt], *, max_concurrency: int = 4, timeout: object = UNSET, **params
    ) -> list[Completion]:
        """As Client.generate_batch: input order, at most `max_concurrency` calls in flight."""
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ValueError(f"max_concurrency must be a positive integer, got {max_concurrency!r}")
        shared = GenerationParams(**params)
        gate = asyncio.Semaphore(max_concurrency)

        async def one(prompt: Prompt) -> Completion:
            async with gate:
                try:
                    return await _collect(self._stream(prompt_request(prompt, shared), timeout))
                except (BitnetError, ValueError) as exc:
                    return Completion.failed(exc)

        return list(await asyncio.gather(*(one(p) for p in prompts)))

    # -- tokens and model -------------------------------------------------------------------------------

    async def tokenize(
        self, text: str, *, add_special_tokens: bool = True, timeout: object = UNSET
    ) -> Tokenized:
        if not isinstance(text, str):
            raise ValueError(f"text must be a string, got {type(text).__name__}")
        request = pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        reply = await self._unary(self._stub.Tokenize, request, timeout)
        return Tokenized(list(reply.token_ids), list(reply.tokens))

    async def detokenize(self, token_ids: Sequence[int], *, timeout: object = UNSET) -> str:
        ids = check_token_ids(token_ids)
        return (await self._unary(self._stub.Detokenize, pb.DetokenizeRequest(token_ids=ids), timeout)).text

    async def model_info(self, *, timeout: object = UNSET) -> ModelInfo:
        reply = await self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)
        return ModelInfo.from_proto(reply)

    async def health(self, service: str = "", *, timeout: object = UNSET) -> str:
        reply = await self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
