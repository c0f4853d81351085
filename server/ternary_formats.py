"""Ternary weight layouts <-> int8 codes in {-1, 0, +1} plus one scale per tensor.

Every file format stores the same thing differently (BITNET.md section 3): bitnet.cpp's I2_S (2-bit
codes, high bits first, one f32 scale per tensor), ggml's TQ2_0 / TQ1_0 (256-weight blocks with an f16
scale each), and Hugging Face's packed uint8 rows. The engine wants codes and a single scale, so each
decoder here goes straight to int8 codes, vectorised with numpy; the encoders are their exact inverses
(the writer uses them, and tests check them byte for byte against the `gguf` package's quantisers).

Decoders raise ValueError with a short reason; the loaders add the file and tensor names.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import numpy as np

SCALE_FLOOR = 1e-5  # absmean floor, same as the training code
TQ_BLOCK = 256
TQ2_0_BYTES = 66  # 64 bytes of 2-bit codes + f16 scale
TQ1_0_BYTES = 54  # 48 bytes of 5 trits/byte + 4 bytes of 4 trits/byte + f16 scale
I2_S_BLOCK = 128  # 32 bytes: element j at byte j % 32, bits 6 - 2 * (j // 32)
I2_S_TRAILER = 32  # f32 scale then padding, after the n/4 code bytes

_I2_S_SHIFTS = np.array([6, 4, 2, 0], dtype=np.uint8).reshape(1, 4, 1)
_TQ2_0_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)


@dataclass
class BlockDecode:
    """Codes and one scale recovered from a block-scaled tensor; `note` says what had to be changed."""

    codes: np.ndarray
    scale: float
    note: str | None = None


# ---------------------------------------------------------------------------- absmean ternarisation


def _kernel_ternarize():
    """The kernel module's `ternarize` when it is built, so files and kernels share one rounding rule."""
    if importlib.util.find_spec("bitnet_grpc.cyext.ternary") is None:
        return None
    from bitnet_grpc.cyext import ternary

    return getattr(ternary, "ternarize", None)


def ternarize_numpy(w: np.ndarray) -> tuple[np.ndarray, float]:
    """Absmean rule: s = max(mean|W|, 1e-5), codes = clip(round-half-even(W / s), -1, 1)."""
    w = np.asarray(w, dtype=np.float32)
    scale = np.float32(max(float(np.mean(np.abs(w), dtype=np.float64)), SCALE_FLOOR))
    codes = np.clip(np.rint(w / scale), -1, 1).astype(np.int8)
    return codes, float(scale)


def ternarize_absmean(w: np.ndarray) -> tuple[np.ndarray, float]:
    """Ternarise float master weights [out, in] (kernel implementation when available)."""
    w2 = np.ascontiguousarray(w, dtype=np.float32)
    kernel = _kernel_ternarize()
    if kernel is not None and w2.ndim == 2:
        codes, scale = kernel(w2)
        return np.asarray(codes, dtype=np.int8), float(scale)
    return ternarize_numpy(w2)


def exact_ternary(w: np.ndarray) -> tuple[np.ndarray, float] | None:
    """Codes and scale when `w` already holds only {-a, 0, +a}; None otherwise.

    Why: llama.cpp's converter stores ternarised weights as F32/F16 (codes * scale) and computes with
    them as they are. Re-ternarising such a tensor with absmean would shrink its scale by the fraction of
    nonzero weights, changing the model; recognising it keeps it exact.
    """
    w = np.asarray(w, dtype=np.float32)
    mags = np.abs(w)
    a = float(mags.max()) if w.size else 0.0
    if a == 0.0 or not math.isfinite(a):
        return None
    if not np.all((mags == a) | (mags == 0)):
        return None
    return np.sign(w).astype(np.int8), a


# ---------------------------------------------------------------------------- shared checks


def _n_elements(shape: tuple[int, ...]) -> int:
    return math.prod(int(s) for s in shape)


def _need_bytes(raw: np.ndarray, n: int, layout: str) -> np.ndarray:
    raw = np.asarray(raw, dtype=np.uint8).reshape(-1)
    if raw.shape[0] < n:
        raise ValueError(f"{layout} data has {raw.shape[0]} bytes, expected {n}")
    return raw[:n]


def _codes_from_unsigned(c: np.ndarray, shape: tuple[int, ...], layout: str) -> np.ndarray:
    """Stored codes 0/1/2 -> weights -1/0/+1; 3 is not a ternary value and means a corrupt tensor."""
    if np.any(c == 3):
        raise ValueError(f"{layout} code 3 found (only 0, 1, 2 are ternary values): corrupt data")
    return c.reshape(shape).view(np.int8) - np.int8(1)


def _check_codes(codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D [out, in], got shape {codes.shape}")
    if codes.size and (codes.min() < -1 or codes.max() > 1):
        raise ValueError("codes must be in {-1, 0, +1}")
    return codes.astype(np.int8, copy=False)


# ---------------------------------------------------------------------------- I2_S (bitnet.cpp, x86)


def i2s_nbytes(n_elements: int) -> int:
    return n_elements // 4 + I2_S_TRAILER


def decode_i2s(raw: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, float]:
    """I2_S bytes -> (codes int8 `shape`, scale). The f32 scale sits right after the n/4 code bytes."""
    n = _n_elements(shape)
    if n % I2_S_BLOCK:
        raise ValueError(f"I2_S needs a multiple of {I2_S_BLOCK} weights, shape {list(shape)} has {n}")
    data = _need_bytes(raw, n // 4 + 4, "I2_S")
    packed = data[: n // 4].reshape(-1, 1, 32)
    codes = _codes_from_unsigned((packed >> _I2_S_SHIFTS) & np.uint8(3), shape, "I2_S")
    scale = float(data[n // 4 : n // 4 + 4].view("<f4")[0])
    if not math.isfinite(scale):
        raise ValueError(f"I2_S scale is {scale}")
    return codes, scale


def encode_i2s(codes: np.ndarray, scale: float) -> np.ndarray:
    """(codes, scale) -> I2_S bytes: n/4 code bytes, the f32 scale, zero padding to n/4 + 32."""
    codes = _check_codes(codes)
    n = codes.size
    if n % I2_S_BLOCK:
        raise ValueError(f"I2_S needs a multiple of {I2_S_BLOCK} weights, shape {list(codes.shape)} has {n}")
    t = (codes.reshape(-1, 4, 32) + np.int8(1)).view(np.uint8)
    packed = (t[:, 0] << 6) | (t[:, 1] << 4) | (t[:, 2] << 2) | t[:, 3]
    out = np.zeros(i2s_nbytes(n), dtype=np.uint8)
    out[: n // 4] = packed.reshape(-1)
    out[n // 4 : n // 4 + 4] = np.array([scale], dtype="<f4").view(np.uint8)
    return out


# ---------------------------------------------------------------------------- TQ2_0 / TQ1_0 (ggml)


def _tq_blocks(raw: np.ndarray, shape: tuple[int, int], block_bytes: int, layout: str) -> np.ndarray:
    if int(shape[-1]) % TQ_BLOCK:
        raise ValueError(f"{layout} rows must be a multiple of {TQ_BLOCK} long, shape {list(shape)}")
    n_blocks = _n_elements(shape) // TQ_BLOCK
    return _need_bytes(raw, n_blocks * block_bytes, layout).reshape(n_blocks, block_bytes)


def _block_scales(blocks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    d = np.ascontiguousarray(blocks[:, -2:]).view("<f2").astype(np.float32)
    return d.reshape(int(shape[0]), -1)


def decode_tq2_0(raw: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """TQ2_0 bytes -> (codes int8 `shape`, block scales float32 [out, in/256])."""
    blocks = _tq_blocks(raw, shape, TQ2_0_BYTES, "TQ2_0")
    # byte m of 32-byte half h holds weights h*128 + l*32 + m at bits 2l (l = 0..3)
    qs = blocks[:, :64].reshape(-1, 2, 1, 32)
    c = ((qs >> _TQ2_0_SHIFTS) & np.uint8(3)).reshape(-1, TQ_BLOCK)
    return _codes_from_unsigned(c, shape, "TQ2_0"), _block_scales(blocks, shape)


def _trits(q: np.ndarray, count: int) -> np.ndarray:
    """Trit n of byte q is ((q * 3^n mod 256) * 3) >> 8: bytes [nb, m] -> trits [nb, n, m]."""
    shifted = q[:, None, :] * _POW3[:count].reshape(1, count, 1)  # uint8 arithmetic wraps mod 256
    return ((shifted.astype(np.uint16) * 3) >> 8).astype(np.uint8)


def decode_tq1_0(raw: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """TQ1_0 bytes -> (codes int8 `shape`, block scales float32 [out, in/256])."""
    blocks = _tq_blocks(raw, shape, TQ1_0_BYTES, "TQ1_0")
    nb = blocks.shape[0]
    c = np.concatenate(
        [
            _trits(blocks[:, 0:32], 5).reshape(nb, 160),  # weights n*32 + m
            _trits(blocks[:, 32:48], 5).reshape(nb, 80),  # weights 160 + n*16 + m
            _trits(blocks[:, 48:52], 4).reshape(nb, 16),  # weights 240 + n*4 + m
        ],
        axis=1,
    )
    return _codes_from_unsigned(c, shape, "TQ1_0"), _block_scales(blocks, shape)


def _tq_scales_for(codes: np.ndarray, scale: float) -> np.ndarray:
    """Per-block f16 scale as ggml's quantiser writes it for codes * scale: 0 for all-zero blocks."""
    used = (codes.reshape(-1, TQ_BLOCK) != 0).any(axis=1)
    d = np.where(used, np.float16(np.float32(scale)), np.float16(0))
    return d.astype("<f2").view(np.uint8).reshape(-1, 2)


def _tq_check(codes: np.ndarray, layout: str) -> np.ndarray:
    codes = _check_codes(codes)
    if codes.shape[1] % TQ_BLOCK:
        raise ValueError(f"{layout} rows must be a multiple of {TQ_BLOCK} long, shape {list(codes.shape)}")
    return codes


def encode_tq2_0(codes: np.ndarray, scale: float) -> np.ndarray:
    """(codes, scale) -> TQ2_0 bytes (same bytes as gguf.quants on codes * scale)."""
    codes = _tq_check(codes, "TQ2_0")
    t = (codes.reshape(-1, 2, 4, 32) + np.int8(1)).view(np.uint8)
    qs = t[:, :, 0] | (t[:, :, 1] << 2) | (t[:, :, 2] << 4) | (t[:, :, 3] << 6)
    return np.concatenate([qs.reshape(-1, 64), _tq_scales_for(codes, scale)], axis=1).reshape(-1)


def _pack_trits(t: np.ndarray, count: int) -> np.ndarray:
    """Trits [nb, count, m] -> bytes [nb, m]: base 3, first trit most significant, then ceil(c*256/243)."""
    weights = (3 ** np.arange(4, 4 - count, -1)).astype(np.uint16).reshape(1, count, 1)
    c = (t.astype(np.uint16) * weights).sum(axis=1, dtype=np.uint16)
    return ((c * 256 + 242) // 243).astype(np.uint8)


def encode_tq1_0(codes: np.ndarray, scale: float) -> np.ndarray:
    """(codes, scale) -> TQ1_0 bytes (same bytes as gguf.quants on codes * scale)."""
    codes = _tq_check(codes, "TQ1_0")
    t = (codes.reshape(-1, TQ_BLOCK) + np.int8(1)).view(np.uint8)
    nb = t.shape[0]
    qs0 = _pack_trits(t[:, :160].reshape(nb, 5, 32), 5)
    qs1 = _pack_trits(t[:, 160:240].reshape(nb, 5, 16), 5)
    qh = _pack_trits(t[:, 240:].reshape(nb, 4, 4), 4)
    return np.concatenate([qs0, qs1, qh, _tq_scales_for(codes, scale)], axis=1).reshape(-1)


def merge_block_scales(codes: np.ndarray, block_scales: np.ndarray) -> BlockDecode:
    """One scale for a block-scaled tensor: exact when all used blocks share one |d|.

    Files written from a per-tensor ternarisation (llama.cpp's converter, our writer) have equal block
    scales. When they differ, the tensor is not per-tensor ternary: dequantise and re-ternarise with the
    absmean rule, and say so in `note`.
    """
    rows, n_blocks = block_scales.shape
    if not np.all(np.isfinite(block_scales)):
        raise ValueError("block scale is not finite")
    blocked = codes.reshape(rows, n_blocks, TQ_BLOCK)
    # A block with d == 0 holds zero weights whatever its codes; a negative d flips its signs.
    live = blocked.any(axis=2) & (block_scales != 0)
    mags = np.abs(block_scales[live])
    if mags.size == 0:
        return BlockDecode(np.zeros_like(codes), SCALE_FLOOR)
    signs = np.sign(block_scales).astype(np.int8)
    if np.all(mags == mags[0]):
        exact = (blocked * signs[:, :, None]).reshape(codes.shape)
        return BlockDecode(np.ascontiguousarray(exact, dtype=np.int8), float(mags[0]))
    weights = (blocked.astype(np.float32) * block_scales[:, :, None]).reshape(codes.shape)
    new_codes, scale = ternarize_absmean(weights)
    distinct = np.unique(mags)
    note = (
        f"block scales differ ({distinct.size} distinct magnitudes, {float(distinct[0]):.6g} to "
        f"{float(distinct[-1]):.6g}): re-ternarised with absmean (scale {scale:.6g})"
    )
    return BlockDecode(new_codes, scale, note)


# ---------------------------------------------------------------------------- Hugging Face packed rows


def unpack_hf_rows(packed: np.ndarray) -> np.ndarray:
    """HF offline uint8 [out/4, in] -> codes [out, in]: packed row r holds rows r + k*out/4 at bits 2k."""
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.ndim != 2:
        raise ValueError(f"packed ternary weights must be 2-D [out/4, in], got shape {list(packed.shape)}")
    c = (packed[None, :, :] >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1, 1)) & np.uint8(3)
    rows = 4 * packed.shape[0]
    return _codes_from_unsigned(c, (rows, packed.shape[1]), "packed uint8")


def pack_hf_rows(codes: np.ndarray) -> np.ndarray:
    """codes [out, in] -> HF offline uint8 [out/4, in] (inverse of `unpack_hf_rows`)."""
    codes = _check_codes(codes)
    if codes.shape[0] % 4:
        raise ValueError(f"packed rows need out_features divisible by 4, shape {list(codes.shape)}")
    t = (codes + np.int8(1)).view(np.uint8).reshape(4, codes.shape[0] // 4, codes.shape[1])
    return t[0] | (t[1] << 2) | (t[2] << 4) | (t[3] << 6)


# ---------------------------------------------------------------------------- float helpers


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (raw bytes or uint16) -> float32: a bf16 is the top half of an f32."""
    raw = np.asarray(raw)
    u16 = raw.reshape(-1).view("<u2") if raw.dtype == np.uint8 else raw.astype("<u2", copy=False)
    return (u16.astype(np.uint32) << 16).view(np.float32)
