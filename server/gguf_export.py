"""ModelWeights -> a GGUF file, with ternary projections as I2_S, TQ2_0, TQ1_0, F16 or F32.

Why our own container writer: `gguf.GGUFWriter` only accepts the tensor types of its enum, and I2_S
(bitnet.cpp's type 36) is not one of them. The container is short to write (BITNET.md section 3) and a
single writer keeps every output type on one path; tests check its files with `gguf.GGUFReader` (for
the types it knows) and ours. Block encodings come from `ternary_formats`, whose TQ encoders produce
the same bytes as `gguf.quants` on codes * scale.

Tensor data is produced one tensor at a time while writing, so converting a 2B model never holds two
copies of its weights.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from . import ternary_formats as tf
from .gguf_file import (
    DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    SCALAR_FORMATS,
    TYPE_F16,
    TYPE_F32,
    TYPE_I2_S,
    TYPE_TQ1_0,
    TYPE_TQ2_0,
    ValueType,
    tensor_nbytes,
)
from .weights import LAYER_NORMS, TERNARY_PROJECTIONS, ModelWeights, TernaryTensor, TokenizerSpec

WEIGHT_TYPES = {"i2_s": TYPE_I2_S, "tq2_0": TYPE_TQ2_0, "tq1_0": TYPE_TQ1_0, "f16": TYPE_F16, "f32": TYPE_F32}
EMBED_TYPES = {"f16": TYPE_F16, "f32": TYPE_F32}
# general.file_type values llama.cpp shows (LlamaFileType); bitnet.cpp's I2_S number is not upstream.
FILE_TYPES = {
    "f32": int(gguf.LlamaFileType.ALL_F32),
    "f16": int(gguf.LlamaFileType.MOSTLY_F16),
    "tq1_0": int(gguf.LlamaFileType.MOSTLY_TQ1_0),
    "tq2_0": int(gguf.LlamaFileType.MOSTLY_TQ2_0),
}
TOKEN_BYTE = 6  # llama.cpp token type of SentencePiece byte-fallback pieces


@dataclass
class _TensorEntry:
    name: str
    shape: tuple[int, ...]  # numpy order
    type_id: int
    nbytes: int
    produce: Callable[[], np.ndarray]


class GGUFContainerWriter:
    """Typed key/values and tensors -> a GGUF v3 file (little-endian, aligned tensor data)."""

    def __init__(self, alignment: int = DEFAULT_ALIGNMENT) -> None:
        self.alignment = alignment
        self.kv: list[tuple[str, ValueType, Any, ValueType | None]] = []
        self.tensors: list[_TensorEntry] = []
        if alignment != DEFAULT_ALIGNMENT:
            self.add("general.alignment", alignment, ValueType.UINT32)

    def add(
        self, key: str, value: Any, vtype: ValueType | None = None, item_type: ValueType | None = None
    ) -> None:
        """Add a key; the type follows llama.cpp's expectations unless given (ints are UINT32)."""
        if any(k == key for k, *_ in self.kv):
            raise ValueError(f"duplicate metadata key {key}")
        if isinstance(value, (list, tuple)):
            vtype = ValueType.ARRAY
            item_type = item_type or _infer_type(value[0] if value else "")
            value = list(value)
        elif vtype is None:
            vtype = _infer_type(value)
        self.kv.append((key, vtype, value, item_type))

    def add_tensor(
        self, name: str, shape: Sequence[int], type_id: int, produce: Callable[[], np.ndarray]
    ) -> None:
        shape = tuple(int(s) for s in shape)
        nbytes = tensor_nbytes(type_id, int(np.prod(shape)))
        self.tensors.append(_TensorEntry(name, shape, type_id, nbytes, produce))

    def write(self, path: str | os.PathLike[str]) -> int:
        """Write atomically (a temporary file renamed into place); return the file size."""
        path = Path(path)
        tmp = path.with_name(path.name + ".part")
        try:
            with open(tmp, "wb") as out:
                self._write_to(out)
                size = out.tell()
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return size

    def _write_to(self, out) -> None:
        head = bytearray(GGUF_MAGIC)
        head += struct.pack("<IQQ", 3, len(self.tensors), len(self.kv))
        for key, vtype, value, item_type in self.kv:
            head += _pack_string(key) + struct.pack("<I", vtype)
            head += _pack_value(vtype, value, item_type)
        offset = 0
        offsets = []
        for t in self.tensors:
            head += _pack_string(t.name) + struct.pack("<I", len(t.shape))
            head += struct.pack(f"<{len(t.shape)}Q", *reversed(t.shape))  # GGUF lists ne0 (innermost) first
            head += struct.pack("<IQ", t.type_id, offset)
            offsets.append(offset)
            offset += _align(t.nbytes, self.alignment)
        head += bytes(_align(len(head), self.alignment) - len(head))
        out.write(head)
        for t in self.tensors:
            data = np.ascontiguousarray(t.produce()).reshape(-1).view(np.uint8)
            if data.nbytes != t.nbytes:
                raise ValueError(f"tensor {t.name}: produced {data.nbytes} bytes, expected {t.nbytes}")
            out.write(data.tobytes())
            out.write(bytes(_align(t.nbytes, self.alignment) - t.nbytes))


def _align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def _infer_type(value: Any) -> ValueType:
    if isinstance(value, bool):
        return ValueType.BOOL
    if isinstance(value, int):
        return ValueType.UINT32 if 0 <= value < 2**32 else ValueType.INT64
    if isinstance(value, float):
        return ValueType.FLOAT32
    if isinstance(value, str):
        return ValueType.STRING
    raise TypeError(f"cannot store {type(value).__name__} in GGUF metadata")


def _pack_string(text: str) -> bytes:
    raw = text.encode("utf-8", errors="surrogateescape")
    return struct.pack("<Q", len(raw)) + raw


def _pack_value(vtype: ValueType, value: Any, item_type: ValueType | None) -> bytes:
    if vtype == ValueType.STRING:
        return _pack_string(value)
    if vtype == ValueType.ARRAY:
        assert item_type is not None
        head = struct.pack("<IQ", item_type, len(value))
        if item_type == ValueType.STRING:
            return head + b"".join(_pack_string(v) for v in value)
        return head + np.asarray(value, dtype=SCALAR_FORMATS[item_type]).tobytes()
    return struct.pack(SCALAR_FORMATS[vtype], value)


# ------------------------------------------------------------------------------------------ content


def _ternary_producer(t: TernaryTensor, weight_type: str) -> Callable[[], np.ndarray]:
    def produce() -> np.ndarray:
        if weight_type == "i2_s":
            return tf.encode_i2s(t.codes, t.scale)
        if weight_type == "tq2_0":
            return tf.encode_tq2_0(t.codes, t.scale)
        if weight_type == "tq1_0":
            return tf.encode_tq1_0(t.codes, t.scale)
        dtype = np.float16 if weight_type == "f16" else np.float32
        return t.codes.astype(dtype) * dtype(t.scale)

    return produce


def _check_storable(name: str, t: TernaryTensor, weight_type: str) -> None:
    out_f, in_f = t.shape
    if weight_type in ("tq2_0", "tq1_0") and in_f % tf.TQ_BLOCK:
        raise ValueError(
            f"{name} [{out_f}, {in_f}]: {weight_type.upper()} needs rows of a multiple of {tf.TQ_BLOCK} "
            "weights; use --type i2_s or f32"
        )
    if weight_type == "i2_s" and (out_f * in_f) % tf.I2_S_BLOCK:
        raise ValueError(f"{name} [{out_f}, {in_f}]: I2_S needs a multiple of {tf.I2_S_BLOCK} weights")
    if weight_type in ("tq2_0", "tq1_0", "f16"):
        half = float(np.float16(t.scale))
        if (half == 0.0 and t.scale != 0.0) or not np.isfinite(half):
            raise ValueError(f"{name}: scale {t.scale:g} does not fit the f16 of {weight_type.upper()}")


def tokenizer_metadata(spec: TokenizerSpec) -> tuple[dict[str, Any], list[str]]:
    """GGUF `tokenizer.*` keys for a spec, and notes about what had to be decided."""
    notes: list[str] = []
    kind = spec.kind
    if kind == "hf-json":
        if not spec.tokens or not spec.merges:
            raise ValueError("tokenizer.json is not a BPE vocabulary with merges: cannot write it to GGUF")
        if TOKEN_BYTE in spec.token_types:
            raise ValueError(
                "tokenizer.json is a SentencePiece-style BPE (byte fallback): cannot write it to GGUF yet"
            )
        kind = "gpt2"
    if kind not in ("gpt2", "llama") or not spec.tokens:
        raise ValueError(f"tokenizer kind {spec.kind!r} without tokens cannot be written to GGUF")
    meta: dict[str, Any] = {"tokenizer.ggml.model": kind, "tokenizer.ggml.tokens": list(spec.tokens)}
    if kind == "gpt2":
        pre = spec.pre
        if not pre:
            pre = "default"
            notes.append("tokenizer: no pre-tokenizer name known; wrote tokenizer.ggml.pre = 'default'")
        meta["tokenizer.ggml.pre"] = pre
        meta["tokenizer.ggml.merges"] = list(spec.merges)
    if spec.token_types:
        meta["tokenizer.ggml.token_type"] = [int(t) for t in spec.token_types]
    if spec.scores:
        meta["tokenizer.ggml.scores"] = [float(s) for s in spec.scores]
    if spec.bos_id is not None:
        meta["tokenizer.ggml.bos_token_id"] = int(spec.bos_id)
    if spec.eos_id is not None:
        meta["tokenizer.ggml.eos_token_id"] = int(spec.eos_id)
    end_of_turn = [i for i in spec.stop_ids if i != spec.eos_id]
    if end_of_turn:
        meta["tokenizer.ggml.eot_token_id"] = int(end_of_turn[0])
    meta["tokenizer.ggml.add_bos_token"] = bool(spec.add_bos)
    if spec.chat_template:
        meta["tokenizer.chat_template"] = spec.chat_template
    return meta, notes


def _pad_vocabulary(meta: dict[str, Any], vocab_size: int, notes: list[str]) -> None:
    """llama.cpp wants one token per embedding row: pad a shorter vocabulary with unused tokens."""
    n = len(meta["tokenizer.ggml.tokens"])
    if n > vocab_size:
        raise ValueError(f"tokenizer has {n} tokens but the embedding only {vocab_size} rows")
    if n < vocab_size:
        extra = vocab_size - n
        meta["tokenizer.ggml.tokens"] += [f"[PAD{i}]" for i in range(n, vocab_size)]
        if "tokenizer.ggml.token_type" in meta:
            meta["tokenizer.ggml.token_type"] += [5] * extra  # UNUSED
        if "tokenizer.ggml.scores" in meta:
            meta["tokenizer.ggml.scores"] += [-1e9] * extra
        notes.append(f"tokenizer: padded the vocabulary with {extra} unused tokens to {vocab_size} rows")


def write_gguf(
    weights: ModelWeights,
    path: str | os.PathLike[str],
    weight_type: str = "i2_s",
    *,
    embed_type: str | None = None,
    arch: str | None = None,
    name: str | None = None,
) -> list[str]:
    """Write `weights` as GGUF; return notes about choices made (f16 scales, padding, ...).

    `weight_type` stores the projections; `embed_type` ("f16"/"f32") the token embedding and an untied
    output (default: f32 for an f32 file, else f16 like the official file); norms are always F32.
    """
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight type {weight_type!r}: expected one of {', '.join(WEIGHT_TYPES)}")
    embed_type = embed_type or ("f32" if weight_type == "f32" else "f16")
    if embed_type not in EMBED_TYPES:
        raise ValueError(f"embedding type {embed_type!r}: expected f16 or f32")
    cfg = weights.config
    arch = arch or cfg.arch
    notes: list[str] = []
    for tname, t in weights.ternary.items():
        _check_storable(tname, t, weight_type)
    if weight_type in ("tq2_0", "tq1_0", "f16"):
        change = max(
            (abs(float(np.float16(t.scale)) / t.scale - 1) for t in weights.ternary.values() if t.scale),
            default=0.0,
        )
        notes.append(
            f"{weight_type.upper()} stores scales as f16: largest relative scale change {change:.2e}"
        )

    w = GGUFContainerWriter()
    w.add("general.architecture", arch)
    w.add("general.name", name or Path(weights.source).stem or "bitnet")
    if weight_type in FILE_TYPES:
        w.add("general.file_type", FILE_TYPES[weight_type])
    w.add(f"{arch}.context_length", cfg.context_length)
    w.add(f"{arch}.embedding_length", cfg.d_model)
    w.add(f"{arch}.block_count", cfg.n_layers)
    w.add(f"{arch}.feed_forward_length", cfg.d_ff)
    w.add(f"{arch}.attention.head_count", cfg.n_heads)
    w.add(f"{arch}.attention.head_count_kv", cfg.n_kv_heads)
    if cfg.head_dim * cfg.n_heads != cfg.d_model:
        w.add(f"{arch}.attention.key_length", cfg.head_dim)
        w.add(f"{arch}.attention.value_length", cfg.head_dim)
    w.add(f"{arch}.attention.layer_norm_rms_epsilon", float(cfg.rms_eps))
    w.add(f"{arch}.rope.freq_base", float(cfg.rope_theta))
    w.add(f"{arch}.rope.dimension_count", cfg.head_dim)
    w.add(f"{arch}.vocab_size", cfg.vocab_size)
    w.add(f"{arch}.hidden_activation", cfg.activation)  # explicit: readers must not guess (BITNET.md 1)

    tok_meta, tok_notes = tokenizer_metadata(weights.tokenizer)
    notes += tok_notes
    _pad_vocabulary(tok_meta, cfg.vocab_size, notes)
    item_types = {"tokenizer.ggml.token_type": ValueType.INT32, "tokenizer.ggml.scores": ValueType.FLOAT32}
    for key, value in tok_meta.items():
        w.add(key, value, item_type=item_types.get(key))

    def float_producer(array: np.ndarray, dtype: type) -> Callable[[], np.ndarray]:
        return lambda: np.asarray(array, dtype=dtype)

    embed_dtype = np.float16 if embed_type == "f16" else np.float32
    floats = weights.float_tensors
    order = ["token_embd.weight", "output_norm.weight"]
    if not cfg.tied_embeddings:
        order.append("output.weight")
    for tname in order:
        array = floats[tname]
        big = tname != "output_norm.weight"
        w.add_tensor(
            tname,
            array.shape,
            EMBED_TYPES[embed_type] if big else TYPE_F32,
            float_producer(array, embed_dtype if big else np.float32),
        )
    ttype = WEIGHT_TYPES[weight_type]
    for layer in range(cfg.n_layers):
        for norm in LAYER_NORMS:
            tname = f"blk.{layer}.{norm}.weight"
            w.add_tensor(tname, floats[tname].shape, TYPE_F32, float_producer(floats[tname], np.float32))
        for proj in TERNARY_PROJECTIONS:
            tname = f"blk.{layer}.{proj}.weight"
            t = weights.ternary[tname]
            w.add_tensor(tname, t.shape, ttype, _ternary_producer(t, weight_type))
    w.write(path)
    return notes
