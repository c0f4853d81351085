# distutils: libraries = m
# (libm by name: the link then binds expf to its current version, not the errno-setting compat wrapper
# an unversioned reference falls back to; both return the same values.)
"""Float kernels of the BitNet forward pass: RMSNorm, rotary embedding, gated activations, attention over
the KV cache, and the output-head matmul.

Why these are not numpy: the engine promises batch invariance (a row's result never depends on the
other rows of the batch) and bit-reproducible logits. numpy's BLAS picks its blocking by shape, so
``x @ W.T`` of one row can differ from the same row inside a batch. Every kernel here computes each row
on its own, in a fixed order (see floatops_kernels.h for the dot-product order), without holding the
GIL. Each has a numpy reference in ``bitnet_grpc.cyext.reference`` (section "float kernels").

Layouts (all float32, C order unless said otherwise):
- activations ``[rows, width]``; row stride may be larger than the width (views into a fused q|k|v
  buffer) but elements within a row must be contiguous;
- KV cache of one layer ``[n_slots, n_kv_heads, ctx, head_dim]``: head-major, so attention streams
  one head's positions from contiguous memory;
- rotary tables ``cos``/``sin`` ``[ctx, head_dim // 2]`` indexed by position.

Threads: the parallel loops (RMSNorm rows, attention heads, output-head blocks) run as tasks on the
ternary extension's worker pool (task_pool.h), not OpenMP: a call never waits for a worker that is
not on a CPU, which on a busy machine cost OpenMP regions milliseconds. Which thread runs a task
never changes its result.
"""

from os import cpu_count

from libc.math cimport expf, sqrt
from libc.stdint cimport int64_t, uint16_t
from libc.string cimport memcpy

import numpy as np

include "task_pool.pxi"


cdef extern from "floatops_kernels.h" nogil:
    int FO_LANES
    int fo_best_path()
    int fo_select_path(int path)
    int fo_current_path()
    int FO_W_F32, FO_W_F16, FO_W_BF16
    float fo_half_to_float(uint16_t h)
    float fo_bf16_to_float(uint16_t h)
    void fo_head_rows(const float *x, Py_ssize_t xs, Py_ssize_t rows, const void *w, Py_ssize_t n_w,
                      int wtype, Py_ssize_t n, float *out, Py_ssize_t os)
    double fo_sum_squares(const float *x, Py_ssize_t n)
    void fo_rmsnorm_row(const float *x, const float *w, float *out, Py_ssize_t d, double eps)
    void fo_relu2_gate(const float *gate, const float *up, float *out, Py_ssize_t n)
    void fo_attend(const float *q, const float *k, const float *v, Py_ssize_t n_pos, Py_ssize_t pos_stride,
                   Py_ssize_t head_dim, float scale, float *scores, float *out)
    void fo_attend_group(const float *q, Py_ssize_t q_stride, Py_ssize_t n_q, const float *k, const float *v,
                         Py_ssize_t n_pos, Py_ssize_t pos_stride, Py_ssize_t head_dim, float scale, float *scratch,
                         Py_ssize_t scratch_len, float *out, Py_ssize_t out_stride)


LANES = FO_LANES
_PATH_NAMES = ("portable", "avx2", "avx512")
cdef int _num_threads = min(TQ_MAX_THREADS, max(1, cpu_count() or 1))
# RMSNorm below this many elements runs on the calling thread: 8 rows of 2560 take 7 us on one thread
# and 14 us when split (waking a worker costs more than it saves).
cdef Py_ssize_t _RMSNORM_PARALLEL_MIN = 1 << 17
# Tasks per thread for loops of equal items: a few, so a thread that starts late leaves its share.
cdef int _TASKS_PER_THREAD = 4
# Output-head weight rows per work item: small enough to stay in L2 while each group of four activation
# rows passes over them, large enough to amortise scheduling.
cdef Py_ssize_t _HEAD_BLOCK = 64
# Attention runs on one thread below this many (position, head) pairs (about 40 us of work).
cdef Py_ssize_t _ATTENTION_PARALLEL_MIN = 2048

fo_select_path(fo_best_path())


def set_num_threads(int n) -> None:
    """Threads used by the parallel loops (output rows of the head matmul, rows x KV heads of attention)."""
    global _num_threads
    if not 1 <= n <= TQ_MAX_THREADS:
        raise ValueError(f"threads must be >= 1 and <= {TQ_MAX_THREADS}, got {n}")
    _num_threads = n


cdef inline int64_t _tasks_for(Py_ssize_t items, int threads) noexcept nogil:
    """Contiguous ranges to split `items` equal items into for `threads` threads."""
    cdef int64_t tasks = <int64_t>_TASKS_PER_THREAD * threads if threads > 1 else 1
    return tasks if tasks < items else items


def get_num_threads() -> int:
    return _num_threads


def kernel_paths() -> list:
    """Dot-product paths this CPU can run; all give identical bits, they differ only in speed."""
    return list(_PATH_NAMES[: fo_best_path() + 1])


def get_kernel_path() -> str:
    return _PATH_NAMES[fo_current_path()]


def set_kernel_path(str name) -> None:
    if name not in _PATH_NAMES[: fo_best_path() + 1]:
        raise ValueError(f"kernel path {name!r} not available here; choose from {kernel_paths()}")
    fo_select_path(_PATH_NAMES.index(name))


cdef inline Py_ssize_t _row_stride(const float[:, :] x, str name) except -1:
    """Row stride in floats; the kernels index rows by pointer, so each row must be contiguous."""
    if x.shape[1] > 1 and x.strides[1] != sizeof(float):
        raise ValueError(f"{name}: rows must be contiguous (inner stride {x.strides[1]})")
    if x.strides[0] % sizeof(float):
        raise ValueError(f"{name}: row stride must be a multiple of 4 bytes")
    return x.strides[0] // sizeof(float)


cdef inline void _check_rows(const float[:, :] x, Py_ssize_t rows, Py_ssize_t width, str name) except *:
    if x.shape[0] != rows or x.shape[1] != width:
        raise ValueError(f"{name} has shape ({x.shape[0]}, {x.shape[1]}), expected ({rows}, {width})")


# ----------------------------------------------------------------------------------------------------
# RMSNorm


ctypedef struct _RmsnormJob:
    const float *x
    const float *w
    float *out
    Py_ssize_t xs, os, d, rows
    int64_t tasks
    double eps


cdef void _rmsnorm_task(void *ctx, int64_t i, int thread) noexcept nogil:
    cdef _RmsnormJob *j = <_RmsnormJob *>ctx
    cdef Py_ssize_t r
    for r in range(j.rows * i // j.tasks, j.rows * (i + 1) // j.tasks):
        fo_rmsnorm_row(j.x + r * j.xs, j.w, j.out + r * j.os, j.d, j.eps)


def rmsnorm(const float[:, :] x, const float[::1] weight, double eps, float[:, :] out) -> None:
    """out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight; sum of squares in float64 (fo_sum_squares).

    ``out`` may be ``x`` itself (in place).
    """
    cdef Py_ssize_t rows = x.shape[0], d = x.shape[1]
    _check_rows(out, rows, d, "out")
    if weight.shape[0] != d:
        raise ValueError(f"weight has {weight.shape[0]} elements, rows have {d}")
    cdef _RmsnormJob job
    job.xs = _row_stride(x, "x")
    job.os = _row_stride(out, "out")
    if rows == 0:
        return
    job.x, job.w, job.out, job.d, job.rows, job.eps = &x[0, 0], &weight[0], &out[0, 0], d, rows, eps
    cdef int threads = 1 if rows * d < _RMSNORM_PARALLEL_MIN else _num_threads
    job.tasks = _tasks_for(rows, threads)
    with nogil:
        _parallel(job.tasks, _rmsnorm_task, &job, threads)


# ----------------------------------------------------------------------------------------------------
# Rotary embedding


def rope(float[:, :] x, const int[::1] positions, const float[:, ::1] cos, const float[:, ::1] sin,
         int n_heads) -> None:
    """Rotate ``x`` [rows, n_heads * head_dim] in place, NeoX rotate-half pairing.

    For each head, dimension i < head_dim/2 pairs with i + head_dim/2 and, with c, s = cos/sin[pos, i]:
    x[i] <- x[i]*c - x[i+half]*s;  x[i+half] <- x[i+half]*c + x[i]*s.
    """
    cdef Py_ssize_t rows = x.shape[0], width = x.shape[1], half = cos.shape[1]
    cdef Py_ssize_t ctx = cos.shape[0], r, h, i
    if n_heads < 1 or width != n_heads * 2 * half:
        raise ValueError(f"x width {width} != n_heads {n_heads} * head_dim {2 * half}")
    if sin.shape[0] != ctx or sin.shape[1] != half:
        raise ValueError("cos and sin tables differ in shape")
    if positions.shape[0] != rows:
        raise ValueError(f"{positions.shape[0]} positions for {rows} rows")
    cdef Py_ssize_t xs = _row_stride(x, "x")
    for r in range(rows):
        if positions[r] < 0 or positions[r] >= ctx:
            raise ValueError(f"position {positions[r]} outside the rotary table (0..{ctx - 1})")
    if rows == 0:
        return
    cdef float *row
    cdef const float *c
    cdef const float *s
    cdef float a, b
    with nogil:
        for r in range(rows):
            c = &cos[positions[r], 0]
            s = &sin[positions[r], 0]
            for h in range(n_heads):
                row = &x[0, 0] + r * xs + h * 2 * half
                for i in range(half):
                    a = row[i]
                    b = row[i + half]
                    row[i] = a * c[i] - b * s[i]
                    row[i + half] = b * c[i] + a * s[i]


# ----------------------------------------------------------------------------------------------------
# Gated activations: the fused gate|up projection gives [rows, 2*d_ff], gate first.


def _check_gate(const float[:, :] gate_up, float[:, :] out):
    cdef Py_ssize_t rows = gate_up.shape[0], f = out.shape[1]
    if gate_up.shape[1] != 2 * f or out.shape[0] != rows:
        raise ValueError(
            f"gate_up ({gate_up.shape[0]}, {gate_up.shape[1]}) needs out ({rows}, {gate_up.shape[1] // 2}),"
            f" got ({out.shape[0]}, {f})"
        )


def relu2_gate(const float[:, :] gate_up, float[:, :] out) -> None:
    """out = relu(g)^2 * u, computed as (g * g) * u for g > 0 else 0 (out must not overlap gate_up)."""
    _check_gate(gate_up, out)
    cdef Py_ssize_t rows = out.shape[0], f = out.shape[1], r
    cdef Py_ssize_t gs = _row_stride(gate_up, "gate_up"), os = _row_stride(out, "out")
    if rows == 0:
        return
    cdef const float *g
    with nogil:
        for r in range(rows):
            g = &gate_up[0, 0] + r * gs
            fo_relu2_gate(g, g + f, &out[0, 0] + r * os, f)


def silu_gate(const float[:, :] gate_up, float[:, :] out) -> None:
    """out = silu(g) * u, computed as (g / (1 + exp(-g))) * u."""
    _check_gate(gate_up, out)
    cdef Py_ssize_t rows = out.shape[0], f = out.shape[1], r, i
    cdef Py_ssize_t gs = _row_stride(gate_up, "gate_up"), os = _row_stride(out, "out")
    if rows == 0:
        return
    cdef const float *g
    cdef float *o
    with nogil:
        for r in range(rows):
            g = &gate_up[0, 0] + r * gs
            o = &out[0, 0] + r * os
            for i in range(f):
                o[i] = (g[i] / (<float>1.0 + expf(-g[i]))) * g[f + i]


# ----------------------------------------------------------------------------------------------------
# KV cache and attention


cdef void _check_cache(const float[:, :, :, ::1] k_cache, const float[:, :, :, ::1] v_cache,
                       const int[::1] slots, const int[::1] positions, Py_ssize_t rows) except *:
    cdef Py_ssize_t r
    for r in range(4):
        if k_cache.shape[r] != v_cache.shape[r]:
            raise ValueError("k_cache and v_cache differ in shape")
    if slots.shape[0] != rows or positions.shape[0] != rows:
        raise ValueError(f"{slots.shape[0]} slots and {positions.shape[0]} positions for {rows} rows")
    for r in range(rows):
        if slots[r] < 0 or slots[r] >= k_cache.shape[0]:
            raise ValueError(f"slot {slots[r]} outside 0..{k_cache.shape[0] - 1}")
        if positions[r] < 0 or positions[r] >= k_cache.shape[2]:
            raise ValueError(f"position {positions[r]} outside the cache (0..{k_cache.shape[2] - 1})")


def kv_store(const float[:, :] k, const float[:, :] v, float[:, :, :, ::1] k_cache,
             float[:, :, :, ::1] v_cache, const int[::1] slots, const int[::1] positions) -> None:
    """Write each row's k and v ([rows, n_kv * head_dim]) into its (slot, position) of the cache."""
    cdef Py_ssize_t rows = k.shape[0], r, h
    cdef Py_ssize_t n_kv = k_cache.shape[1], head_dim = k_cache.shape[3]
    cdef Py_ssize_t width = n_kv * head_dim
    _check_rows(k, rows, width, "k")
    _check_rows(v, rows, width, "v")
    _check_cache(k_cache, v_cache, slots, positions, rows)
    cdef Py_ssize_t ks = _row_stride(k, "k"), vs = _row_stride(v, "v")
    if rows == 0:
        return
    with nogil:
        for r in range(rows):
            for h in range(n_kv):
                memcpy(&k_cache[slots[r], h, positions[r], 0], &k[0, 0] + r * ks + h * head_dim,
                       head_dim * sizeof(float))
                memcpy(&v_cache[slots[r], h, positions[r], 0], &v[0, 0] + r * vs + h * head_dim,
                       head_dim * sizeof(float))


ctypedef struct _AttentionJob:
    const float *q
    const float *k
    const float *v
    const int *slots
    const int *positions
    float *scores
    float *out
    Py_ssize_t qs, os, n_heads, group, head_dim, head_stride, slot_stride, scratch_stride
    float scale


cdef void _attention_task(void *ctx, int64_t item, int thread) noexcept nogil:
    """The query heads of KV head item % n_kv of row item // n_kv (one GQA group: each K and V row is
    loaded once for the group); scores in the running thread's scratch row."""
    cdef _AttentionJob *j = <_AttentionJob *>ctx
    cdef Py_ssize_t n_kv = j.n_heads // j.group
    cdef Py_ssize_t r = item // n_kv, h = item % n_kv
    cdef Py_ssize_t kv = j.slots[r] * j.slot_stride + h * j.head_stride
    cdef Py_ssize_t first = h * j.group * j.head_dim
    fo_attend_group(j.q + r * j.qs + first, j.head_dim, j.group, j.k + kv, j.v + kv, j.positions[r] + 1,
                    j.head_dim, j.head_dim, j.scale, j.scores + thread * j.scratch_stride, j.scratch_stride,
                    j.out + r * j.os + first, j.head_dim)


def attention(const float[:, :] q, const float[:, :, :, ::1] k_cache, const float[:, :, :, ::1] v_cache,
              const int[::1] slots, const int[::1] positions, float[:, :] out,
              float[:, ::1] scratch) -> None:
    """Causal GQA attention of each query row over its slot's cache, positions 0..positions[r].

    q, out: [rows, n_heads * head_dim]; caches [n_slots, n_kv, ctx, head_dim]. Query head j reads KV
    head j // (n_heads // n_kv) (one C call per row and KV head: fo_attend_group in floatops_kernels.c,
    each query head computed as fo_attend does). Scores are
    q.k (fixed-order dot) * 1/sqrt(head_dim); softmax in float32 (max subtracted, sum in position
    order); the output accumulates p[t] * v[t] in position order and is divided by the sum at the end.
    scratch: [>= 1, ctx] float32, one row per thread for the scores (fewer rows = fewer threads).
    """
    cdef Py_ssize_t rows = q.shape[0], n_kv = k_cache.shape[1], head_dim = k_cache.shape[3]
    cdef Py_ssize_t ctx = k_cache.shape[2]
    if head_dim < 1 or q.shape[1] % head_dim or (q.shape[1] // head_dim) % n_kv:
        raise ValueError(f"q width {q.shape[1]} is not a multiple of n_kv {n_kv} * head_dim {head_dim}")
    cdef Py_ssize_t n_heads = q.shape[1] // head_dim
    _check_rows(out, rows, q.shape[1], "out")
    _check_cache(k_cache, v_cache, slots, positions, rows)
    if scratch.shape[0] < 1 or scratch.shape[1] < ctx:
        raise ValueError(f"scratch must be [threads, >= {ctx}], got ({scratch.shape[0]}, {scratch.shape[1]})")
    cdef _AttentionJob job
    job.qs = _row_stride(q, "q")
    job.os = _row_stride(out, "out")
    if rows == 0:
        return
    job.q, job.k, job.v, job.out, job.scores = &q[0, 0], &k_cache[0, 0, 0, 0], &v_cache[0, 0, 0, 0], &out[0, 0], &scratch[0, 0]
    job.slots, job.positions = &slots[0], &positions[0]
    job.n_heads, job.group, job.head_dim = n_heads, n_heads // n_kv, head_dim
    job.head_stride, job.slot_stride, job.scratch_stride = ctx * head_dim, n_kv * ctx * head_dim, scratch.shape[1]
    job.scale = <float>(1.0 / sqrt(<double>head_dim))
    cdef Py_ssize_t work = rows * n_kv, r, positions_total = 0
    for r in range(rows):
        positions_total += positions[r] + 1
    cdef int threads = min(_num_threads, <int>min(scratch.shape[0], TQ_MAX_THREADS))
    if work < 2 or positions_total * n_heads < _ATTENTION_PARALLEL_MIN:
        threads = 1
    # one task per (row, KV head): items differ in length (positions), so the pool hands them out one by one
    with nogil:
        _parallel(work, _attention_task, &job, threads)


# ----------------------------------------------------------------------------------------------------
# Output head and embedding lookup


ctypedef struct _HeadJob:
    const float *x
    const char *w
    float *out
    Py_ssize_t xs, os, rows, n, d, row_bytes, blocks
    int64_t tasks
    int wtype


cdef void _head_task(void *ctx, int64_t i, int thread) noexcept nogil:
    """A contiguous range of _HEAD_BLOCK-row blocks of the weight matrix."""
    cdef _HeadJob *j = <_HeadJob *>ctx
    cdef Py_ssize_t block, v
    for block in range(j.blocks * i // j.tasks, j.blocks * (i + 1) // j.tasks):
        v = block * _HEAD_BLOCK
        fo_head_rows(j.x, j.xs, j.rows, j.w + v * j.row_bytes, min(_HEAD_BLOCK, j.n - v), j.wtype, j.d,
                     j.out + v, j.os)


cdef void _head(const float[:, :] x, const void *w, Py_ssize_t n, Py_ssize_t d, int wtype,
                float[:, :] out) except *:
    """out[r, v] = dot(x[r], row v of w) for the n rows of w (d elements of type wtype each)."""
    cdef Py_ssize_t rows = x.shape[0]
    if x.shape[1] != d:
        raise ValueError(f"w has rows of {d}, x has rows of {x.shape[1]}")
    _check_rows(out, rows, n, "out")
    cdef _HeadJob job
    job.xs = _row_stride(x, "x")
    job.os = _row_stride(out, "out")
    if rows == 0 or n == 0:
        return
    job.x, job.w, job.out, job.rows, job.n, job.d, job.wtype = &x[0, 0], <const char *>w, &out[0, 0], rows, n, d, wtype
    job.row_bytes = d * (4 if wtype == FO_W_F32 else 2)
    job.blocks = (n + _HEAD_BLOCK - 1) // _HEAD_BLOCK
    cdef int threads = _num_threads
    job.tasks = _tasks_for(job.blocks, threads)
    with nogil:
        _parallel(job.tasks, _head_task, &job, threads)


def matmul_rows(const float[:, :] x, const float[:, ::1] w, float[:, :] out) -> None:
    """out[r, v] = dot(x[r], w[v]) for x [rows, d], w [vocab, d] float32 (fixed-order dot per entry)."""
    _head(x, &w[0, 0] if w.shape[0] * w.shape[1] else NULL, w.shape[0], w.shape[1], FO_W_F32, out)


def matmul_rows_f16(const float[:, :] x, const uint16_t[:, ::1] w, float[:, :] out) -> None:
    """As matmul_rows, with w stored as IEEE half bit patterns (widened exactly to float32)."""
    _head(x, &w[0, 0] if w.shape[0] * w.shape[1] else NULL, w.shape[0], w.shape[1], FO_W_F16, out)


def matmul_rows_bf16(const float[:, :] x, const uint16_t[:, ::1] w, float[:, :] out) -> None:
    """As matmul_rows, with w stored as bfloat16 bit patterns (widened exactly to float32)."""
    _head(x, &w[0, 0] if w.shape[0] * w.shape[1] else NULL, w.shape[0], w.shape[1], FO_W_BF16, out)


def embed_rows_half(const uint16_t[:, ::1] table, const int[::1] tokens, float[:, :] out,
                    bint bfloat16=False) -> None:
    """out[r] = float32(table[tokens[r]]) for an embedding table of IEEE half (or bfloat16) bits."""
    cdef Py_ssize_t rows = tokens.shape[0], d = table.shape[1], r, i
    _check_rows(out, rows, d, "out")
    for r in range(rows):
        if tokens[r] < 0 or tokens[r] >= table.shape[0]:
            raise ValueError(f"token id {tokens[r]} outside the vocabulary (0..{table.shape[0] - 1})")
    cdef Py_ssize_t os = _row_stride(out, "out")
    if rows == 0:
        return
    cdef float *po = &out[0, 0]
    with nogil:
        for r in range(rows):
            for i in range(d):
                if bfloat16:
                    po[r * os + i] = fo_bf16_to_float(table[tokens[r], i])
                else:
                    po[r * os + i] = fo_half_to_float(table[tokens[r], i])
