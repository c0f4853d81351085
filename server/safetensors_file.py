"""A memory-mapped reader of `.safetensors` files that also returns bfloat16 tensors.

Why not `safetensors.safe_open(..., framework="numpy")`: numpy has no bfloat16, so it refuses the bf16
norms and embeddings of the BitNet checkpoints. The format is an 8-byte header length, a JSON header
({name: {dtype, shape, data_offsets}}) and the raw little-endian data; reading it ourselves is short and
lets every bounds problem become a `ModelFileError` naming the file and tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import numpy as np

from .file_errors import ModelFileError
from .ternary_formats import bf16_to_f32

MAX_HEADER = 100_000_000  # the format's own limit on the JSON header
NUMPY_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "?",
    "BF16": "<u2",  # bit patterns; `float32()` widens them
}


@dataclass(frozen=True)
class SafetensorInfo:
    name: str
    dtype: str  # safetensors dtype string: "BF16", "U8", "F32", ...
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


class SafetensorsFile:
    """One `.safetensors` file: `tensors` (infos by name), `raw(name)` and `float32(name)` views."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        size = os.path.getsize(self.path)
        if size < 8:
            raise ModelFileError(f"{self.path}: truncated safetensors file ({size} bytes)")
        with open(self.path, "rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len > min(MAX_HEADER, size - 8):
                raise ModelFileError(
                    f"{self.path}: safetensors header claims {header_len} bytes, file has {size}: not a "
                    "safetensors file or truncated"
                )
            try:
                header = json.loads(fh.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ModelFileError(f"{self.path}: unreadable safetensors header: {exc}") from None
        if not isinstance(header, dict):
            raise ModelFileError(f"{self.path}: safetensors header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + header_len
        self.tensors: dict[str, SafetensorInfo] = {}
        for name, entry in header.items():
            try:
                dtype, shape = entry["dtype"], tuple(int(s) for s in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ModelFileError(
                    f"{self.path}: tensor {name}: malformed header entry {entry!r}"
                ) from None
            if dtype not in NUMPY_DTYPES:
                raise ModelFileError(f"{self.path}: tensor {name}: dtype {dtype} is not supported")
            expected = math.prod(shape) * np.dtype(NUMPY_DTYPES[dtype]).itemsize
            if end - begin != expected:
                raise ModelFileError(
                    f"{self.path}: tensor {name}: {end - begin} data bytes, expected {expected} for "
                    f"{dtype} {list(shape)}"
                )
            if data_start + end > size:
                raise ModelFileError(
                    f"{self.path}: tensor {name}: data ends at byte {data_start + end}, past the end of the "
                    f"file ({size} bytes): truncated file?"
                )
            self.tensors[name] = SafetensorInfo(name, dtype, shape, data_start + begin, data_start + end)
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r") if size > data_start else None

    def raw(self, name: str) -> np.ndarray:
        """The tensor as stored (BF16 as uint16 bit patterns), shaped, memory-mapped."""
        info = self.tensors[name]
        if info.end == info.begin or self._data is None:
            return np.zeros(info.shape, dtype=NUMPY_DTYPES[info.dtype])
        return self._data[info.begin : info.end].view(NUMPY_DTYPES[info.dtype]).reshape(info.shape)

    def float32(self, name: str) -> np.ndarray:
        """A float tensor widened to float32 (a new array)."""
        info = self.tensors[name]
        if info.dtype == "BF16":
            return bf16_to_f32(self.raw(name)).reshape(info.shape)
        if info.dtype not in ("F32", "F16", "F64"):
            raise ModelFileError(f"{self.path}: tensor {name}: dtype {info.dtype}, expected a float type")
        return np.array(self.raw(name), dtype=np.float32)
