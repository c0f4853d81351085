"""Ternary block layouts: our numpy decoders/encoders against the gguf package and the written spec."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from bitnet_grpc.server import ternary_formats as tf
from gguf import GGMLQuantizationType as Q


def _codes(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    codes = rng.integers(-1, 2, size=shape).astype(np.int8)
    codes[0, :256] = 0  # one all-zero block: ggml writes d = 0 for it
    return codes


@pytest.mark.parametrize("name", ["TQ2_0", "TQ1_0"])
def test_tq_decoding_equals_gguf_dequantize_on_arbitrary_blocks(name: str) -> None:
    # Arbitrary float input gives different scales per block: the decoder must reproduce each block.
    rng = np.random.default_rng(1)
    dense = rng.normal(size=(6, 768)).astype(np.float32)
    packed = gguf.quants.quantize(dense, Q[name])
    decode = tf.decode_tq2_0 if name == "TQ2_0" else tf.decode_tq1_0
    codes, scales = decode(packed, dense.shape)
    expected = gguf.quants.dequantize(packed, Q[name])
    assert scales.shape == (6, 3)
    np.testing.assert_array_equal(codes.astype(np.float32) * np.repeat(scales, 256, axis=1), expected)


@pytest.mark.parametrize("name", ["TQ2_0", "TQ1_0"])
def test_tq_encoding_is_byte_identical_to_gguf_quantize(name: str) -> None:
    rng = np.random.default_rng(2)
    codes = _codes(rng, (8, 512))
    scale = 0.0371
    encode = tf.encode_tq2_0 if name == "TQ2_0" else tf.encode_tq1_0
    reference = gguf.quants.quantize(codes.astype(np.float32) * np.float32(scale), Q[name])
    np.testing.assert_array_equal(encode(codes, scale), reference.reshape(-1))


@pytest.mark.parametrize("name", ["TQ2_0", "TQ1_0"])
def test_equal_block_scales_merge_exactly(name: str) -> None:
    rng = np.random.default_rng(3)
    codes = _codes(rng, (4, 512))
    encode, decode = (
        (tf.encode_tq2_0, tf.decode_tq2_0) if name == "TQ2_0" else (tf.encode_tq1_0, tf.decode_tq1_0)
    )
    merged = tf.merge_block_scales(*decode(encode(codes, 0.75), codes.shape))
    np.testing.assert_array_equal(merged.codes, codes)
    assert merged.scale == 0.75 and merged.note is None


def test_block_scales_negative_and_zero_are_folded_into_codes() -> None:
    codes = np.ones((1, 768), np.int8)
    scales = np.array([[0.5, -0.5, 0.0]], np.float32)
    merged = tf.merge_block_scales(codes, scales)
    assert merged.scale == 0.5 and merged.note is None
    np.testing.assert_array_equal(merged.codes[0, :256], 1)
    np.testing.assert_array_equal(merged.codes[0, 256:512], -1)
    np.testing.assert_array_equal(merged.codes[0, 512:], 0)


def test_differing_block_scales_are_reternarised_and_reported() -> None:
    codes = np.ones((2, 512), np.int8)
    codes[:, ::2] = 0  # mean |w| of a block with d is d/2
    scales = np.array([[1.0, 1.0], [1.0, 3.0]], np.float32)
    merged = tf.merge_block_scales(codes, scales)
    assert merged.note is not None and "differ" in merged.note
    # absmean of the dequantised weights: mean of (1, 1, 1, 3) / 2 = 0.75; 1/0.75 and 3/0.75 round to 1
    assert merged.scale == pytest.approx(0.75)
    np.testing.assert_array_equal(merged.codes, codes)


def test_i2s_layout_matches_the_written_spec() -> None:
    # BITNET.md: blocks of 128 weights in 32 bytes; element j at byte j % 32, bit shift 6 - 2 * (j // 32);
    # stored code c means c - 1; then an f32 scale at byte n/4. Built here bit by bit, not with our encoder.
    rng = np.random.default_rng(4)
    codes = rng.integers(-1, 2, size=(2, 256)).astype(np.int8)
    flat = codes.reshape(-1)
    raw = np.zeros(flat.size // 4 + 32, np.uint8)
    for i, w in enumerate(flat):
        block, j = divmod(i, 128)
        raw[block * 32 + j % 32] |= (int(w) + 1) << (6 - 2 * (j // 32))
    raw[flat.size // 4 : flat.size // 4 + 4] = np.frombuffer(np.float32(0.625).tobytes(), np.uint8)
    decoded, scale = tf.decode_i2s(raw, codes.shape)
    np.testing.assert_array_equal(decoded, codes)
    assert scale == 0.625
    np.testing.assert_array_equal(tf.encode_i2s(codes, 0.625), raw)


def test_i2s_and_tq2_0_of_the_same_weights_give_identical_codes() -> None:
    rng = np.random.default_rng(5)
    codes = rng.integers(-1, 2, size=(16, 512)).astype(np.int8)
    i2s_codes, i2s_scale = tf.decode_i2s(tf.encode_i2s(codes, 1.5), codes.shape)
    tq = tf.merge_block_scales(*tf.decode_tq2_0(tf.encode_tq2_0(codes, 1.5), codes.shape))
    np.testing.assert_array_equal(i2s_codes, tq.codes)
    assert i2s_scale == tq.scale == 1.5


def test_code_three_is_refused() -> None:
    raw = np.full(128 // 4 + 32, 0xFF, np.uint8)
    with pytest.raises(ValueError, match="code 3"):
        tf.decode_i2s(raw, (1, 128))
    with pytest.raises(ValueError, match="code 3"):
        tf.unpack_hf_rows(np.full((1, 8), 0xFF, np.uint8))


def test_hf_row_interleave_matches_the_written_spec() -> None:
    # BITNET.md: packed row r holds output rows r + k * out/4 in bits 2k..2k+1 (k = 0 in the low bits).
    rng = np.random.default_rng(6)
    codes = rng.integers(-1, 2, size=(8, 5)).astype(np.int8)
    packed = np.zeros((2, 5), np.uint8)
    for row in range(8):
        k, r = divmod(row, 2)
        packed[r] |= ((codes[row] + 1).astype(np.uint8) << (2 * k)).astype(np.uint8)
    np.testing.assert_array_equal(tf.unpack_hf_rows(packed), codes)
    np.testing.assert_array_equal(tf.pack_hf_rows(codes), packed)


def test_absmean_rule() -> None:
    w = np.array([[0.2, -0.05, 0.5, -1.0]], np.float32)  # mean |w| = 0.4375
    codes, scale = tf.ternarize_absmean(w)
    assert scale == pytest.approx(0.4375)
    np.testing.assert_array_equal(codes, [[0, 0, 1, -1]])
    codes, scale = tf.ternarize_absmean(np.zeros((2, 4), np.float32))
    assert scale == pytest.approx(1e-5) and not codes.any()


def test_exact_ternary_detection() -> None:
    w = np.array([[0.5, 0.0, -0.5]], np.float32)
    codes, scale = tf.exact_ternary(w)
    assert scale == 0.5
    np.testing.assert_array_equal(codes, [[1, 0, -1]])
    assert tf.exact_ternary(w + np.float32(1e-3)) is None
    assert tf.exact_ternary(np.zeros((2, 2), np.float32)) is None
