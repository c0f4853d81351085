"""Drawing the next tokens of a batch from their logits rows, without the GIL.

The scheduler draws one token per sequence every step. In numpy that was a dozen small calls per step
plus a float64 copy of every row, all on the engine thread while it holds the GIL that the gRPC threads
also need. Here each row takes three passes over its logits (maximum; weights e^((x - max) / T);
block sums and the pick) in C, rows spread over the kernels' worker pool.

The order of every operation is fixed (sampling_kernels.h), so a row's token depends only on its
logits, its temperature and its uniform number: never on the batch, the thread count or the path
(portable C or AVX-512). ``bitnet_grpc.cyext.reference.draw_row`` and ``row_weights`` are the numpy
references.
"""

from libc.stdint cimport int64_t

import numpy as np

from bitnet_grpc.cyext import floatops as _floatops

include "task_pool.pxi"


cdef extern from "sampling_kernels.h" nogil:
    int FS_BLOCK
    int fs_best_path()
    int fs_select_path(int path)
    int fs_current_path()
    float fs_exp_neg(float z)
    float fs_row_weights(const float *x, int64_t n, float inv_t, float *weights, double *block_sums)
    int64_t fs_draw_row(const float *x, int64_t n, float inv_t, double u, float *weights, double *block_sums)


BLOCK = FS_BLOCK
_PATH_NAMES = ("portable", "avx512")
# Batches of at least this many logits (rows x vocabulary) are spread over the pool, a row per task
# (one row of 4096 takes about 3 us).
cdef Py_ssize_t _PARALLEL_MIN = 1 << 14

fs_select_path(fs_best_path())


def kernel_paths() -> list:
    """Paths this CPU can run; all give identical tokens, they differ only in speed."""
    return list(_PATH_NAMES[: fs_best_path() + 1])


def get_kernel_path() -> str:
    return _PATH_NAMES[fs_current_path()]


def set_kernel_path(str name) -> None:
    if name not in _PATH_NAMES[: fs_best_path() + 1]:
        raise ValueError(f"kernel path {name!r} not available here; choose from {kernel_paths()}")
    fs_select_path(_PATH_NAMES.index(name))


def _inverse_temperatures(temperatures) -> np.ndarray:
    """float32(1 / T), rounded as IEEE says: +inf when 1 / T is beyond float32 (the draw then takes the
    maximum)."""
    with np.errstate(over="ignore"):
        return (1.0 / np.asarray(temperatures, np.float64)).astype(np.float32)


def row_weights(const float[::1] x, double temperature, float[::1] weights, double[::1] block_sums) -> float:
    """The first passes of a draw on the current path: weights and block sums of one row; returns its
    maximum. (For tests of the definition: the draw itself only returns an index.)"""
    cdef Py_ssize_t n = x.shape[0]
    if n < 1 or weights.shape[0] != n or block_sums.shape[0] != (n + FS_BLOCK - 1) // FS_BLOCK:
        raise ValueError(f"{n} logits need {n} weights and {(n + FS_BLOCK - 1) // FS_BLOCK} block sums")
    return fs_row_weights(&x[0], n, _inverse_temperatures(np.array([temperature]))[0], &weights[0], &block_sums[0])


def exp_neg(const float[::1] z, float[::1] out) -> None:
    """out[i] = e^z[i] for z[i] <= 0, computed as the row kernel does (for tests of the definition)."""
    if out.shape[0] != z.shape[0]:
        raise ValueError(f"out has {out.shape[0]} elements, z has {z.shape[0]}")
    cdef Py_ssize_t i
    for i in range(z.shape[0]):
        out[i] = fs_exp_neg(z[i])


ctypedef struct _DrawJob:
    const float *x
    Py_ssize_t xs, n
    const int64_t *rows
    const float *inv_t
    const double *u
    float *weights
    double *block_sums
    Py_ssize_t n_blocks
    int64_t *out


cdef void _draw_task(void *ctx, int64_t i, int thread) noexcept nogil:
    cdef _DrawJob *j = <_DrawJob *>ctx
    j.out[i] = fs_draw_row(j.x + j.rows[i] * j.xs, j.n, j.inv_t[i], j.u[i],
                           j.weights + thread * j.n, j.block_sums + thread * j.n_blocks)


def draw_rows(const float[:, :] logits, const int64_t[::1] rows, const double[::1] temperatures,
              const double[::1] uniforms, int64_t[::1] out, int threads=0) -> None:
    """out[i] = a token drawn from softmax(logits[rows[i]] / temperatures[i]) with uniforms[i] in [0, 1).

    logits: [batch, vocab] float32, rows contiguous; temperatures > 0; threads 0 = the kernels' count
    (floatops.get_num_threads()).
    """
    cdef Py_ssize_t count = rows.shape[0], n = logits.shape[1], i
    if temperatures.shape[0] != count or uniforms.shape[0] != count or out.shape[0] != count:
        raise ValueError(
            f"rows ({count}), temperatures ({temperatures.shape[0]}), uniforms ({uniforms.shape[0]}) "
            f"and out ({out.shape[0]}) must have the same length"
        )
    cdef Py_ssize_t float_size = sizeof(float)
    if n > 1 and logits.strides[1] != float_size:
        raise ValueError("logits rows must be contiguous")
    if logits.shape[0] > 1 and (logits.strides[0] < n * float_size or logits.strides[0] % float_size):
        raise ValueError(f"logits rows must follow one another in memory, got a row stride of {logits.strides[0]}")
    for i in range(count):
        if rows[i] < 0 or rows[i] >= logits.shape[0]:
            raise ValueError(f"rows[{i}] = {rows[i]} is outside the {logits.shape[0]} logits rows")
        if not temperatures[i] > 0.0:
            raise ValueError(f"temperatures[{i}] must be > 0, got {temperatures[i]}")
        if not 0.0 <= uniforms[i] < 1.0:
            raise ValueError(f"uniforms[{i}] must be in [0, 1), got {uniforms[i]}")
    if count == 0:
        return
    if n == 0:
        raise ValueError("logits rows are empty")
    if threads <= 0:
        threads = _floatops.get_num_threads()
    threads = <int>min(threads, count, TQ_MAX_THREADS)
    if count * n < _PARALLEL_MIN:
        threads = 1
    inv_t = _inverse_temperatures(temperatures)
    n_blocks = (n + FS_BLOCK - 1) // FS_BLOCK
    weights = np.empty(threads * n, np.float32)
    block_sums = np.empty(threads * n_blocks, np.float64)
    cdef const float[::1] it = inv_t
    cdef float[::1] w = weights
    cdef double[::1] bs = block_sums
    cdef _DrawJob job
    job.x, job.xs, job.n, job.rows = &logits[0, 0], logits.strides[0] // float_size, n, &rows[0]
    job.inv_t, job.u, job.weights, job.block_sums = &it[0], &uniforms[0], &w[0], &bs[0]
    job.n_blocks, job.out = n_blocks, &out[0]
    with nogil:
        _parallel(count, _draw_task, &job, threads)
