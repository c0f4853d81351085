"""Our own reader of the GGUF container, memory-mapped.

Why not `gguf.GGUFReader`: it raises on tensor type 36 (bitnet.cpp's I2_S), which the official BitNet
2B4T file uses for all its projections. The container itself is simple (BITNET.md section 3): a header,
typed key/values, tensor infos, then aligned tensor data. Every read is bounds-checked, so a truncated
or corrupt file ends in a `ModelFileError` naming the file and what was wrong, never in garbage.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .file_errors import ModelFileError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # v2 and v3 share the little-endian layout; v1 used 32-bit counts
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS

# ggml type ids this project reads natively (BITNET.md section 3).
TYPE_F32, TYPE_F16, TYPE_BF16 = 0, 1, 30
TYPE_TQ1_0, TYPE_TQ2_0, TYPE_I2_S = 34, 35, 36
TERNARY_BLOCK = 256  # weights per TQ1_0 / TQ2_0 block
TQ1_0_BLOCK_BYTES = 54
TQ2_0_BLOCK_BYTES = 66
I2_S_BLOCK = 128  # weights per I2_S block (32 bytes)
I2_S_TRAILER = 32  # bytes after the codes: an f32 scale, then padding

NATIVE_TYPE_NAMES = {
    TYPE_F32: "F32",
    TYPE_F16: "F16",
    TYPE_BF16: "BF16",
    TYPE_TQ1_0: "TQ1_0",
    TYPE_TQ2_0: "TQ2_0",
    TYPE_I2_S: "I2_S",
}
# bitnet.cpp's lookup-table layouts: tied to shape-specific generated kernels, so we refuse them.
# (Upstream ggml later reused 39 for MXFP4; in a BitNet file it is TL2.)
REFUSED_TYPE_NAMES = {37: "I8_S (bitnet.cpp activations)", 38: "TL1 (bitnet.cpp)", 39: "TL2 (bitnet.cpp)"}


class ValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


SCALAR_FORMATS = {
    ValueType.UINT8: "<B",
    ValueType.INT8: "<b",
    ValueType.UINT16: "<H",
    ValueType.INT16: "<h",
    ValueType.UINT32: "<I",
    ValueType.INT32: "<i",
    ValueType.FLOAT32: "<f",
    ValueType.BOOL: "<?",
    ValueType.UINT64: "<Q",
    ValueType.INT64: "<q",
    ValueType.FLOAT64: "<d",
}
SCALAR_DTYPES = {vt: np.dtype(fmt) for vt, fmt in SCALAR_FORMATS.items()}


def type_name(type_id: int) -> str:
    """A readable name for a ggml type id, including ones we refuse."""
    if type_id in NATIVE_TYPE_NAMES:
        return NATIVE_TYPE_NAMES[type_id]
    if type_id in REFUSED_TYPE_NAMES:
        return REFUSED_TYPE_NAMES[type_id]
    try:
        return gguf.GGMLQuantizationType(type_id).name
    except ValueError:
        return f"unknown type {type_id}"


def tensor_nbytes(type_id: int, n_elements: int) -> int:
    """Bytes a tensor of `n_elements` occupies; ValueError when the count does not fit the type's blocks."""
    if type_id == TYPE_F32:
        return 4 * n_elements
    if type_id in (TYPE_F16, TYPE_BF16):
        return 2 * n_elements
    if type_id == TYPE_I2_S:
        if n_elements % I2_S_BLOCK:
            raise ValueError(f"I2_S needs a multiple of {I2_S_BLOCK} weights, got {n_elements}")
        return n_elements // 4 + I2_S_TRAILER
    if type_id in REFUSED_TYPE_NAMES:
        raise ValueError(f"size of {type_name(type_id)} tensors is layout specific")
    try:
        block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        raise ValueError(f"unknown ggml type id {type_id}") from None
    if n_elements % block:
        raise ValueError(f"{type_name(type_id)} needs a multiple of {block} weights, got {n_elements}")
    return n_elements // block * block_bytes


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where a tensor lives. `shape` is numpy order (GGUF's ne reversed: the last axis is contiguous)."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int  # absolute byte offset in the file
    nbytes: int | None  # None when the type is unknown or refused (then it cannot be read)

    @property
    def type_name(self) -> str:
        return type_name(self.type_id)

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


class _Cursor:
    """Bounds-checked little-endian reads over the mapped file."""

    def __init__(self, data: np.ndarray, path: str) -> None:
        self.data = data
        self.view = memoryview(data)  # cheap slices for the many short strings of a vocabulary
        self.size = int(data.shape[0])
        self.pos = 0
        self.path = path

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise ModelFileError(
                f"{self.path}: truncated GGUF file: {what} needs {n} bytes at offset {self.pos}, "
                f"file has {self.size} bytes"
            )

    def scalar(self, vtype: ValueType, what: str) -> Any:
        fmt = SCALAR_FORMATS[vtype]
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        if vtype == ValueType.FLOAT32:
            # the shortest decimal that is this float32 (1e-05, not 9.999999747378752e-06): same f32 value
            return float(str(np.float32(value)))
        return value

    def u32(self, what: str) -> int:
        return self.scalar(ValueType.UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(ValueType.UINT64, what)

    def string(self, what: str) -> str:
        length = self.u64(f"length of {what}")
        self.need(length, what)
        raw = self.view[self.pos : self.pos + length]
        self.pos += length
        # surrogateescape keeps odd bytes (some vocabularies have them) and round-trips through our writer
        return str(raw, "utf-8", "surrogateescape")

    def value(self, vtype: int, what: str) -> Any:
        try:
            vt = ValueType(vtype)
        except ValueError:
            raise ModelFileError(f"{self.path}: {what}: unknown GGUF value type {vtype}") from None
        if vt == ValueType.STRING:
            return self.string(what)
        if vt == ValueType.ARRAY:
            return self.array(what)
        return self.scalar(vt, what)

    def array(self, what: str) -> list[Any]:
        item_type = self.u32(f"item type of {what}")
        count = self.u64(f"item count of {what}")
        try:
            vt = ValueType(item_type)
        except ValueError:
            raise ModelFileError(f"{self.path}: {what}: unknown GGUF array item type {item_type}") from None
        if vt in SCALAR_DTYPES:
            dtype = SCALAR_DTYPES[vt]
            self.need(count * dtype.itemsize, f"{count} items of {what}")
            items = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.pos)
            self.pos += count * dtype.itemsize
            return items.tolist()
        # Strings take at least 8 bytes each: refuse absurd counts before looping over them.
        self.need(count * 8, f"{count} items of {what}")
        if vt == ValueType.STRING:
            return self.strings(count, what)
        return [self.value(vt, f"{what}[{i}]") for i in range(count)]

    def strings(self, count: int, what: str) -> list[str]:
        """A string array in one tight loop: vocabularies hold hundreds of thousands of them."""
        view, size, pos = self.view, self.size, self.pos
        unpack_length = struct.Struct("<Q").unpack_from
        out = []
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, f"length of {what}[{i}]")
            (length,) = unpack_length(view, pos)
            pos += 8
            if pos + length > size:
                self.pos = pos
                self.need(length, f"{what}[{i}]")
            out.append(str(view[pos : pos + length], "utf-8", "surrogateescape"))
            pos += length
        self.pos = pos
        return out


class GGUFFile:
    """A parsed GGUF file: `metadata` (plain Python values), `tensors` (infos by name) and raw tensor bytes.

    Tensor data stays memory-mapped: `tensor_bytes` returns a read-only view, nothing is copied until a
    decoder turns it into codes or floats.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise ModelFileError(f"{self.path}: no such file")
        self.file_size = os.path.getsize(self.path)
        if self.file_size < 24:
            raise ModelFileError(
                f"{self.path}: truncated GGUF file: {self.file_size} bytes, the header alone takes 24"
            )
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        cur = _Cursor(self._data, self.path)
        magic = bytes(self._data[:4])
        if magic != GGUF_MAGIC:
            raise ModelFileError(f"{self.path}: not a GGUF file: magic {magic!r}, expected {GGUF_MAGIC!r}")
        cur.pos = 4
        self.version = cur.u32("version")
        if self.version not in SUPPORTED_VERSIONS:
            hint = " (a big-endian file?)" if self.version & 0xFFFF == 0 else ""
            raise ModelFileError(
                f"{self.path}: GGUF version {self.version}{hint}, expected one of {SUPPORTED_VERSIONS}"
            )
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("key/value count")
        # Each key/value takes at least 12 bytes and each tensor info at least 24: bound the counts.
        cur.need(n_kv * 12 + n_tensors * 24, f"{n_kv} key/values and {n_tensors} tensor infos")

        self.metadata: dict[str, Any] = {}
        self.value_types: dict[str, int] = {}
        for i in range(n_kv):
            key = cur.string(f"key #{i}")
            vtype = cur.u32(f"value type of {key}")
            if key in self.metadata:
                raise ModelFileError(f"{self.path}: duplicate metadata key {key!r}")
            self.metadata[key] = cur.value(vtype, key)
            self.value_types[key] = vtype

        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ModelFileError(
                f"{self.path}: general.alignment is {alignment!r}, expected a positive power of two"
            )
        self.alignment = alignment

        raw_infos = []
        for i in range(n_tensors):
            name = cur.string(f"name of tensor #{i}")
            n_dims = cur.u32(f"dimension count of {name}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise ModelFileError(
                    f"{self.path}: tensor {name}: {n_dims} dimensions, expected 1 to {MAX_DIMS}"
                )
            ne = [cur.u64(f"dimension {d} of {name}") for d in range(n_dims)]
            type_id = cur.u32(f"type of {name}")
            offset = cur.u64(f"data offset of {name}")
            raw_infos.append((name, ne, type_id, offset))

        self.data_offset = -(-cur.pos // alignment) * alignment
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, ne, type_id, offset in raw_infos:
            if name in self.tensors:
                raise ModelFileError(f"{self.path}: duplicate tensor name {name!r}")
            self.tensors[name] = self._check_info(name, ne, type_id, offset)

    def _check_info(self, name: str, ne: list[int], type_id: int, offset: int) -> GGUFTensorInfo:
        shape = tuple(reversed(ne))
        if offset % self.alignment:
            raise ModelFileError(
                f"{self.path}: tensor {name}: data offset {offset} is not a multiple of the "
                f"alignment {self.alignment}"
            )
        nbytes: int | None
        try:
            nbytes = tensor_nbytes(type_id, math.prod(shape))
        except ValueError as exc:
            known = type_id in NATIVE_TYPE_NAMES or type_id in gguf.GGML_QUANT_SIZES
            if known and type_id not in REFUSED_TYPE_NAMES:
                raise ModelFileError(f"{self.path}: tensor {name}: bad shape {list(shape)}: {exc}") from None
            nbytes = None  # unknown or refused type: reported when someone reads the tensor
        start = self.data_offset + offset
        if nbytes is not None and type_id == TYPE_I2_S and start + nbytes > self.file_size:
            # Only the codes and the f32 scale are read; a last tensor may lack the trailing padding.
            nbytes = max(nbytes - (I2_S_TRAILER - 4), self.file_size - start)
        if nbytes is not None and start + nbytes > self.file_size:
            raise ModelFileError(
                f"{self.path}: tensor {name}: data ends at byte {start + nbytes}, past the end of the file "
                f"({self.file_size} bytes): truncated file?"
            )
        return GGUFTensorInfo(name=name, shape=shape, type_id=type_id, offset=start, nbytes=nbytes)

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def tensor_info(self, name: str) -> GGUFTensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelFileError(f"{self.path}: missing tensor {name}") from None

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The raw stored bytes of a tensor (a read-only view into the mapped file)."""
        info = self.tensor_info(name)
        if info.nbytes is None:
            raise ModelFileError(
                f"{self.path}: tensor {name}: type {info.type_name} (id {info.type_id}) is not supported"
            )
        return self._data[info.offset : info.offset + info.nbytes]


def read_metadata(path: str | os.PathLike[str] | Path) -> dict[str, Any]:
    """The key/value metadata of a GGUF file as plain Python values (str, int, float, bool, lists)."""
    return dict(GGUFFile(path).metadata)
