# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Ternary BitLinear kernels: absmean ternarisation, 2-bit packing, int8 activation quantisation and the
ternary matmul, all releasing the GIL. Plain numpy references: `bitnet_grpc.cyext.reference`.

Packed layout (what `pack_ternary` writes and every matmul path reads)
    A weight w in {-1, 0, +1} is stored as the code c = w + 1 in {0, 1, 2}, 2 bits. Each row of K weights
    is padded to Kp = padded_k(K) (a multiple of BLOCK = 256) with code 1 (weight 0) and cut into blocks
    of 256 weights = 64 bytes. Byte j (0..63) of a block holds the elements j + 64*l of that block in
    bits 2l..2l+1, l = 0..3. So one 64-byte load and a shift/mask gives four vectors of 64 consecutive
    codes, which line up with four consecutive 64-byte slices of the activation row. packed has shape
    [N, Kp // 4], uint8, rows contiguous.

LUT layout (what `pack_lut` makes from the packed layout; ternary_lut.c has the details)
    Weight rows in groups of 32; each row's codes in 16-bit words of three 5-bit indices
    c0 + 3 c1 + 9 c2 (three weights each); words chunk-major. A flat uint16 array of
    lut_size(N, Kp) elements (1.78 bits per weight; N comes from w_scale). Every function that takes
    `packed` also takes this layout and returns the same bits. Its kernel looks the indices up in
    per-row tables of the 27 signed sums of three activations (vpermw: 96 multiply-adds per
    instruction) instead of multiplying; `lut_preferred()` says whether a model should use it.

Activation quantisation (per row, absmax)
    x_scale = 127 / max(max|x|, 1e-5), computed in float32; xq = clip(round(x * x_scale), -128, 127)
    with round half to even (the IEEE default, like numpy.rint: 0.5 -> 0, 1.5 -> 2, -2.5 -> -2); the
    row is zero padded to Kp and x_sum = sum(xq). Rows holding NaN or infinity are refused.

Ternarisation (per tensor, absmean)
    scale = float32(max(mean|W|, 1e-5)); codes = clip(round-half-even(W / scale), -1, 1) in float32.
    mean|W| is summed in float64 in a fixed order (each row left to right, then the row sums left to
    right) so the numpy reference reproduces the scale bit for bit.

Matmul
    out[m, n] = ((float)acc[m, n] / x_scale[m]) * w_scale[n] with acc = sum_k xq[m, k] * w[n, k], exact:
    the kernels compute sum_k c[n, k] * xq[m, k] in int32 (u8 x s8 multiply-adds, so vpdpbusd/maddubs
    apply) and subtract x_sum[m]. No int16 sum can wrap (see ternary_x86.c), K is limited to 2^22 so
    int32 cannot overflow, and the float scaling is the same two IEEE operations in every path (the
    extension is built with -ffp-contract=off), so all paths agree bit for bit, and row m never
    depends on the other rows (batch invariance). w_scale is per output row so fused projections
    (q|k|v, gate|up) can run as one call.

Paths and threads
    "portable" C always; "avx2", "avx512bw" and "avx512vnni" when the CPU has them (run-time check; one
    build runs on any x86-64). The best one is used unless BITNET_GRPC_KERNEL or set_kernel_path()
    names another. Output rows are split into a few contiguous ranges per thread and run on a small
    pool of worker threads plus the calling thread (ternary_pool.c); set_num_threads() sets how many
    threads (default os.cpu_count(), at most 256), and calls too small to pay for waking a thread run
    on one. Unlike an OpenMP region, a call never waits for a worker that has not started: when
    other processes keep the cores busy it slows towards one-thread speed instead of waiting
    scheduler slices. Calls from several Python threads at once are safe (one of them uses the pool,
    the others run on their own thread). The LUT layout runs plain C when the path is "portable",
    else its AVX-512BW kernel. The pool is shared with floatops (task_pool.h).
    bitlinear_into (the model's call) reads its arguments through the buffer protocol and checks them
    in C, and releases the GIL once; with the LUT layout the rows are quantised inside the matmul's
    own tasks, each by the thread that builds their tables, so a row holding NaN or infinity is
    reported after the matmul (`out` then holds garbage).

Small matrices (the default model: 512x256, 256x256, 1536x256, 256x768; benchmarks/kernels.py
--models small). A call is 0.5-30 us, so fixed costs weigh: about 0.3 us of argument handling (1.0
with typed memoryview arguments), quantisation about 40 ns a row of 256, the LUT tables 10-15% of a
call with N = 256 (each table serves only N / 32 lookups). One thread, bitlinear_into, us per call
at M = 1 / 4 / 16 / 32, LUT: 512x256 1.4 / 3.3 / 11.4 / 22; 256x256 1.0 / 2.2 / 7.0 / 13.5;
1536x256 2.6 / 7.6 / 29 / 58; 256x768 2.0 / 5.4 / 20.6 / 39. The 2-bit (vpdpbusd) kernel takes
1.6-1.7x the LUT's time at M = 1 and 0.9-1.6x at M >= 4: no table cost (it wins on 256x768), but its
4x4 tiles end in horizontal sums that weigh when K is a single block. Two threads help from about
M = 8 (M = 16: 1.5-1.8x when the second core is free).

Speed on the development machine (AMD EPYC Zen 4, 3.6 GHz, 2 vCPUs shared with other jobs)
    Instruction throughput, one core, microbenchmark: vpdpbusd zmm 1.0/cycle (64 u8 x s8 multiply-adds),
    vpdpbusd ymm 2.0/cycle (also 64), vpmaddubsw zmm 1.0/cycle and ymm 2.0/cycle (64, and only int16
    results); vpmaddubsw + vpaddw pairs 0.71/cycle (zmm) and 1.64/cycle (ymm): 45 and 52 per cycle, so
    int16 accumulation cannot beat vpdpbusd. Every multiplier shares the same two pipes: 64
    multiply-adds per cycle is the ceiling of any multiply kernel (230 G/s). vpermw + vpaddw pairs run
    at 0.80-0.82/cycle = 77-79 weight multiply-adds per cycle (96 per lookup); the LUT kernel's inner
    loop of four activation rows reaches 77 in L1 (277 G/s), the whole call 230-240 G/s on one thread.
    benchmarks/kernels.py, 2B4T shapes, one thread, CPU clock, G weights/s = GOPS / 2, weights hot in
    cache / cold from RAM: M = 32: LUT 198-237 / 190-228, 2-bit (vpdpbusd) 194-207 / 186-208;
    M = 1: LUT 108-136 / 71-97, 2-bit 124-180 / 53-83. Two threads (p10 of wall time, load about 1):
    M = 32 LUT 300-470 / 270-420, 2-bit 360-400 / 330-380; M = 1 LUT 156-253 / 51-149, 2-bit 215-313 /
    79-175. Time per row at M = 1 over time per row at M = 32 (the batching gain): one thread 1.65-1.83
    in cache and 2.2-2.8 from RAM (LUT), 1.15-1.6 and 2.4-3.5 (2-bit); two threads 1.6-2.3 and 2.9-5.3
    (LUT; the 5x only where its own single-row calls are slow, 2.9 against the 2-bit kernel's). A 4x
    gain on one core would need M = 32 above 4 x 140 G/s in cache or 4 x 80 G/s from RAM: past both
    ceilings above. Decode of a 730M model: LUT and 2-bit within noise; prefill +14% (1 thread).
"""

import os
import sys

import numpy as np

from cpython.buffer cimport (PyBUF_RECORDS, PyBUF_RECORDS_RO, PyBUF_STRIDES, PyBUF_WRITABLE, PyBuffer_Release,
                             PyObject_GetBuffer)
from cpython.pycapsule cimport PyCapsule_New
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint16_t


cdef extern from *:
    """
    static inline void _buffer_clear(Py_buffer *v) { v->obj = NULL; }
    static inline int _buffer_held(const Py_buffer *v) { return v->obj != NULL; }
    """
    void _buffer_clear(Py_buffer *v) noexcept
    bint _buffer_held(const Py_buffer *v) noexcept


cdef extern from "task_pool.h" nogil:
    int TQ_MAX_THREADS
    const char *TQ_POOL_CAPSULE


cdef extern from "ternary_kernels.h" nogil:
    int TQ_N_PATHS
    void tq_parallel(int64_t n_tasks, void (*task)(void *ctx, int64_t i, int thread) noexcept nogil, void *ctx,
                     int n_threads)

    ctypedef struct tq_gemm_args:
        const int8_t *xq
        int64_t x_stride
        const float *x_scale
        const int32_t *x_sum
        const uint8_t *w
        int64_t w_stride
        const float *w_scale
        float *out
        int64_t out_stride
        int64_t M
        int64_t N
        int64_t n_blocks

    int tq_path_available(int path)
    const char *tq_path_name(int path)
    int tq_best_path()
    void tq_gemm(const tq_gemm_args *a, int path, int n_threads)
    int64_t tq_quantize_rows(const float *x, int64_t x_stride, int64_t M, int64_t K, int64_t Kp,
                             int8_t *xq, int64_t xq_stride, float *x_scale, int32_t *x_sum, int path,
                             int n_threads)
    int64_t tq_pack(const int8_t *codes, int64_t N, int64_t K, int64_t Kp, uint8_t *packed, int n_threads)
    int64_t tq_unpack(const uint8_t *packed, int64_t N, int64_t K, int64_t Kp, int8_t *codes,
                      int n_threads)
    int64_t tq_ternarize(const float *w, int64_t N, int64_t K, int8_t *codes, float *scale,
                         double *row_sums, int n_threads)

    int TQ_PATH_PORTABLE
    int TQ_LUT_ROWS
    ctypedef struct tq_lut_args:
        const int8_t *xq
        int64_t x_stride
        const float *x_scale
        const uint16_t *w
        const float *w_scale
        float *out
        int64_t out_stride
        int64_t M
        int64_t N
        int64_t Kp
    ctypedef int (*tq_quantize_row_fn)(const float *row, int64_t K, int64_t Kp, int8_t *q, float *scale,
                                       int32_t *sum)
    tq_quantize_row_fn tq_quantize_row_fn_for(int path)
    ctypedef struct tq_lut_quantize:
        const float *x
        int64_t x_stride
        int64_t K
        int32_t *x_sum
        tq_quantize_row_fn row_fn
    int64_t tq_bitlinear_lut(const tq_lut_args *a, const tq_lut_quantize *quant, int simd, int n_threads)
    int64_t tq_pack_lut(const uint8_t *packed, int64_t N, int64_t Kp, uint16_t *lut, int n_threads)
    int tq_lut_simd_available()
    int tq_gemm_lut(const tq_lut_args *a, int simd, int n_threads)


BLOCK = 256
MAX_K = 1 << 22  # int32 accumulators cannot overflow below this (see module docstring)
MAX_THREADS = TQ_MAX_THREADS
LUT_ROWS = TQ_LUT_ROWS  # weight rows per group of the LUT layout

cdef int _num_threads = min(MAX_THREADS, max(1, os.cpu_count() or 1))
cdef int _path = 0

# The worker pool (ternary_pool.c) for the other kernel extension, floatops: one pool per process.
_POOL_CAPSULE = PyCapsule_New(<void *>tq_parallel, TQ_POOL_CAPSULE, NULL)


def padded_k(k: int) -> int:
    """K rounded up to a whole number of 256-weight blocks: the packed and quantised row length."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return (k + BLOCK - 1) // BLOCK * BLOCK


# ------------------------------------------------------------------------------------ configuration


def set_num_threads(n: int) -> None:
    """Threads used by every kernel call from now on (the server's --threads)."""
    global _num_threads
    n = int(n)
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(f"number of threads must be >= 1 and <= {MAX_THREADS}, got {n}")
    _num_threads = n


def get_num_threads() -> int:
    return _num_threads


def kernel_paths() -> list[str]:
    """Names of the matmul implementations this CPU can run, slowest first."""
    return [tq_path_name(p).decode() for p in range(TQ_N_PATHS) if tq_path_available(p)]


def get_kernel_path() -> str:
    return tq_path_name(_path).decode()


def set_kernel_path(name: str) -> None:
    """Force one matmul implementation ("auto" = the best available), e.g. to compare them in tests."""
    global _path
    if name == "auto":
        _path = tq_best_path()
        return
    for p in range(TQ_N_PATHS):
        if tq_path_name(p).decode() == name:
            if not tq_path_available(p):
                raise ValueError(f"kernel path {name!r} is not supported by this CPU; available: {kernel_paths()}")
            _path = p
            return
    known = [tq_path_name(p).decode() for p in range(TQ_N_PATHS)]
    raise ValueError(f"unknown kernel path {name!r}; known: {known + ['auto']}, available: {kernel_paths()}")


set_kernel_path(os.environ.get("BITNET_GRPC_KERNEL") or "auto")


# --------------------------------------------------------------------------------------- validation


def _check(name: str, a, dtype, ndim: int):
    """Return `a` as an ndarray after checking type, dtype and rank, so errors name the argument."""
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise ValueError(f"{name} must have dtype {np.dtype(dtype).name}, got {a.dtype.name}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    return a


def _check_rows(name: str, a) -> None:
    """Kernels walk rows with a stride but need each row's elements contiguous."""
    if a.size == 0:
        return
    if a.shape[1] > 1 and a.strides[1] != a.itemsize:
        raise ValueError(f"{name} rows must be contiguous (inner stride {a.itemsize}), got strides {a.strides}")
    if a.shape[0] > 1 and a.strides[0] % a.itemsize:
        raise ValueError(f"{name} row stride {a.strides[0]} is not a multiple of its item size")


def _empty_aligned(shape, dtype) -> np.ndarray:
    """np.empty with the data at a 64-byte boundary: the kernels load weights 64 bytes at a time, and
    loads that straddle two cache lines cost up to 25% in the table-lookup kernel."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = np.empty(nbytes + 64, np.uint8)
    start = (-buf.ctypes.data) % 64
    return buf[start : start + nbytes].view(dtype).reshape(shape)


def _check_output(name: str, a, dtype, shape: tuple) -> None:
    """An output array must be written in place: right type and shape, writeable, never copied."""
    _check(name, a, dtype, len(shape))
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    if not a.flags.writeable:
        raise ValueError(f"{name} is read-only")
    if len(shape) == 1 and shape[0] > 1 and a.strides[0] != a.itemsize:
        raise ValueError(f"{name} must be contiguous, got stride {a.strides[0]}")


def _check_vector(name: str, a, dtype, length: int):
    a = _check(name, a, dtype, 1)
    if a.shape[0] != length:
        raise ValueError(f"{name} must have length {length}, got {a.shape[0]}")
    return np.ascontiguousarray(a)


# ---------------------------------------------------------------------------------------- kernels


def ternarize(w) -> tuple[np.ndarray, float]:
    """Absmean ternarisation of float32 weights [N, K] -> (int8 codes in {-1, 0, 1}, scale)."""
    w = np.ascontiguousarray(_check("w", w, np.float32, 2))
    cdef int64_t N = w.shape[0], K = w.shape[1]
    if N * K == 0:
        raise ValueError(f"w is empty (shape {w.shape})")
    codes = np.empty((N, K), dtype=np.int8)
    row_sums = np.empty(N, dtype=np.float64)
    cdef const float[:, ::1] wv = w
    cdef int8_t[:, ::1] cv = codes
    cdef double[::1] rs = row_sums
    cdef float scale = 0
    cdef int64_t bad
    cdef int nt = _num_threads
    with nogil:
        bad = tq_ternarize(&wv[0, 0], N, K, &cv[0, 0], &scale, &rs[0], nt)
    if bad >= 0:
        raise ValueError(f"w[{bad // K}, {bad % K}] is {w[bad // K, bad % K]}: weights must be finite")
    return codes, float(scale)


def pack_ternary(codes) -> np.ndarray:
    """int8 codes [N, K] in {-1, 0, 1} -> packed uint8 [N, padded_k(K) // 4] (layout: module doc)."""
    codes = np.ascontiguousarray(_check("codes", codes, np.int8, 2))
    cdef int64_t N = codes.shape[0], K = codes.shape[1]
    cdef int64_t Kp = padded_k(K)
    if Kp > MAX_K:
        raise ValueError(f"K = {K} exceeds the supported maximum {MAX_K}")
    packed = _empty_aligned((N, Kp // 4), np.uint8)
    if N == 0 or Kp == 0:
        return packed
    cdef const int8_t[:, ::1] cv = codes
    cdef uint8_t[:, ::1] pv = packed
    cdef int64_t bad
    cdef int nt = _num_threads
    with nogil:
        bad = tq_pack(&cv[0, 0], N, K, Kp, &pv[0, 0], nt)
    if bad >= 0:
        raise ValueError(f"codes[{bad // K}, {bad % K}] = {codes[bad // K, bad % K]} is not in {{-1, 0, 1}}")
    return packed


def unpack_ternary(packed, k: int) -> np.ndarray:
    """Inverse of pack_ternary: packed uint8 [N, padded_k(k) // 4] -> int8 codes [N, k]."""
    packed = np.ascontiguousarray(_check("packed", packed, np.uint8, 2))
    cdef int64_t N = packed.shape[0], K = k
    cdef int64_t Kp = packed.shape[1] * 4
    if padded_k(k) != Kp:
        raise ValueError(f"packed rows hold {Kp} weights but k = {k} needs {padded_k(k)}")
    codes = np.empty((N, K), dtype=np.int8)
    if N == 0 or K == 0:
        return codes
    cdef const uint8_t[:, ::1] pv = packed
    cdef int8_t[:, ::1] cv = codes
    cdef int64_t bad
    cdef int nt = _num_threads
    with nogil:
        bad = tq_unpack(&pv[0, 0], N, K, Kp, &cv[0, 0], nt)
    if bad >= 0:
        raise ValueError(f"packed[{bad // (Kp // 4)}, {bad % (Kp // 4)}] holds the invalid code 3")
    return codes


def quantize_rows(x, xq=None, x_scale=None, x_sum=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 activations [M, K] -> (xq int8 [M, padded_k(K)], x_scale float32 [M], x_sum int32 [M]).

    Pass all three outputs to fill existing arrays instead of allocating new ones (a decode step
    quantises hundreds of rows a second): xq [M, padded_k(K)] with contiguous rows, x_scale and
    x_sum contiguous [M]. They are returned.
    """
    _check("x", x, np.float32, 2)
    _check_rows("x", x)
    cdef int64_t M = x.shape[0], K = x.shape[1]
    cdef int64_t Kp = padded_k(K)
    given = (xq is not None) + (x_scale is not None) + (x_sum is not None)
    if given == 0:
        xq = np.empty((M, Kp), dtype=np.int8)
        x_scale = np.empty(M, dtype=np.float32)
        x_sum = np.empty(M, dtype=np.int32)
    elif given == 3:
        _check_output("xq", xq, np.int8, (M, Kp))
        _check_rows("xq", xq)
        if M > 1 and xq.strides[0] < Kp:
            raise ValueError(f"xq rows overlap (row stride {xq.strides[0]} for {Kp} columns)")
        _check_output("x_scale", x_scale, np.float32, (M,))
        _check_output("x_sum", x_sum, np.int32, (M,))
    else:
        raise ValueError("pass all of xq, x_scale and x_sum, or none of them")
    if M > 0:
        _quantize_into(x, xq, x_scale, x_sum)
    return xq, x_scale, x_sum


cdef _quantize_into(x, xq, x_scale, x_sum):
    cdef const float[:, :] xv = x
    cdef int8_t[:, :] qv = xq
    cdef float[:] sv = x_scale
    cdef int32_t[:] tv = x_sum
    _quantize_views(xv, qv, sv, tv, xv.shape[0], xv.shape[1], padded_k(xv.shape[1]))


cdef int _quantize_views(const float[:, :] x, int8_t[:, :] xq, float[:] x_scale, int32_t[:] x_sum,
                         int64_t M, int64_t K, int64_t Kp) except -1:
    """Quantise rows 0..M-1 of x into the leading M rows and Kp columns of xq (rows contiguous)."""
    cdef int64_t bad
    cdef int nt = _num_threads, path = _path
    with nogil:
        bad = tq_quantize_rows(&x[0, 0], x.strides[0] // 4, M, K, Kp, &xq[0, 0], xq.strides[0], &x_scale[0],
                               &x_sum[0], path, nt)
    if bad >= 0:
        raise ValueError(f"x row {bad} contains NaN or infinity")
    return 0


def _lut_groups(n: int) -> int:
    return (n + LUT_ROWS - 1) // LUT_ROWS


def _check_weights(packed, n_expected, Kp: int) -> tuple[int, bool]:
    """(N, is_lut) of the weights in either layout, checked against Kp input columns; for the LUT layout
    N is not in the array's shape and comes from `n_expected` (w_scale's length)."""
    if isinstance(packed, np.ndarray) and packed.dtype == np.uint16:
        _check("packed", packed, np.uint16, 1)
        n = n_expected
        if packed.shape[0] != lut_size(n, Kp):
            raise ValueError(f"LUT weights for {n} rows of {Kp} must have {lut_size(n, Kp)} words, got {packed.shape[0]}")
        if not packed.flags.c_contiguous:
            raise ValueError("LUT weights must be contiguous")
        return n, True
    _check("packed", packed, np.uint8, 2)
    if packed.shape[1] * 4 != Kp:
        raise ValueError(f"shape mismatch: xq has {Kp} columns but packed rows hold {packed.shape[1] * 4} weights")
    _check_rows("packed", packed)
    return packed.shape[0], False


def ternary_matmul(xq, x_scale, x_sum, packed, w_scale, out) -> np.ndarray:
    """out[m, n] = ((float)(xq[m] . w[n]) / x_scale[m]) * w_scale[n], exact int32 dot products.

    xq int8 [M, Kp], x_scale float32 [M], x_sum int32 [M] (= xq.sum(1), as quantize_rows returns),
    packed uint8 [N, Kp // 4] or its LUT layout (pack_lut), w_scale float32 [N], out float32 [M, N]
    (rows may be a strided view, e.g. a column slice of a bigger buffer). Returns out.
    """
    _check("xq", xq, np.int8, 2)
    _check("out", out, np.float32, 2)
    cdef int64_t M = xq.shape[0], Kp = xq.shape[1]
    if Kp % BLOCK:
        raise ValueError(f"xq has {Kp} columns, not a multiple of {BLOCK}: quantise with quantize_rows")
    if Kp > MAX_K:
        raise ValueError(f"K = {Kp} exceeds the supported maximum {MAX_K}")
    N, is_lut = _check_weights(packed, _check("w_scale", w_scale, np.float32, 1).shape[0], Kp)
    if out.shape[0] != M or out.shape[1] != N:
        raise ValueError(f"out must have shape ({M}, {N}), got {out.shape}")
    _check_rows("xq", xq)
    _check_rows("out", out)
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    if M > 1 and out.strides[0] < N * 4:
        raise ValueError(f"out rows overlap (row stride {out.strides[0]} bytes for {N} columns)")
    x_scale = _check_vector("x_scale", x_scale, np.float32, M)
    x_sum = _check_vector("x_sum", x_sum, np.int32, M)
    w_scale = _check_vector("w_scale", w_scale, np.float32, N)
    if M == 0 or N == 0:
        return out
    if is_lut:
        _matmul_lut(xq, x_scale, packed, w_scale, out)
    else:
        _matmul(xq, x_scale, x_sum, packed, w_scale, out)
    return out


cdef _matmul(xq, x_scale, x_sum, packed, w_scale, out):
    cdef const int8_t[:, :] xv = xq
    cdef const float[::1] xs = x_scale
    cdef const int32_t[::1] xt = x_sum
    cdef const uint8_t[:, :] pv = packed
    cdef const float[::1] ws = w_scale
    cdef float[:, :] ov = out
    _gemm(xv, xs, xt, pv, ws, ov, xv.shape[0], xv.shape[1])


cdef _matmul_lut(xq, x_scale, lut, w_scale, out):
    cdef const int8_t[:, :] xv = xq
    cdef const float[::1] xs = x_scale
    cdef const uint16_t[::1] lv = lut
    cdef const float[::1] ws = w_scale
    cdef float[:, :] ov = out
    _gemm_lut(xv, xs, lv, ws, ov, xv.shape[0], xv.shape[1])


cdef int _gemm(const int8_t[:, :] xq, const float[:] x_scale, const int32_t[:] x_sum, const uint8_t[:, :] packed,
               const float[:] w_scale, float[:, :] out, int64_t M, int64_t Kp) except -1:
    """The 2-bit matmul of the leading M rows of xq (Kp columns) into out [M, N]; shapes checked."""
    cdef tq_gemm_args a
    a.M = M
    a.N = packed.shape[0]
    a.n_blocks = Kp // BLOCK
    a.xq = &xq[0, 0] if a.n_blocks > 0 else NULL
    a.x_stride = xq.strides[0]
    a.x_scale = &x_scale[0]
    a.x_sum = &x_sum[0]
    a.w = &packed[0, 0] if a.n_blocks > 0 else NULL
    a.w_stride = packed.strides[0]
    a.w_scale = &w_scale[0]
    a.out = &out[0, 0]
    a.out_stride = out.strides[0] // 4
    cdef int path = _path, nt = _num_threads
    with nogil:
        tq_gemm(&a, path, nt)
    return 0


cdef int _gemm_lut(const int8_t[:, :] xq, const float[:] x_scale, const uint16_t[::1] lut,
                   const float[:] w_scale, float[:, :] out, int64_t M, int64_t Kp) except -1:
    """The LUT-layout matmul of the leading M rows of xq (Kp columns) into out [M, N]; shapes checked."""
    cdef tq_lut_args a
    a.M = M
    a.N = w_scale.shape[0]
    a.Kp = Kp
    a.xq = &xq[0, 0] if Kp > 0 else NULL
    a.x_stride = xq.strides[0]
    a.x_scale = &x_scale[0]
    a.w = &lut[0] if Kp > 0 else NULL
    a.w_scale = &w_scale[0]
    a.out = &out[0, 0]
    a.out_stride = out.strides[0] // 4
    cdef int simd = _path != TQ_PATH_PORTABLE, nt = _num_threads, status
    with nogil:
        status = tq_gemm_lut(&a, simd, nt)
    if status != 0:
        raise MemoryError("no memory for the lookup tables of the LUT kernel")
    return 0


def pack_lut(packed) -> np.ndarray:
    """2-bit packed weights [N, Kp // 4] -> the LUT layout: uint16 [lut_size(N, Kp)], flat.

    Holds the same weights in 1.78 bits each, for the table-lookup kernel (ternary_lut.c: layout and
    why it is faster on AVX-512BW CPUs). ternary_matmul, bitlinear and bitlinear_into take either
    layout; with this one N is the length of w_scale.
    """
    packed = np.ascontiguousarray(_check("packed", packed, np.uint8, 2))
    cdef int64_t N = packed.shape[0], Kp = packed.shape[1] * 4
    if Kp > MAX_K:
        raise ValueError(f"K = {Kp} exceeds the supported maximum {MAX_K}")
    lut = _empty_aligned((lut_size(N, Kp),), np.uint16)
    if lut.size == 0:
        return lut
    cdef const uint8_t[:, ::1] pv = packed
    cdef uint16_t[::1] lv = lut
    cdef int64_t bad
    cdef int nt = _num_threads
    with nogil:
        bad = tq_pack_lut(&pv[0, 0], N, Kp, &lv[0], nt)
    if bad == -2:
        raise MemoryError("no memory to convert the weights to the LUT layout")
    if bad >= 0:
        raise ValueError(f"packed[{bad // (Kp // 4)}, {bad % (Kp // 4)}] holds the invalid code 3")
    return lut


def lut_words(kp: int) -> int:
    """16-bit index words per weight row of the LUT layout for Kp (padded) input columns: 9 weights each."""
    return (kp + 8) // 9


def lut_size(n: int, kp: int) -> int:
    """uint16 elements of the LUT layout of N rows of Kp weights: rows in groups of 32."""
    return _lut_groups(n) * lut_words(kp) * LUT_ROWS


def lut_preferred() -> bool:
    """Whether a model should keep its weights in the LUT layout: True when this CPU runs the LUT
    kernel's SIMD path (AVX-512BW), where it beats the 2-bit kernels with 11% fewer weight bytes,
    unless the environment sets BITNET_GRPC_LAYOUT=2bit. Elsewhere the LUT layout works (plain C) but
    the 2-bit layout is faster."""
    layout = os.environ.get("BITNET_GRPC_LAYOUT", "auto")
    if layout not in ("auto", "lut", "2bit"):
        raise ValueError(f"BITNET_GRPC_LAYOUT must be auto, lut or 2bit, got {layout!r}")
    return layout == "lut" or (layout == "auto" and tq_lut_simd_available() != 0)


def bitlinear(x, packed, w_scale, out=None) -> np.ndarray:
    """BitLinear forward: quantise float32 x [M, K] per row, then ternary_matmul -> float32 [M, N]."""
    _check("x", x, np.float32, 2)
    n = w_scale.shape[0] if isinstance(packed, np.ndarray) and packed.dtype == np.uint16 else None
    if n is None:
        _check("packed", packed, np.uint8, 2)
        n = packed.shape[0]
        if padded_k(x.shape[1]) != packed.shape[1] * 4:
            raise ValueError(
                f"shape mismatch: x has {x.shape[1]} columns but packed rows hold {packed.shape[1] * 4} weights"
            )
    xq, x_scale, x_sum = quantize_rows(x)
    if out is None:
        out = np.empty((x.shape[0], n), dtype=np.float32)
    return ternary_matmul(xq, x_scale, x_sum, packed, w_scale, out)


cdef inline bint _rows_contiguous(Py_ssize_t cols, Py_ssize_t inner_stride, Py_ssize_t itemsize) noexcept:
    return cols <= 1 or inner_stride == itemsize


cdef inline int64_t _lut_size_c(int64_t n, int64_t kp) noexcept:
    return (n + TQ_LUT_ROWS - 1) // TQ_LUT_ROWS * ((kp + 8) // 9) * TQ_LUT_ROWS


cdef const char *_FORMAT_B = "B"  # a buffer without a format holds unsigned bytes
cdef char _NATIVE_ORDER = b"<"[0] if sys.byteorder == "little" else b">"[0]


cdef int _acquire(object obj, Py_buffer *view, const char *name, bint writable) except -1:
    """view = obj's buffer with strides and format (the caller releases it once view.obj is set)."""
    try:
        PyObject_GetBuffer(obj, view, PyBUF_RECORDS if writable else PyBUF_RECORDS_RO)
    except Exception as e:
        what = "a writeable buffer" if writable else "a buffer"
        raise ValueError(f"{name.decode()} must be {what} ({e})") from None
    return 0


cdef int _check_buffer(Py_buffer *view, const char *name, char code, Py_ssize_t itemsize, int ndim) except -1:
    """The buffer must hold `ndim`-D items of struct code `code` in native byte order."""
    cdef const char *f = view.format
    if f == NULL:
        f = _FORMAT_B
    if f[0] == b"@"[0] or f[0] == b"="[0] or f[0] == _NATIVE_ORDER:
        f += 1
    if f[0] != code or f[1] != 0 or view.itemsize != itemsize or view.ndim != ndim:
        fmt = view.format.decode() if view.format != NULL else "B"
        raise ValueError(
            f"{name.decode()} must be {ndim}-D with items of type {chr(code)!r}, got {view.ndim}-D of {fmt!r}"
        )
    return 0


cdef object _NDARRAY = np.ndarray
cdef object _DT_F32 = np.dtype(np.float32)
cdef object _DT_I8 = np.dtype(np.int8)
cdef object _DT_I32 = np.dtype(np.int32)
cdef object _DT_U8 = np.dtype(np.uint8)
cdef object _DT_U16 = np.dtype(np.uint16)


cdef inline int _get_buffer(object obj, Py_buffer *view, const char *name, char code, Py_ssize_t itemsize, int ndim,
                            bint writable, object dtype) except -1:
    """view = obj's buffer, checked. A numpy array of exactly `dtype` (the builtin descriptor: native
    byte order) skips the format string, which numpy rebuilds and compares on every export."""
    if type(obj) is _NDARRAY and (<object>obj).dtype is dtype:
        try:
            PyObject_GetBuffer(obj, view, PyBUF_STRIDES | PyBUF_WRITABLE if writable else PyBUF_STRIDES)
        except Exception as e:
            what = "a writeable buffer" if writable else "a buffer"
            raise ValueError(f"{name.decode()} must be {what} ({e})") from None
        if view.ndim != ndim:
            raise ValueError(f"{name.decode()} must be {ndim}-D, got {view.ndim}-D")
        return 0
    _acquire(obj, view, name, writable)
    return _check_buffer(view, name, code, itemsize, ndim)


def bitlinear_into(x, weights, w_scale, xq, x_scale, x_sum, out) -> None:
    """out = bitlinear(x, weights, w_scale), quantising into caller-owned scratch; allocates nothing.

    The per-projection entry of the forward pass: one call, checks in C on the arguments' buffers (no
    memoryview objects, no Python-level calls), one release of the GIL for quantisation and matmul.
    x float32 [M, K]; weights: packed uint8 [N, Kp // 4] or the LUT layout (pack_lut, uint16, 1-D);
    w_scale float32 [N]. Scratch may be larger than this call needs (one set serves every
    projection): the leading M rows and padded_k(K) columns of xq (int8), and the leading M entries
    of x_scale (float32) and x_sum (int32), are overwritten. out float32 [M, N]. Rows of x, xq,
    packed and out must be contiguous (row strides are free); w_scale, x_scale and x_sum contiguous.
    """
    cdef Py_buffer views[7]
    cdef int i
    for i in range(7):
        _buffer_clear(&views[i])
    try:
        _bitlinear_into(x, weights, w_scale, xq, x_scale, x_sum, out, &views[0], &views[1], &views[2], &views[3],
                        &views[4], &views[5], &views[6])
    finally:
        for i in range(7):
            _release(&views[i])


cdef inline void _release(Py_buffer *view) noexcept:
    if _buffer_held(view):
        PyBuffer_Release(view)


cdef int _bitlinear_into(x, weights, w_scale, xq, x_scale, x_sum, out, Py_buffer *bx, Py_buffer *bw,
                         Py_buffer *bs, Py_buffer *bq, Py_buffer *bxs, Py_buffer *bxt, Py_buffer *bo) except -1:
    _get_buffer(x, bx, b"x", b"f"[0], 4, 2, False, _DT_F32)
    cdef bint is_lut
    wdt = (<object>weights).dtype if type(weights) is _NDARRAY else None
    if wdt is _DT_U16 or wdt is _DT_U8:
        is_lut = wdt is _DT_U16
        _get_buffer(weights, bw, b"LUT weights" if is_lut else b"packed", b"H"[0] if is_lut else b"B"[0],
                    2 if is_lut else 1, 1 if is_lut else 2, False, wdt)
    else:
        _acquire(weights, bw, b"weights", False)
        is_lut = bw.ndim == 1
        if is_lut:
            _check_buffer(bw, b"LUT weights", b"H"[0], 2, 1)
        else:
            _check_buffer(bw, b"packed", b"B"[0], 1, 2)
    _get_buffer(w_scale, bs, b"w_scale", b"f"[0], 4, 1, False, _DT_F32)
    _get_buffer(xq, bq, b"xq", b"b"[0], 1, 2, True, _DT_I8)
    _get_buffer(x_scale, bxs, b"x_scale", b"f"[0], 4, 1, True, _DT_F32)
    _get_buffer(x_sum, bxt, b"x_sum", b"i"[0], 4, 1, True, _DT_I32)
    _get_buffer(out, bo, b"out", b"f"[0], 4, 2, True, _DT_F32)
    cdef int64_t M = bx.shape[0], K = bx.shape[1], N = bs.shape[0]
    cdef int64_t Kp = (K + BLOCK - 1) // BLOCK * BLOCK
    if is_lut:
        if bw.shape[0] != _lut_size_c(N, Kp):
            raise ValueError(
                f"LUT weights for {N} rows of {Kp} must have {_lut_size_c(N, Kp)} words, got {bw.shape[0]}"
            )
        if bw.shape[0] > 1 and bw.strides[0] != 2:
            raise ValueError("LUT weights must be contiguous")
    else:
        if bw.shape[1] * 4 != Kp:
            raise ValueError(f"shape mismatch: x has {K} columns but packed rows hold {bw.shape[1] * 4} weights")
        if bw.shape[0] != N:
            raise ValueError(f"w_scale must have length {bw.shape[0]}, got {N}")
        if not _rows_contiguous(Kp // 4, bw.strides[1], 1):
            raise ValueError("rows of x, xq, packed and out must be contiguous")
    if Kp > MAX_K:
        raise ValueError(f"K = {K} exceeds the supported maximum {MAX_K}")
    if bo.shape[0] != M or bo.shape[1] != N:
        raise ValueError(f"out must have shape ({M}, {N}), got ({bo.shape[0]}, {bo.shape[1]})")
    if bq.shape[0] < M or bq.shape[1] < Kp or bxs.shape[0] < M or bxt.shape[0] < M:
        raise ValueError(
            f"scratch too small for {M} rows of {Kp}: xq ({bq.shape[0]}, {bq.shape[1]}), "
            f"x_scale ({bxs.shape[0]},), x_sum ({bxt.shape[0]},)"
        )
    if not (_rows_contiguous(K, bx.strides[1], 4) and _rows_contiguous(Kp, bq.strides[1], 1)
            and _rows_contiguous(N, bo.strides[1], 4)):
        raise ValueError("rows of x, xq, packed and out must be contiguous")
    if (N > 1 and bs.strides[0] != 4) or (M > 1 and (bxs.strides[0] != 4 or bxt.strides[0] != 4)):
        raise ValueError("w_scale, x_scale and x_sum must be contiguous")
    if bx.strides[0] % 4 or bo.strides[0] % 4:
        raise ValueError("row strides of x and out must be multiples of 4 bytes")
    if (M > 1 and bq.strides[0] < Kp) or (M > 1 and bo.strides[0] < N * 4):
        raise ValueError("rows of xq or out overlap")
    if M == 0 or N == 0:
        return 0
    cdef tq_gemm_args g
    cdef tq_lut_args l
    cdef tq_lut_quantize lq
    cdef int path = _path, nt = _num_threads, status = 0
    cdef int64_t bad
    cdef int8_t *q = <int8_t *>bq.buf
    cdef float *xs = <float *>bxs.buf
    cdef int32_t *xt = <int32_t *>bxt.buf
    if is_lut:
        l.M = M
        l.N = N
        l.Kp = Kp
        l.xq = q
        l.x_stride = bq.strides[0]
        l.x_scale = xs
        l.w = <const uint16_t *>bw.buf
        l.w_scale = <const float *>bs.buf
        l.out = <float *>bo.buf
        l.out_stride = bo.strides[0] // 4
        lq.x = <const float *>bx.buf
        lq.x_stride = bx.strides[0] // 4
        lq.K = K
        lq.x_sum = xt
        lq.row_fn = tq_quantize_row_fn_for(path)
    else:
        g.M = M
        g.N = N
        g.n_blocks = Kp // BLOCK
        g.xq = q
        g.x_stride = bq.strides[0]
        g.x_scale = xs
        g.x_sum = xt
        g.w = <const uint8_t *>bw.buf
        g.w_stride = bw.strides[0]
        g.w_scale = <const float *>bs.buf
        g.out = <float *>bo.buf
        g.out_stride = bo.strides[0] // 4
    with nogil:
        if is_lut:  # quantised inside the matmul's tasks, by the threads that use the rows
            bad = tq_bitlinear_lut(&l, &lq, path != TQ_PATH_PORTABLE, nt)
            status = bad == -2
        else:
            bad = tq_quantize_rows(<const float *>bx.buf, bx.strides[0] // 4, M, K, Kp, q, bq.strides[0], xs, xt,
                                   path, nt)
            if bad < 0:
                tq_gemm(&g, path, nt)
    if status != 0:
        raise MemoryError("no memory for the lookup tables of the LUT kernel")
    if bad >= 0:
        raise ValueError(f"x row {bad} contains NaN or infinity")
    return 0
