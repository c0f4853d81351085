"""Python client for the bitnet.v1 gRPC API. Depends only on the generated stubs, never on the server.

from bitnet_grpc.client import Client

with Client("127.0.0.1:50051") as client:
    for chunk in client.generate("Once upon a time", max_tokens=32):
        print(chunk.text, end="", flush=True)
"""

from bitnet_grpc.client.async_client import AsyncClient
from bitnet_grpc.client.errors import BitnetError
from bitnet_grpc.client.params import GenerationParams
from bitnet_grpc.client.results import (
    Chunk,
    Completion,
    ModelInfo,
    Timings,
    Tokenized,
    TokenLogprob,
    TokenLogprobs,
    Usage,
)
from bitnet_grpc.client.sync_client import Client

__all__ = [
    "AsyncClient",
    "BitnetError",
    "Chunk",
    "Client",
    "Completion",
    "GenerationParams",
    "ModelInfo",
    "Timings",
    "TokenLogprob",
    "TokenLogprobs",
    "Tokenized",
    "Usage",
]
