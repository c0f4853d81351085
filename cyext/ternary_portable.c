/* Portable C ternary kernels: packing, quantisation, ternarisation and the reference-speed matmul.
 *
 * Everything here is plain C that any compiler vectorises for the baseline ISA. The SIMD matmuls live in
 * ternary_x86.c; they must agree with tq_gemm_portable bit for bit (integer sums are exact, and the
 * final float scaling goes through tq_store in every path).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "ternary_kernels.h"

/* Parallel loops below only fork when there is enough work to pay for waking the threads. */
#define TQ_PARALLEL_MIN_WORK (1 << 18)

static int threads_for(int64_t work, int n_threads) {
    return work >= TQ_PARALLEL_MIN_WORK && n_threads > 1 ? n_threads : 1;
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

int64_t tq_quantize_rows(const float *x, int64_t x_stride, int64_t M, int64_t K, int64_t Kp, int8_t *xq,
                         int64_t xq_stride, float *x_scale, int32_t *x_sum, int n_threads) {
    int64_t bad_row = INT64_MAX;
#pragma omp parallel for num_threads(threads_for(M * K, n_threads)) schedule(static) reduction(min : bad_row)
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * x_stride;
        int8_t *q = xq + m * xq_stride;
        float amax = 0.0f;
        int not_finite = 0;
        for (int64_t k = 0; k < K; k++) {
            float v = fabsf(row[k]);
            not_finite |= !(v <= FLT_MAX); /* NaN compares false */
            amax = v > amax ? v : amax;
        }
        if (not_finite) {
            bad_row = m < bad_row ? m : bad_row;
            continue;
        }
        float scale = 127.0f / (amax > 1e-5f ? amax : 1e-5f);
        int32_t sum = 0;
        for (int64_t k = 0; k < K; k++) {
            float v = row[k] * scale;
            v = v < -128.0f ? -128.0f : v;
            v = v > 127.0f ? 127.0f : v;
            int8_t c = (int8_t)round_half_even(v);
            q[k] = c;
            sum += c;
        }
        memset(q + K, 0, (size_t)(Kp - K));
        x_scale[m] = scale;
        x_sum[m] = sum;
    }
    return bad_row == INT64_MAX ? -1 : bad_row;
}

/* ------------------------------------------------------------------------------ pack / unpack */

int64_t tq_pack(const int8_t *codes, int64_t N, int64_t K, int64_t Kp, uint8_t *packed, int n_threads) {
    int64_t bad = INT64_MAX;
    const int64_t row_bytes = Kp / 4;
#pragma omp parallel for num_threads(threads_for(N * Kp, n_threads)) schedule(static) reduction(min : bad)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *src = codes + n * K;
        uint8_t *dst = packed + n * row_bytes;
        for (int64_t b = 0; b < Kp / TQ_BLOCK; b++) {
            for (int j = 0; j < TQ_BLOCK_BYTES; j++) {
                unsigned byte = 0;
                for (int l = 0; l < 4; l++) {
                    int64_t k = b * TQ_BLOCK + 64 * l + j;
                    int c = 1; /* padding: zero weight */
                    if (k < K) {
                        c = src[k] + 1;
                        if (c < 0 || c > 2) {
                            bad = n * K + k < bad ? n * K + k : bad;
                            c = 1;
                        }
                    }
                    byte |= (unsigned)c << (2 * l);
                }
                dst[b * TQ_BLOCK_BYTES + j] = (uint8_t)byte;
            }
        }
    }
    return bad == INT64_MAX ? -1 : bad;
}

int64_t tq_unpack(const uint8_t *packed, int64_t N, int64_t K, int64_t Kp, int8_t *codes, int n_threads) {
    int64_t bad = INT64_MAX;
    const int64_t row_bytes = Kp / 4;
#pragma omp parallel for num_threads(threads_for(N * Kp, n_threads)) schedule(static) reduction(min : bad)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *src = packed + n * row_bytes;
        int8_t *dst = codes + n * K;
        for (int64_t k = 0; k < K; k++) {
            int64_t byte = (k / TQ_BLOCK) * TQ_BLOCK_BYTES + k % 64;
            int c = (src[byte] >> (2 * ((k % TQ_BLOCK) / 64))) & 3;
            if (c == 3) {
                bad = n * row_bytes + byte < bad ? n * row_bytes + byte : bad;
                c = 1;
            }
            dst[k] = (int8_t)(c - 1);
        }
    }
    return bad == INT64_MAX ? -1 : bad;
}

/* ------------------------------------------------------------------------------ ternarisation */

/* mean|W| in float64 with a fixed summation order (each row left to right, then the row sums left to
 * right) so that the numpy reference reproduces the scale bit for bit. Four rows advance together to
 * hide the add latency; that does not change any row's own order. */
int64_t tq_ternarize(const float *w, int64_t N, int64_t K, int8_t *codes, float *scale, double *row_sums,
                     int n_threads) {
    int64_t bad = INT64_MAX;
    const int64_t groups = (N + 3) / 4;
#pragma omp parallel for num_threads(threads_for(N * K, n_threads)) schedule(static) reduction(min : bad)
    for (int64_t g = 0; g < groups; g++) {
        double s[4] = {0.0, 0.0, 0.0, 0.0};
        int64_t rows = N - 4 * g < 4 ? N - 4 * g : 4;
        for (int64_t k = 0; k < K; k++)
            for (int64_t r = 0; r < rows; r++) s[r] += (double)fabsf(w[(4 * g + r) * K + k]);
        for (int64_t r = 0; r < rows; r++) {
            row_sums[4 * g + r] = s[r];
            if (!(s[r] <= DBL_MAX)) { /* a NaN or infinity somewhere in this row: find it */
                for (int64_t k = 0; k < K; k++) {
                    if (!(fabsf(w[(4 * g + r) * K + k]) <= FLT_MAX)) {
                        int64_t at = (4 * g + r) * K + k;
                        bad = at < bad ? at : bad;
                        break;
                    }
                }
            }
        }
    }
    if (bad != INT64_MAX) return bad;
    double total = 0.0;
    for (int64_t n = 0; n < N; n++) total += row_sums[n];
    double mean = total / (double)(N * K);
    float s32 = (float)(mean > 1e-5 ? mean : 1e-5);
    *scale = s32;
#pragma omp parallel for num_threads(threads_for(N * K, n_threads)) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t k = 0; k < K; k++) {
            float v = w[n * K + k] / s32;
            v = v < -1.0f ? -1.0f : v; /* clip before rounding: same result, keeps the magic add exact */
            v = v > 1.0f ? 1.0f : v;
            codes[n * K + k] = (int8_t)round_half_even(v);
        }
    }
    return -1;
}
