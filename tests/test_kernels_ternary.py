"""Ternary kernels against their numpy references: every SIMD path on this CPU must match bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from bitnet_grpc.cyext import reference as ref
from bitnet_grpc.cyext import ternary

ALL_PATHS = ["portable", "avx2", "avx512bw", "avx512vnni"]  # kernel_path (conftest.py) runs each


def random_codes(rng, n, k, p_zero=0.4):
    return rng.choice(
        np.array([-1, 0, 1], np.int8), size=(n, k), p=[(1 - p_zero) / 2, p_zero, (1 - p_zero) / 2]
    )


def random_problem(rng, m, n, k):
    x = (rng.standard_normal((m, k)) * rng.uniform(0.1, 10, size=(m, 1))).astype(np.float32)
    codes = random_codes(rng, n, k)
    w_scale = rng.uniform(0.01, 2.0, size=n).astype(np.float32)
    return x, ternary.pack_ternary(codes), w_scale


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def run_matmul(xq, x_scale, x_sum, packed):
    rng = np.random.default_rng(xq.shape[0] * 1000 + packed.shape[0])
    w_scale = rng.uniform(0.5, 1.5, size=packed.shape[0]).astype(np.float32)
    out = np.empty((xq.shape[0], packed.shape[0]), np.float32)
    ternary.ternary_matmul(xq, x_scale, x_sum, packed, w_scale, out)
    return out, ref.ternary_matmul(xq, x_scale, x_sum, packed, w_scale)


# ------------------------------------------------------------------------------------ pack / unpack


def test_padded_k():
    assert [ternary.padded_k(k) for k in (0, 1, 255, 256, 257, 2560, 6912)] == [
        0,
        256,
        256,
        256,
        512,
        2560,
        6912,
    ]
    assert ternary.BLOCK == ref.BLOCK == 256


@pytest.mark.parametrize("n,k", [(1, 1), (3, 255), (7, 256), (5, 257), (13, 700), (2, 1024)])
def test_pack_matches_reference_and_round_trips(n, k):
    codes = random_codes(np.random.default_rng(k), n, k)
    packed = ternary.pack_ternary(codes)
    assert packed.shape == (n, ternary.padded_k(k) // 4) and packed.dtype == np.uint8
    assert np.array_equal(packed, ref.pack_ternary(codes))
    assert np.array_equal(ternary.unpack_ternary(packed, k), codes)
    assert np.array_equal(ref.unpack_ternary(packed, k), codes)


def test_pack_layout_by_hand():
    """Byte j of a block holds element j + 64*l in bits 2l..2l+1, as w + 1; padding is code 1."""
    codes = np.zeros((1, 300), np.int8)
    codes[0, 5] = 1  # block 0, j=5, l=0 -> code 2 in bits 0-1
    codes[0, 64 + 5] = -1  # l=1 -> code 0 in bits 2-3
    codes[0, 192 + 63] = 1  # l=3, j=63 -> code 2 in bits 6-7
    codes[0, 256 + 1] = -1  # block 1, j=1, l=0
    packed = ternary.pack_ternary(codes)
    zero_byte = 0b01010101  # four zero weights
    assert packed[0, 5] == 0b01010010
    assert packed[0, 63] == 0b10010101
    assert packed[0, 64 + 1] == 0b01010100
    assert packed[0, 64 + 2] == zero_byte  # elements 258 (real, zero), 322, 386, 450 (padding)
    assert np.count_nonzero(packed != zero_byte) == 3


def test_pack_rejects_codes_outside_ternary():
    codes = np.zeros((2, 10), np.int8)
    codes[1, 7] = 2
    with pytest.raises(ValueError, match=r"codes\[1, 7\] = 2"):
        ternary.pack_ternary(codes)


def test_unpack_rejects_code_three_and_wrong_k():
    packed = ternary.pack_ternary(np.zeros((2, 10), np.int8))
    with pytest.raises(ValueError, match="k = 300 needs 512"):
        ternary.unpack_ternary(packed, 300)
    packed[1, 3] = 0xFF
    with pytest.raises(ValueError, match=r"packed\[1, 3\].*invalid code 3"):
        ternary.unpack_ternary(packed, 10)


# ------------------------------------------------------------------------------------ ternarisation


@pytest.mark.parametrize("n,k", [(1, 1), (5, 7), (64, 300), (33, 1000)])
def test_ternarize_matches_reference(n, k):
    rng = np.random.default_rng(n * k)
    w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
    codes, scale = ternary.ternarize(w)
    ref_codes, ref_scale = ref.ternarize(w)
    assert scale == ref_scale
    assert codes.dtype == np.int8 and np.array_equal(codes, ref_codes)


def test_ternarize_rounds_half_to_even():
    # mean|w| = 6 / 6 = 1 exactly, so w / scale = w and the ties are exact
    w = np.array([[0.5, -0.5, 1.5, -1.5, 0.0, 2.0]], np.float32)
    codes, scale = ternary.ternarize(w)
    assert scale == 1.0
    assert codes.tolist() == [[0, 0, 1, -1, 0, 1]]


def test_ternarize_edge_values():
    codes, scale = ternary.ternarize(np.zeros((3, 4), np.float32))
    assert scale == float(np.float32(1e-5)) and not codes.any()
    big = np.array([[1e30, -1e30, 1e29, 0.0]], np.float32)
    assert ternary.ternarize(big)[1] == ref.ternarize(big)[1]
    assert np.array_equal(ternary.ternarize(big)[0], ref.ternarize(big)[0])
    tiny = np.full((2, 3), 1e-30, np.float32)
    assert ternary.ternarize(tiny)[0].tolist() == [[0, 0, 0], [0, 0, 0]]  # 1e-30 / 1e-5 rounds to 0
    w = np.ones((2, 3), np.float32)
    w[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"w\[1, 2\] is nan"):
        ternary.ternarize(w)
    with pytest.raises(ValueError, match="empty"):
        ternary.ternarize(np.zeros((0, 4), np.float32))


# ------------------------------------------------------------------------------------- quantisation


@pytest.mark.parametrize("m,k", [(1, 1), (3, 100), (8, 256), (33, 700)])
def test_quantize_matches_reference(kernel_path, m, k):
    rng = np.random.default_rng(m + k)
    x = (rng.standard_normal((m, k)) * rng.uniform(1e-3, 1e3, size=(m, 1))).astype(np.float32)
    got = ternary.quantize_rows(x)
    want = ref.quantize_rows(x)
    for g, r in zip(got, want, strict=True):
        assert g.dtype == r.dtype and np.array_equal(g, r)
    assert got[0].shape == (m, ternary.padded_k(k)) and not got[0][:, k:].any()
    assert np.array_equal(got[2], got[0].sum(axis=1))


def test_quantize_rounds_half_to_even(kernel_path):
    # max|x| = 127 makes the scale exactly 1, so x * scale = x and the .5 ties survive to rounding;
    # repeated so that ties land in every SIMD lane and in the scalar tails
    x = np.tile(np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, -127.0]], np.float32), 5)
    xq, x_scale, x_sum = ternary.quantize_rows(x)
    assert x_scale.tolist() == [1.0]
    assert xq[0, :50].tolist() == [127, 0, 2, 2, 0, -2, -2, 126, -126, -127] * 5
    assert x_sum.tolist() == [int(xq[0].sum())]


def test_quantize_edge_values(kernel_path):
    x = np.zeros((4, 300), np.float32)
    x[1, :] = 1e-30
    x[2, ::2], x[2, 1::2] = 1e30, -1e30
    x[3, 7] = -3e38
    xq, x_scale, x_sum = ternary.quantize_rows(x)
    want = ref.quantize_rows(x)
    assert all(np.array_equal(g, r) for g, r in zip((xq, x_scale, x_sum), want, strict=True))
    floor_scale = np.float32(127) / np.float32(1e-5)
    assert x_scale[0] == x_scale[1] == floor_scale and not xq[:2].any()
    assert set(xq[2, :300].tolist()) == {127, -127}
    assert xq[3, 7] == -127 and x_sum[3] == -127


def test_quantize_strided_rows_and_bad_values(kernel_path):
    rng = np.random.default_rng(1)
    big = rng.standard_normal((6, 400)).astype(np.float32)
    view = big[::2, 50:350]  # row stride 800 floats, rows contiguous
    got = ternary.quantize_rows(view)
    assert all(
        np.array_equal(g, r) for g, r in zip(got, ref.quantize_rows(np.ascontiguousarray(view)), strict=True)
    )
    bad = np.ones((4, 21), np.float32)
    bad[2, 4] = np.inf  # in a SIMD lane
    bad[3, 20] = np.nan  # in a scalar tail
    with pytest.raises(ValueError, match="row 2 contains NaN or infinity"):
        ternary.quantize_rows(bad)
    with pytest.raises(ValueError, match="row 1 contains NaN or infinity"):
        ternary.quantize_rows(bad[[0, 3]])
    with pytest.raises(ValueError, match="contiguous"):
        ternary.quantize_rows(big[:, ::2])


def test_quantize_into_given_buffers():
    """Caller-owned outputs are filled in place (also a strided view of a wider buffer) and returned."""
    rng = np.random.default_rng(21)
    x = (rng.standard_normal((5, 300)) * 3).astype(np.float32)
    wide = np.full((5, 1024), 99, np.int8)
    xq, x_scale, x_sum = wide[:, :512], np.empty(5, np.float32), np.empty(5, np.int32)
    got = ternary.quantize_rows(x, xq, x_scale, x_sum)
    assert got[0] is xq and got[1] is x_scale and got[2] is x_sum
    assert all(np.array_equal(g, r) for g, r in zip(got, ref.quantize_rows(x), strict=True))
    assert (wide[:, 512:] == 99).all()
    cases = [
        (dict(xq=xq), "all of xq, x_scale and x_sum"),
        (dict(xq=wide[:, :256], x_scale=x_scale, x_sum=x_sum), r"xq must have shape \(5, 512\)"),
        (dict(xq=xq, x_scale=x_scale[:4], x_sum=x_sum), "x_scale must have shape"),
        (dict(xq=xq, x_scale=x_scale, x_sum=x_sum.astype(np.int64)), "x_sum must have dtype int32"),
        (dict(xq=xq, x_scale=np.empty(10, np.float32)[::2], x_sum=x_sum), "x_scale must be contiguous"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            ternary.quantize_rows(x, **kwargs)
    frozen = np.empty(5, np.int32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="x_sum is read-only"):
        ternary.quantize_rows(x, xq, x_scale, frozen)


def test_bitlinear_into_shared_scratch(kernel_path):
    """One oversized scratch set serves projections of different shapes, bit-identical to bitlinear."""
    rng = np.random.default_rng(22)
    xq, x_scale, x_sum = np.empty((40, 2048), np.int8), np.empty(40, np.float32), np.empty(40, np.int32)
    for m, n, k in [(1, 37, 700), (33, 13, 2000), (3, 64, 256), (7, 5, 1)]:
        x, packed, w_scale = random_problem(rng, m, n, k)
        out = np.full((m, n), np.nan, np.float32)
        ternary.bitlinear_into(x, packed, w_scale, xq, x_scale, x_sum, out)
        assert same_bits(out, ref.bitlinear(x, packed, w_scale)), (m, n, k)
        want = ref.quantize_rows(x)
        assert np.array_equal(xq[:m, : want[0].shape[1]], want[0]) and np.array_equal(x_sum[:m], want[2])


def test_bitlinear_into_strided_views_and_bad_arguments():
    rng = np.random.default_rng(23)
    x, packed, w_scale = random_problem(rng, 4, 10, 300)
    scratch = np.empty((8, 512), np.int8), np.empty(8, np.float32), np.empty(8, np.int32)
    big_x = np.zeros((8, 400), np.float32)
    big_x[::2, 50:350] = x
    buf = np.zeros((4, 30), np.float32)
    ternary.bitlinear_into(big_x[::2, 50:350], packed, w_scale, *scratch, buf[:, 10:20])
    assert same_bits(buf[:, 10:20].copy(), ref.bitlinear(x, packed, w_scale))
    assert not buf[:, :10].any() and not buf[:, 20:].any()
    out = np.empty((4, 10), np.float32)
    bad = x.copy()
    bad[3, 1] = np.nan
    cases = [
        (lambda: ternary.bitlinear_into(x[:, :256], packed, w_scale, *scratch, out), "shape mismatch"),
        (
            lambda: ternary.bitlinear_into(x, packed, w_scale[:9], *scratch, out),
            "w_scale must have length 10",
        ),
        (
            lambda: ternary.bitlinear_into(x, packed, w_scale, *scratch, out[:3]),
            r"out must have shape \(4, 10\)",
        ),
        (
            lambda: ternary.bitlinear_into(x, packed, w_scale, scratch[0][:2], *scratch[1:], out),
            "scratch too small",
        ),
        (
            lambda: ternary.bitlinear_into(
                x, packed, w_scale, *scratch, np.empty((4, 20), np.float32)[:, ::2]
            ),
            "must be contiguous",
        ),
        (lambda: ternary.bitlinear_into(bad, packed, w_scale, *scratch, out), "x row 3 contains NaN"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


# ------------------------------------------------------------------------------------------- matmul


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 33])
def test_matmul_matches_reference(kernel_path, m):
    rng = np.random.default_rng(m)
    for n, k in [(1, 1), (13, 257), (37, 700), (6, 1024), (67, 513)]:
        x, packed, w_scale = random_problem(rng, m, n, k)
        xq, x_scale, x_sum = ternary.quantize_rows(x)
        out = np.full((m, n), np.nan, np.float32)
        ternary.ternary_matmul(xq, x_scale, x_sum, packed, w_scale, out)
        assert same_bits(out, ref.ternary_matmul(xq, x_scale, x_sum, packed, w_scale)), (kernel_path, m, n, k)


def test_matmul_many_rows_cross_row_chunks(kernel_path):
    """M=70 with K=4000: the SIMD paths walk activation rows in L2-sized chunks (64 rows here)."""
    x, packed, w_scale = random_problem(np.random.default_rng(70), 70, 9, 4000)
    assert same_bits(ternary.bitlinear(x, packed, w_scale), ref.bitlinear(x, packed, w_scale))


def test_matmul_extreme_activations(kernel_path):
    """Activations at +127 and -128 against all +1 / all -1 rows: the largest partial sums any int16 or
    int32 stage can see (|acc| = 128 * K). A path that let int16 sums wrap would fail here."""
    k, n = 8192, 6
    codes = np.zeros((n, k), np.int8)
    codes[0], codes[1], codes[2] = 1, -1, 0
    codes[3, ::2], codes[3, 1::2] = 1, -1
    codes[4] = random_codes(np.random.default_rng(4), 1, k)[0]
    codes[5, :100] = 1  # mostly zero weights
    packed = ternary.pack_ternary(codes)
    xq = np.empty((5, k), np.int8)
    xq[0], xq[1] = 127, -128
    xq[2, ::2], xq[2, 1::2] = 127, -128
    xq[3] = 0  # a row of zeros
    xq[4] = np.random.default_rng(5).integers(-128, 128, size=k)
    x_sum = xq.sum(axis=1, dtype=np.int32)
    x_scale = np.array([1.0, 1.0, 0.5, 127 / 1e-5, 3.0], np.float32)
    out, want = run_matmul(xq, x_scale, x_sum, packed)
    assert same_bits(out, want)
    acc = xq.astype(np.int64) @ codes.astype(np.int64).T
    assert acc[1, 1] == 128 * k and acc[0, 0] == 127 * k  # the sums really were that large


def test_matmul_edge_shapes_and_zero_weights(kernel_path):
    rng = np.random.default_rng(7)
    packed = ternary.pack_ternary(np.zeros((5, 300), np.int8))
    xq, x_scale, x_sum = ternary.quantize_rows(rng.standard_normal((3, 300)).astype(np.float32))
    out, want = run_matmul(xq, x_scale, x_sum, packed)
    assert same_bits(out, want) and not out.any()
    empty_out = np.empty((0, 5), np.float32)
    assert ternary.ternary_matmul(
        xq[:0], x_scale[:0], x_sum[:0], packed, np.ones(5, np.float32), empty_out
    ).shape == (0, 5)


def test_matmul_is_batch_invariant(kernel_path):
    rng = np.random.default_rng(11)
    x, packed, w_scale = random_problem(rng, 33, 29, 600)
    full = ternary.bitlinear(x, packed, w_scale)
    for m in (0, 4, 31, 32):
        assert same_bits(ternary.bitlinear(x[m : m + 1], packed, w_scale), full[m : m + 1])


def test_thread_counts_give_identical_results(kernel_path, threads):
    x, packed, w_scale = random_problem(np.random.default_rng(3), 8, 301, 1000)
    results = []
    for n in (1, 2, 3, 4):
        threads(n)
        results.append(ternary.bitlinear(x, packed, w_scale))
    assert all(same_bits(r, results[0]) for r in results)
    assert same_bits(results[0], ref.bitlinear(x, packed, w_scale))


def test_python_threads_call_concurrently(threads):
    threads(2)
    rng = np.random.default_rng(5)
    problems = [random_problem(rng, m, 203, 777) for m in (1, 4, 9, 17)]
    wanted = [ref.bitlinear(*p) for p in problems]
    failures = []

    def worker(i):
        for _ in range(20):
            if not same_bits(ternary.bitlinear(*problems[i]), wanted[i]):
                failures.append(i)

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert failures == []


def test_many_small_parallel_calls_from_two_python_threads(threads):
    """Hundreds of short jobs (each big enough to be split between threads) through the worker pool
    with changing thread counts: a task of one job must never run with another job's arguments."""
    rng = np.random.default_rng(12)
    problems = [random_problem(rng, m, n, 2000) for m, n in ((1, 1024), (2, 520), (5, 300), (8, 129))]
    wanted = [ref.bitlinear(*p) for p in problems]
    failures = []

    def worker(seed):
        pick = np.random.default_rng(seed)
        for _ in range(300):
            i = int(pick.integers(len(problems)))
            if not same_bits(ternary.bitlinear(*problems[i]), wanted[i]):
                failures.append(i)

    workers = [threading.Thread(target=worker, args=(s,)) for s in range(2)]
    for t in workers:
        t.start()
    for n in range(60):  # meanwhile, keep changing the thread count
        threads(1 + n % 4)
    for t in workers:
        t.join()
    assert failures == []


# Back-to-back jobs of different task counts from two Python threads, in a child process whose pool
# has its test hook on (BITNET_GRPC_POOL_TEST_DELAY, read once when the pool starts): a worker that
# finds its job finished sleeps before reading the job fields, a caller sleeps between writing the job
# fields and publishing the job. A worker left over from a finished job must never take a task of the
# next one (before the fix it did, counted it in the next job's `done`, and the process crashed).
POOL_RACE_SCRIPT = """
import sys, threading
import numpy as np
from bitnet_grpc.cyext import reference as ref, ternary

ternary.set_num_threads(2)
rng = np.random.default_rng(21)
problems = []
# 5 and 8 tasks on 2 threads, each long enough (0.1-0.5 ms) that a sleeping worker still gets some
for m, n, k in ((512, 20, 6656), (64, 1024, 2048)):
    x = rng.standard_normal((m, k)).astype(np.float32)
    codes = rng.integers(-1, 2, size=(n, k)).astype(np.int8)
    w_scale = rng.uniform(0.5, 1.5, size=n).astype(np.float32)
    problems.append((x, ternary.pack_ternary(codes), w_scale))
wanted = [ref.bitlinear(*p).view(np.uint32) for p in problems]
failures = []

def caller(seed):
    pick = np.random.default_rng(seed)
    for _ in range(150):
        i = int(pick.integers(len(problems)))
        out = np.full(wanted[i].shape, np.nan, np.float32)
        ternary.bitlinear(*problems[i], out=out)
        if not np.array_equal(out.view(np.uint32), wanted[i]):
            failures.append(i)

threads = [threading.Thread(target=caller, args=(s,)) for s in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("wrong results:", len(failures))
sys.exit(1 if failures else 0)
"""


def test_stale_pool_worker_never_runs_a_task_of_the_next_job():
    env = dict(os.environ, BITNET_GRPC_POOL_TEST_DELAY="300")
    done = subprocess.run(
        [sys.executable, "-c", POOL_RACE_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stdout}{done.stderr[-2000:]}"
    assert "wrong results: 0" in done.stdout


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_parallel_kernels_work_in_a_forked_child(threads):
    threads(2)
    x, packed, w_scale = random_problem(np.random.default_rng(13), 4, 512, 3000)
    want = ternary.bitlinear(x, packed, w_scale)  # starts the pool's workers in this process
    pid = os.fork()
    if pid == 0:  # the child has no workers and must not hang on the parent's pool state
        ok = same_bits(ternary.bitlinear(x, packed, w_scale), want)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_matmul_writes_into_strided_out():
    x, packed, w_scale = random_problem(np.random.default_rng(9), 4, 10, 300)
    buf = np.zeros((4, 30), np.float32)
    ternary.bitlinear(x, packed, w_scale, out=buf[:, 10:20])
    assert same_bits(buf[:, 10:20].copy(), ref.bitlinear(x, packed, w_scale))
    assert not buf[:, :10].any() and not buf[:, 20:].any()


# --------------------------------------------------------------------------------------- LUT layout
# pack_lut's layout is checked against the numpy reference; the LUT kernels (plain C when the path is
# "portable", vpermw otherwise) must give exactly the bits of the reference matmul on the 2-bit weights.


@pytest.mark.parametrize("n,k", [(1, 1), (31, 255), (32, 256), (33, 700), (70, 2560), (5, 6912)])
def test_pack_lut_matches_reference(n, k):
    packed = ternary.pack_ternary(random_codes(np.random.default_rng(n + k), n, k))
    lut = ternary.pack_lut(packed)
    kp = ternary.padded_k(k)
    assert lut.dtype == np.uint16 and lut.shape == (ternary.lut_size(n, kp),)
    assert lut.size == -(-n // 32) * 32 * ternary.lut_words(kp)
    assert np.array_equal(lut, ref.pack_lut(packed))


def test_pack_lut_word_by_hand():
    """Row 1, weights 9..17 (word 1): indices c0 + 3 c1 + 9 c2 of codes c = w + 1 in bits 0-4, 5-9, 10-14."""
    codes = np.zeros((2, 256), np.int8)
    codes[1, 9:18] = [-1, 0, 1, 1, 1, 1, -1, -1, -1]  # codes (0, 1, 2), (2, 2, 2), (0, 0, 0)
    lut = ternary.pack_lut(ternary.pack_ternary(codes))
    words = ternary.lut_words(256)  # 29: one chunk; layout [word][row] for the only group
    assert lut.reshape(words, 32)[1, 1] == (0 + 3 * 1 + 9 * 2) | (26 << 5) | (0 << 10)
    zero_word = 13 | (13 << 5) | (13 << 10)  # all weights zero (also rows 2..31 of the group)
    assert lut.reshape(words, 32)[1, 0] == zero_word and lut.reshape(words, 32)[0, 5] == zero_word


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 33])
def test_lut_matmul_matches_reference(kernel_path, m):
    rng = np.random.default_rng(100 + m)
    for n, k in [(1, 1), (13, 257), (37, 700), (32, 1024), (67, 513), (40, 2560)]:
        x, packed, w_scale = random_problem(rng, m, n, k)
        xq, x_scale, x_sum = ternary.quantize_rows(x)
        out = np.full((m, n), np.nan, np.float32)
        ternary.ternary_matmul(xq, x_scale, x_sum, ternary.pack_lut(packed), w_scale, out)
        assert same_bits(out, ref.ternary_matmul(xq, x_scale, x_sum, packed, w_scale)), (kernel_path, m, n, k)


def test_lut_extreme_activations_cannot_wrap(kernel_path):
    """Every lookup at its largest, +-384 (three weights -1 or +1 against x = -128): a chunk's 84 lookups
    sum to +-32256 in int16, the most it can hold without wrapping; K = 8192 spans ten chunks."""
    k = 8192
    codes = np.zeros((6, k), np.int8)
    codes[0], codes[1] = -1, 1
    codes[2, ::2], codes[2, 1::2] = 1, -1
    codes[3] = random_codes(np.random.default_rng(6), 1, k)[0]
    codes[5, :100] = -1
    packed = ternary.pack_ternary(codes)
    xq = np.empty((5, k), np.int8)
    xq[0], xq[1] = -128, 127
    xq[2, ::2], xq[2, 1::2] = -128, 127
    xq[3] = 0
    xq[4] = np.random.default_rng(7).integers(-128, 128, size=k)
    x_sum = xq.sum(axis=1, dtype=np.int32)
    x_scale = np.array([1.0, 1.0, 0.5, 127 / 1e-5, 3.0], np.float32)
    w_scale = np.linspace(0.5, 1.5, 6).astype(np.float32)
    out = np.empty((5, 6), np.float32)
    ternary.ternary_matmul(xq, x_scale, x_sum, ternary.pack_lut(packed), w_scale, out)
    assert same_bits(out, ref.ternary_matmul(xq, x_scale, x_sum, packed, w_scale))
    acc = xq.astype(np.int64) @ codes.astype(np.int64).T
    assert acc[0, 0] == 128 * k and acc[0, 1] == -128 * k  # the sums really were that large


@pytest.mark.parametrize("m,n,k", [(30, 70, 6912), (130, 70, 1000), (4, 300, 1000)])
def test_lut_row_blocks_threads_and_batch_invariance(kernel_path, threads, m, n, k):
    """Rows run in blocks whose tables fit the kernel's budget (30 rows of K = 6912: blocks of 12; 130
    rows of K = 1024: 96 + 34), and threads split either the row tiles (many rows) or the weight
    groups (few rows). Every thread count and every row alone must give the same bits."""
    x, packed, w_scale = random_problem(np.random.default_rng(m + n), m, n, k)
    lut = ternary.pack_lut(packed)
    want = ref.bitlinear(x, packed, w_scale)
    for count in (1, 2, 3, 4):
        threads(count)
        assert same_bits(ternary.bitlinear(x, lut, w_scale), want), count
    for row in (0, m // 2, m - 1):
        assert same_bits(ternary.bitlinear(x[row : row + 1], lut, w_scale), want[row : row + 1])


def test_lut_bitlinear_into_strided_out_and_errors(kernel_path):
    x, packed, w_scale = random_problem(np.random.default_rng(32), 4, 40, 300)
    lut = ternary.pack_lut(packed)
    scratch = np.empty((8, 512), np.int8), np.empty(8, np.float32), np.empty(8, np.int32)
    buf = np.zeros((4, 60), np.float32)
    ternary.bitlinear_into(x, lut, w_scale, *scratch, buf[:, 10:50])
    assert same_bits(buf[:, 10:50].copy(), ref.bitlinear(x, packed, w_scale))
    assert not buf[:, :10].any() and not buf[:, 50:].any()
    with pytest.raises(ValueError, match="must have 3648 words"):
        ternary.bitlinear_into(x, lut[:-1], w_scale, *scratch, buf[:, 10:50])
    # N comes from w_scale: 39 rows fill the same two groups of 32 as 40, so the first 39 are computed
    assert same_bits(ternary.bitlinear(x, lut, w_scale[:39]), ref.bitlinear(x, packed[:39], w_scale[:39]))
    with pytest.raises(ValueError, match="must have 1824 words"):
        ternary.bitlinear(x, lut, w_scale[:30])
    bad = packed.copy()
    bad[3, 7] = 0xFF
    with pytest.raises(ValueError, match=r"packed\[3, 7\] holds the invalid code 3"):
        ternary.pack_lut(bad)
    assert ternary.pack_lut(np.zeros((0, 64), np.uint8)).shape == (0,)


# ------------------------------------------------------------------------------------ invalid input


def test_invalid_inputs_raise_value_errors():
    x, packed, w_scale = random_problem(np.random.default_rng(2), 3, 5, 300)
    xq, x_scale, x_sum = ternary.quantize_rows(x)
    out = np.empty((3, 5), np.float32)
    args = dict(xq=xq, x_scale=x_scale, x_sum=x_sum, packed=packed, w_scale=w_scale, out=out)

    def matmul(**changes):
        return ternary.ternary_matmul(**{**args, **changes})

    cases = [
        (lambda: ternary.quantize_rows(x.astype(np.float64)), "x must have dtype float32, got float64"),
        (lambda: ternary.quantize_rows(x[0]), "x must be 2-D"),
        (lambda: ternary.quantize_rows(x.tolist()), "x must be a numpy array"),
        (lambda: ternary.bitlinear(x[:, :256], packed, w_scale), "shape mismatch"),
        (lambda: matmul(xq=xq.astype(np.int16)), "xq must have dtype int8"),
        (lambda: matmul(xq=xq[:, :256]), "shape mismatch"),
        (lambda: matmul(xq=xq[:, :100], packed=packed[:, :25]), "multiple of 256"),
        (lambda: matmul(x_scale=x_scale[:2]), "x_scale must have length 3"),
        (lambda: matmul(x_sum=x_sum.astype(np.int64)), "x_sum must have dtype int32"),
        (lambda: matmul(w_scale=w_scale[:4]), "w_scale must have length 5"),
        (lambda: matmul(out=out.T), "out must have shape"),
        (lambda: matmul(out=out[:, ::2]), "out must have shape"),
        (lambda: matmul(out=np.empty((3, 10), np.float32)[:, ::2]), "out rows must be contiguous"),
        (lambda: matmul(packed=packed.astype(np.int8)), "packed must have dtype uint8"),
        (lambda: ternary.pack_ternary(np.zeros((2, 3), np.int32)), "codes must have dtype int8"),
        (lambda: ternary.set_num_threads(0), "threads must be >= 1"),
        (lambda: ternary.set_kernel_path("sse9"), "unknown kernel path 'sse9'"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    frozen = np.empty((3, 5), np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        matmul(out=frozen)


def test_kernel_path_selection():
    paths = ternary.kernel_paths()
    assert paths[0] == "portable" and set(paths) <= set(ALL_PATHS)
    for name in set(ALL_PATHS) - set(paths):
        with pytest.raises(ValueError, match="not supported by this CPU"):
            ternary.set_kernel_path(name)
    env = dict(os.environ, BITNET_GRPC_KERNEL="portable")
    code = "from bitnet_grpc.cyext import ternary; print(ternary.get_kernel_path())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "portable"
    env["BITNET_GRPC_KERNEL"] = "nonsense"
    failed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert failed.returncode != 0 and "ValueError: unknown kernel path 'nonsense'" in failed.stderr


def test_lut_preferred_follows_the_environment(monkeypatch):
    monkeypatch.setenv("BITNET_GRPC_LAYOUT", "auto")
    assert ternary.lut_preferred() == ("avx512bw" in ternary.kernel_paths())
    monkeypatch.setenv("BITNET_GRPC_LAYOUT", "2bit")
    assert not ternary.lut_preferred()
    monkeypatch.setenv("BITNET_GRPC_LAYOUT", "lut")
    assert ternary.lut_preferred()
    monkeypatch.setenv("BITNET_GRPC_LAYOUT", "fast")
    with pytest.raises(ValueError, match="BITNET_GRPC_LAYOUT must be auto, lut or 2bit"):
        ternary.lut_preferred()
