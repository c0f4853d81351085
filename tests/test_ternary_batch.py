"""bitlinear_into on small matrices with batches of rows (the default model's decode shapes): every
path and layout, row counts on both sides of the kernels' thresholds, shapes that are not whole tiles,
bit for bit against the numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
from bitnet_grpc.cyext import reference as ref
from bitnet_grpc.cyext import ternary


def problem(rng, m, n, k):
    x = (rng.standard_normal((m, k)) * rng.uniform(0.1, 10, size=(m, 1))).astype(np.float32)
    codes = rng.choice(np.array([-1, 0, 1], np.int8), size=(n, k), p=[0.3, 0.4, 0.3])
    w_scale = rng.uniform(0.01, 2.0, size=n).astype(np.float32)
    return x, ternary.pack_ternary(codes), w_scale


def same_bits(a, b):
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def scratch(rows, k):
    return (
        np.empty((rows, ternary.padded_k(k)), np.int8),
        np.empty(rows, np.float32),
        np.empty(rows, np.int32),
    )


@pytest.mark.parametrize("layout", ["2bit", "lut"])
@pytest.mark.parametrize(
    "n,k", [(512, 256), (256, 768), (100, 300), (33, 1), (70, 520), (200, 256), (230, 9)]
)
def test_batches_match_reference(kernel_path, threads, layout, n, k):
    rng = np.random.default_rng(n * 7 + k)
    x, packed, w_scale = problem(rng, 48, n, k)
    weights = ternary.pack_lut(packed) if layout == "lut" else packed
    want = ref.bitlinear(x, packed, w_scale)
    q = scratch(48, k)
    for count in (1, 2):
        threads(count)
        for m in (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 48):
            out = np.full((m, n), np.nan, np.float32)
            ternary.bitlinear_into(x[:m], weights, w_scale, *q, out)
            assert same_bits(out, want[:m]), (count, m)
            xq, _, x_sum = ref.quantize_rows(x[:m])
            assert np.array_equal(q[0][:m, : xq.shape[1]], xq) and np.array_equal(q[2][:m], x_sum), (count, m)


@pytest.mark.parametrize("layout", ["2bit", "lut"])
@pytest.mark.parametrize("n,k", [(512, 256), (64, 6912)])
def test_bad_rows_reported_from_any_thread(kernel_path, threads, layout, n, k):
    """Rows are quantised by the threads that use them (with K = 6912 the LUT kernel runs the rows in
    blocks of 12): the lowest bad row is reported all the same, and good rows still match."""
    rng = np.random.default_rng(5)
    x, packed, w_scale = problem(rng, 40, n, k)
    weights = ternary.pack_lut(packed) if layout == "lut" else packed
    x[37, 3] = np.inf
    x[21, 0] = np.nan
    threads(2)
    for m, row in ((40, 21), (30, 21), (22, 21)):
        with pytest.raises(ValueError, match=f"x row {row} contains NaN"):
            ternary.bitlinear_into(x[:m], weights, w_scale, *scratch(40, k), np.empty((m, n), np.float32))
    out = np.empty((21, n), np.float32)
    ternary.bitlinear_into(x[:21], weights, w_scale, *scratch(40, k), out)
    assert same_bits(out, ref.bitlinear(x[:21], packed, w_scale))


def test_bad_arguments_name_the_argument():
    rng = np.random.default_rng(6)
    x, packed, w_scale = problem(rng, 4, 64, 256)
    q = scratch(4, 256)
    out = np.empty((4, 64), np.float32)
    with pytest.raises(ValueError, match="x must be 2-D"):
        ternary.bitlinear_into(x.astype(np.float64), packed, w_scale, *q, out)
    with pytest.raises(ValueError, match="packed must be 2-D"):
        ternary.bitlinear_into(x, packed.view(np.int8), w_scale, *q, out)
    with pytest.raises(ValueError, match="LUT weights must be 1-D"):
        ternary.bitlinear_into(x, ternary.pack_lut(packed).view(np.int16), w_scale, *q, out)
    with pytest.raises(ValueError, match="x_sum must be 1-D"):
        ternary.bitlinear_into(x, packed, w_scale, q[0], q[1], q[2].astype(np.int64), out)
    with pytest.raises(ValueError, match="w_scale, x_scale and x_sum must be contiguous"):
        ternary.bitlinear_into(x, packed, np.repeat(w_scale, 2)[::2], *q, out)
    frozen = out.copy()
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="out must be a writeable buffer"):
        ternary.bitlinear_into(x, packed, w_scale, *q, frozen)
    with pytest.raises(ValueError, match="weights must be a buffer"):
        ternary.bitlinear_into(x, None, w_scale, *q, out)


@pytest.mark.parametrize("k", [256, 250, 258, 600])
def test_extreme_sums_in_one_pass(kernel_path, threads, k):
    """Quantised rows hold -127..127, so the LUT kernel sums a whole row of K <= 256 (Kp = 256) in int16 at
    once (K = 258 and 600 pad to Kp = 512 and take the chunked path):
    every activation at +-127 against weights all -1 or all +1 reaches 256 * 127 = 32512 there."""
    n = 64
    codes = np.ones((n, k), np.int8)
    codes[::2] = -1
    packed = ternary.pack_ternary(codes)
    w_scale = np.ones(n, np.float32)
    x = np.ones((6, k), np.float32)
    x[1::2] = -1.0
    x[4, ::2] = -1.0
    q = scratch(6, k)
    for count in (1, 2):
        threads(count)
        for weights in (packed, ternary.pack_lut(packed)):
            out = np.empty((6, n), np.float32)
            ternary.bitlinear_into(x, weights, w_scale, *q, out)
            assert same_bits(out, ref.bitlinear(x, packed, w_scale))
            assert abs(out[0, 0]) == k and q[2][0] == 127 * k


def test_matrices_streamed_from_memory_match_reference(kernel_path, threads):
    """Over 256 KB of LUT words the kernel takes one weight group per tile (ternary_lut.c, STREAMED_BYTES):
    that path too must give the reference's bits, for every row count of a tile."""
    rng = np.random.default_rng(11)
    n, k = 800, 6400  # 25 groups x 712 words x 64 bytes: 1.14 MB, above the threshold
    x, packed, w_scale = problem(rng, 9, n, k)
    lut = ternary.pack_lut(packed)
    assert lut.nbytes > 256 << 10
    want = ref.bitlinear(x, packed, w_scale)
    q = scratch(9, k)
    for count in (1, 2):
        threads(count)
        for m in (1, 2, 3, 4, 5, 9):
            out = np.full((m, n), np.nan, np.float32)
            ternary.bitlinear_into(x[:m], lut, w_scale, *q, out)
            assert same_bits(out, want[:m]), (count, m)
