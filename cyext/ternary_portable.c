/* Portable C ternary kernels: packing, quantisation, ternarisation and the reference-speed matmul.
 *
 * Everything here is plain C that any compiler vectorises for the baseline ISA. The SIMD matmuls live in
 * ternary_x86.c; they must agree with tq_gemm_portable bit for bit (integer sums are exact, and the
 * final float scaling goes through tq_store in every path). Row loops run as tasks on the pool
 * (ternary_pool.c): each task is a contiguous range of rows, and rows never depend on each other.
 */
#include <float.h>
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#include "ternary_kernels.h"

/* Below this much work per thread, waking another thread costs more than it saves. */
#define TQ_PARALLEL_MIN_WORK (1 << 18)

/* How to split `rows` rows holding `work` elements: threads worth waking, and row-range tasks for
 * them (a few per thread, so a thread that starts late leaves its share to the others). */
typedef struct {
    int64_t tasks;
    int threads;
} split_plan;

static split_plan plan(int64_t rows, int64_t work, int n_threads) {
    int64_t useful = work / TQ_PARALLEL_MIN_WORK;
    split_plan p = {1, 1};
    if (n_threads > 1 && useful > 1 && rows > 1) {
        p.threads = useful < n_threads ? (int)useful : n_threads;
        p.tasks = 4 * (int64_t)p.threads < rows ? 4 * (int64_t)p.threads : rows;
    }
    return p;
}

static inline int64_t part_start(int64_t n, int64_t parts, int64_t i) { return n * i / parts; }

/* Lowest failing index seen by any task (INT64_MAX: none). */
static void record_min(_Atomic int64_t *where, int64_t value) {
    int64_t cur = atomic_load_explicit(where, memory_order_relaxed);
    while (value < cur && !atomic_compare_exchange_weak_explicit(where, &cur, value, memory_order_relaxed,
                                                                 memory_order_relaxed)) {
    }
}

static int64_t found(_Atomic int64_t *where) {
    int64_t v = atomic_load_explicit(where, memory_order_relaxed);
    return v == INT64_MAX ? -1 : v;
}

/* ------------------------------------------------------------------------------------- matmul */

/* Unpack the 64 bytes of one block into 256 codes c = w + 1 in {0, 1, 2}, in element order. */
static inline void unpack_block_codes(const uint8_t *src, uint8_t *codes) {
    for (int l = 0; l < 4; l++)
        for (int j = 0; j < TQ_BLOCK_BYTES; j++) codes[64 * l + j] = (uint8_t)((src[j] >> (2 * l)) & 3);
}

static inline int32_t dot_block(const uint8_t *codes, const int8_t *x) {
    int32_t s = 0;
    for (int j = 0; j < TQ_BLOCK; j++) s += (int32_t)codes[j] * (int32_t)x[j];
    return s;
}

#define PORTABLE_M_CHUNK 64

void tq_gemm_portable(const tq_gemm_args *a, int64_t n0, int64_t n1) {
    uint8_t codes[TQ_BLOCK];
    int32_t acc[PORTABLE_M_CHUNK];
    for (int64_t m0 = 0; m0 < a->M; m0 += PORTABLE_M_CHUNK) {
        int64_t mc = a->M - m0 < PORTABLE_M_CHUNK ? a->M - m0 : PORTABLE_M_CHUNK;
        for (int64_t n = n0; n < n1; n++) {
            const uint8_t *wrow = a->w + n * a->w_stride;
            memset(acc, 0, sizeof(acc));
            for (int64_t b = 0; b < a->n_blocks; b++) {
                unpack_block_codes(wrow + b * TQ_BLOCK_BYTES, codes);
                for (int64_t m = 0; m < mc; m++)
                    acc[m] += dot_block(codes, a->xq + (m0 + m) * a->x_stride + b * TQ_BLOCK);
            }
            for (int64_t m = 0; m < mc; m++) tq_store(a, m0 + m, n, acc[m]);
        }
    }
}

/* ------------------------------------------------------------------------------- quantisation */

/* Round half to even for |v| < 2^22 under the default rounding mode, without a libm call so the loop
 * vectorises: adding 1.5 * 2^23 pushes the fraction bits out, and the FPU rounds ties to even. */
static inline float round_half_even(float v) {
    const float magic = 12582912.0f;
    return (v + magic) - magic;
}

int tq_quantize_row_portable(const float *row, int64_t K, int64_t Kp, int8_t *q, float *scale_out,
                             int32_t *sum_out) {
    float amax = 0.0f;
    int not_finite = 0;
    for (int64_t k = 0; k < K; k++) {
        float v = fabsf(row[k]);
        not_finite |= !(v <= FLT_MAX); /* NaN compares false */
        amax = v > amax ? v : amax;
    }
    if (not_finite) return 1;
    float scale = 127.0f / (amax > 1e-5f ? amax : 1e-5f);
    int32_t sum = 0;
    for (int64_t k = 0; k < K; k++) {
        float v = row[k] * scale;
        v = v < -128.0f ? -128.0f : v; /* clip before rounding: same result, keeps the magic add exact */
        v = v > 127.0f ? 127.0f : v;
        int8_t c = (int8_t)round_half_even(v);
        q[k] = c;
        sum += c;
    }
    memset(q + K, 0, (size_t)(Kp - K));
    *scale_out = scale;
    *sum_out = sum;
    return 0;
}

typedef struct {
    const float *x;
    int64_t x_stride, M, K, Kp, xq_stride, tasks;
    int8_t *xq;
    float *x_scale;
    int32_t *x_sum;
    tq_quantize_row_fn row_fn;
    _Atomic int64_t bad_row;
} quantize_job;

static void quantize_task(void *ctx, int64_t i, int thread) {
    quantize_job *j = (quantize_job *)ctx;
    for (int64_t m = part_start(j->M, j->tasks, i); m < part_start(j->M, j->tasks, i + 1); m++)
        if (j->row_fn(j->x + m * j->x_stride, j->K, j->Kp, j->xq + m * j->xq_stride, j->x_scale + m, j->x_sum + m))
            record_min(&j->bad_row, m);
}

int64_t tq_quantize_rows(const float *x, int64_t x_stride, int64_t M, int64_t K, int64_t Kp, int8_t *xq,
                         int64_t xq_stride, float *x_scale, int32_t *x_sum, int path, int n_threads) {
    split_plan p = plan(M, M * K, n_threads);
    quantize_job j = {x, x_stride, M, K, Kp, xq_stride, p.tasks, xq, x_scale, x_sum, tq_quantize_row_fn_for(path),
                      INT64_MAX};
    tq_parallel(j.tasks, quantize_task, &j, p.threads);
    return found(&j.bad_row);
}

/* ------------------------------------------------------------------------------ pack / unpack */

typedef struct {
    const int8_t *codes;
    const uint8_t *packed_in;
    uint8_t *packed;
    int8_t *codes_out;
    int64_t N, K, Kp, tasks;
    _Atomic int64_t bad;
} pack_job;

static void pack_task(void *ctx, int64_t i, int thread) {
    pack_job *j = (pack_job *)ctx;
    const int64_t row_bytes = j->Kp / 4, K = j->K;
    for (int64_t n = part_start(j->N, j->tasks, i); n < part_start(j->N, j->tasks, i + 1); n++) {
        const int8_t *src = j->codes + n * K;
        uint8_t *dst = j->packed + n * row_bytes;
        for (int64_t b = 0; b < j->Kp / TQ_BLOCK; b++) {
            for (int jj = 0; jj < TQ_BLOCK_BYTES; jj++) {
                unsigned byte = 0;
                for (int l = 0; l < 4; l++) {
                    int64_t k = b * TQ_BLOCK + 64 * l + jj;
                    int c = 1; /* padding: zero weight */
                    if (k < K) {
                        c = src[k] + 1;
                        if (c < 0 || c > 2) {
                            record_min(&j->bad, n * K + k);
                            c = 1;
                        }
                    }
                    byte |= (unsigned)c << (2 * l);
                }
                dst[b * TQ_BLOCK_BYTES + jj] = (uint8_t)byte;
            }
        }
    }
}

int64_t tq_pack(const int8_t *codes, int64_t N, int64_t K, int64_t Kp, uint8_t *packed, int n_threads) {
    split_plan p = plan(N, N * Kp, n_threads);
    pack_job j = {codes, NULL, packed, NULL, N, K, Kp, p.tasks, INT64_MAX};
    tq_parallel(j.tasks, pack_task, &j, p.threads);
    return found(&j.bad);
}

static void unpack_task(void *ctx, int64_t i, int thread) {
    pack_job *j = (pack_job *)ctx;
    const int64_t row_bytes = j->Kp / 4;
    for (int64_t n = part_start(j->N, j->tasks, i); n < part_start(j->N, j->tasks, i + 1); n++) {
        const uint8_t *src = j->packed_in + n * row_bytes;
        int8_t *dst = j->codes_out + n * j->K;
        for (int64_t k = 0; k < j->K; k++) {
            int64_t byte = (k / TQ_BLOCK) * TQ_BLOCK_BYTES + k % 64;
            int c = (src[byte] >> (2 * ((k % TQ_BLOCK) / 64))) & 3;
            if (c == 3) {
                record_min(&j->bad, n * row_bytes + byte);
                c = 1;
            }
            dst[k] = (int8_t)(c - 1);
        }
    }
}

int64_t tq_unpack(const uint8_t *packed, int64_t N, int64_t K, int64_t Kp, int8_t *codes, int n_threads) {
    split_plan p = plan(N, N * Kp, n_threads);
    pack_job j = {NULL, packed, NULL, codes, N, K, Kp, p.tasks, INT64_MAX};
    tq_parallel(j.tasks, unpack_task, &j, p.threads);
    return found(&j.bad);
}

/* ------------------------------------------------------------------------------ ternarisation */

typedef struct {
    const float *w;
    int64_t N, K, tasks;
    int8_t *codes;
    double *row_sums;
    float scale;
    _Atomic int64_t bad;
} ternarize_job;

/* Row sums of |w| in float64, each row left to right. Four rows advance together to hide the add
 * latency; that does not change any row's own order. Tasks are ranges of 4-row groups. */
static void row_sums_task(void *ctx, int64_t i, int thread) {
    ternarize_job *j = (ternarize_job *)ctx;
    const int64_t groups = (j->N + 3) / 4, K = j->K;
    for (int64_t g = part_start(groups, j->tasks, i); g < part_start(groups, j->tasks, i + 1); g++) {
        double s[4] = {0.0, 0.0, 0.0, 0.0};
        int64_t rows = j->N - 4 * g < 4 ? j->N - 4 * g : 4;
        for (int64_t k = 0; k < K; k++)
            for (int64_t r = 0; r < rows; r++) s[r] += (double)fabsf(j->w[(4 * g + r) * K + k]);
        for (int64_t r = 0; r < rows; r++) {
            j->row_sums[4 * g + r] = s[r];
            if (!(s[r] <= DBL_MAX)) { /* a NaN or infinity somewhere in this row: find it */
                for (int64_t k = 0; k < K; k++) {
                    if (!(fabsf(j->w[(4 * g + r) * K + k]) <= FLT_MAX)) {
                        record_min(&j->bad, (4 * g + r) * K + k);
                        break;
                    }
                }
            }
        }
    }
}

static void codes_task(void *ctx, int64_t i, int thread) {
    ternarize_job *j = (ternarize_job *)ctx;
    const int64_t K = j->K;
    for (int64_t n = part_start(j->N, j->tasks, i); n < part_start(j->N, j->tasks, i + 1); n++) {
        for (int64_t k = 0; k < K; k++) {
            float v = j->w[n * K + k] / j->scale;
            v = v < -1.0f ? -1.0f : v; /* clip before rounding: same result, keeps the magic add exact */
            v = v > 1.0f ? 1.0f : v;
            j->codes[n * K + k] = (int8_t)round_half_even(v);
        }
    }
}

/* mean|W| in float64 with a fixed summation order (each row left to right, then the row sums left to
 * right) so that the numpy reference reproduces the scale bit for bit. */
int64_t tq_ternarize(const float *w, int64_t N, int64_t K, int8_t *codes, float *scale, double *row_sums,
                     int n_threads) {
    split_plan p = plan((N + 3) / 4, N * K, n_threads);
    ternarize_job j = {w, N, K, p.tasks, codes, row_sums, 0.0f, INT64_MAX};
    tq_parallel(j.tasks, row_sums_task, &j, p.threads);
    if (found(&j.bad) >= 0) return found(&j.bad);
    double total = 0.0;
    for (int64_t n = 0; n < N; n++) total += row_sums[n];
    double mean = total / (double)(N * K);
    j.scale = (float)(mean > 1e-5 ? mean : 1e-5);
    *scale = j.scale;
    p = plan(N, N * K, n_threads);
    j.tasks = p.tasks;
    tq_parallel(j.tasks, codes_task, &j, p.threads);
    return -1;
}
