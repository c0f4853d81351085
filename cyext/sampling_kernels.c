/* Fixed-order token drawing (see sampling_kernels.h for the definition every path follows). */
#include "sampling_kernels.h"

#include <math.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#define FS_X86 1
#include <immintrin.h>
#else
#define FS_X86 0
#endif

#define FS_EXP_MIN (-87.0f)          /* e^-87 is near the smallest normal float; below: weight 0 */
#define FS_LOG2E 1.44269504088896341f
#define FS_LN2_HI 0.693359375f       /* ln 2 split so n * LN2_HI is exact for |n| < 2^10 */
#define FS_LN2_LO (-2.12194440e-4f)
#define FS_ROUNDER 12582912.0f       /* 1.5 * 2^23: x + ROUNDER - ROUNDER rounds x to an integer */

static int g_path = 0;

static inline float exp_poly(float r) {
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return p;
}

float fs_exp_neg(float z) {
    if (!(z >= FS_EXP_MIN)) return 0.0f;
    float n = (z * FS_LOG2E + FS_ROUNDER) - FS_ROUNDER;
    float r = (z - n * FS_LN2_HI) - n * FS_LN2_LO;
    uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return exp_poly(r) * scale;
}

/* ---- the weights pass: w[i] = exp_neg((x[i] - m) * inv_t) --------------------------------------- */

static void weights_portable(const float *x, int64_t n, float m, float inv_t, float *w) {
    for (int64_t i = 0; i < n; i++) w[i] = fs_exp_neg((x[i] - m) * inv_t);
}

#if FS_X86
#define FS_AVX512 __attribute__((target("avx512f")))

/* Sixteen weights: the steps of fs_exp_neg on (x - m) * inv_t, lane by lane. */
FS_AVX512 static inline __m512 weights16(__m512 x, __m512 vm, __m512 vt) {
    const __m512 rounder = _mm512_set1_ps(FS_ROUNDER);
    __m512 z = _mm512_mul_ps(_mm512_sub_ps(x, vm), vt);
    __mmask16 live = _mm512_cmp_ps_mask(z, _mm512_set1_ps(FS_EXP_MIN), _CMP_GE_OQ);
    z = _mm512_maskz_mov_ps(live, z); /* dead lanes compute e^0 and are zeroed below */
    __m512 nf = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(z, _mm512_set1_ps(FS_LOG2E)), rounder), rounder);
    __m512 r = _mm512_sub_ps(_mm512_sub_ps(z, _mm512_mul_ps(nf, _mm512_set1_ps(FS_LN2_HI))),
                             _mm512_mul_ps(nf, _mm512_set1_ps(FS_LN2_LO)));
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(0.5f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.0f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.0f));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(nf), _mm512_set1_epi32(127)), 23);
    return _mm512_maskz_mul_ps(live, p, _mm512_castsi512_ps(e));
}

FS_AVX512 static float row_max_avx512(const float *x, int64_t n) {
    /* maxps returns its second operand when either is NaN: NaN logits never enter the running max */
    __m512 acc = _mm512_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) acc = _mm512_max_ps(_mm512_loadu_ps(x + i), acc);
    float m = _mm512_reduce_max_ps(acc);
    for (; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}

/* Weights and block sums of a row; each block's 8 double lanes live in one register (lane j takes
   elements j, j + 8, ... of the block), the tail continues in the portable loop's order. */
FS_AVX512 static void weights_sums_avx512(const float *x, int64_t n, float m, float inv_t, float *w,
                                          double *block_sums) {
    const __m512 vm = _mm512_set1_ps(m), vt = _mm512_set1_ps(inv_t);
    for (int64_t start = 0; start < n; start += FS_BLOCK) {
        int64_t len = n - start < FS_BLOCK ? n - start : FS_BLOCK, i = 0;
        __m512d acc = _mm512_setzero_pd();
        for (; i + 16 <= len; i += 16) {
            __m512 v = weights16(_mm512_loadu_ps(x + start + i), vm, vt);
            _mm512_storeu_ps(w + start + i, v);
            acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
            acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
        }
        double lane[8];
        _mm512_storeu_pd(lane, acc);
        for (int64_t t = i; t < len; t++) w[start + t] = fs_exp_neg((x[start + t] - m) * inv_t);
        for (; i + 8 <= len; i += 8)
            for (int j = 0; j < 8; j++) lane[j] += (double)w[start + i + j];
        for (int j = 0; i < len; i++, j++) lane[j] += (double)w[start + i];
        for (int s = 4; s > 0; s /= 2)
            for (int j = 0; j < s; j++) lane[j] += lane[j + s];
        block_sums[start / FS_BLOCK] = lane[0];
    }
}
#endif

/* ---- path selection ----------------------------------------------------------------------------- */

int fs_best_path(void) {
#if FS_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return 1;
#endif
    return 0;
}

int fs_select_path(int path) {
    int best = fs_best_path();
    g_path = path < 0 ? 0 : (path > best ? best : path);
    return g_path;
}

int fs_current_path(void) { return g_path; }

/* ---- one row --------------------------------------------------------------------------------------- */

static float row_max(const float *x, int64_t n) {
    /* The largest value that is not NaN (-inf if none): 16 running maxima, then their maximum. Max is
       exact, so any order gives the same value; the element-wise form lets the compiler vectorise it. */
    float lane[16];
    int64_t i = 0;
    for (int j = 0; j < 16; j++) lane[j] = -INFINITY;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) lane[j] = x[i + j] > lane[j] ? x[i + j] : lane[j];
    for (; i < n; i++) lane[0] = x[i] > lane[0] ? x[i] : lane[0];
    float m = lane[0];
    for (int j = 1; j < 16; j++) m = lane[j] > m ? lane[j] : m;
    return m;
}

static double block_sum(const float *w, int64_t n) {
    double lane[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) lane[j] += (double)w[i + j];
    for (int j = 0; i < n; i++, j++) lane[j] += (double)w[i];
    for (int s = 4; s > 0; s /= 2)
        for (int j = 0; j < s; j++) lane[j] += lane[j + s];
    return lane[0];
}

float fs_row_weights(const float *x, int64_t n, float inv_t, float *weights, double *block_sums) {
#if FS_X86
    float m = g_path >= 1 ? row_max_avx512(x, n) : row_max(x, n);
#else
    float m = row_max(x, n);
#endif
    if (!isfinite(m) || !isfinite(inv_t)) return m;
#if FS_X86
    if (g_path >= 1) {
        weights_sums_avx512(x, n, m, inv_t, weights, block_sums);
        return m;
    }
#endif
    weights_portable(x, n, m, inv_t, weights);
    for (int64_t b = 0; b * FS_BLOCK < n; b++) {
        int64_t start = b * FS_BLOCK;
        block_sums[b] = block_sum(weights + start, n - start < FS_BLOCK ? n - start : FS_BLOCK);
    }
    return m;
}

int64_t fs_draw_row(const float *x, int64_t n, float inv_t, double u, float *weights, double *block_sums) {
    if (n <= 0) return 0;
    float m = fs_row_weights(x, n, inv_t, weights, block_sums);
    if (!isfinite(m) || !isfinite(inv_t)) { /* no distribution, or a temperature too small for a float */
        for (int64_t i = 0; i < n; i++)
            if (x[i] == m) return i;
        return 0;
    }
    int64_t n_blocks = (n + FS_BLOCK - 1) / FS_BLOCK;
    double total = 0.0;
    for (int64_t b = 0; b < n_blocks; b++) total += block_sums[b];
    double target = u * total, before = 0.0;
    /* the first block whose cumulative sum exceeds the target (the last if none does: u near 1) */
    int64_t block = 0;
    for (; block < n_blocks - 1; block++) {
        double next = before + block_sums[block];
        if (!(next <= target)) break;
        before = next;
    }
    int64_t start = block * FS_BLOCK, len = n - start < FS_BLOCK ? n - start : FS_BLOCK;
    double rest = target - before, inner = 0.0;
    int64_t index = 0;
    for (; index < len - 1; index++) {
        inner += (double)weights[start + index];
        if (!(inner <= rest)) break;
    }
    int64_t pick = start + index;
    while (pick > 0 && weights[pick] == 0.0f) pick--;
    return pick;
}
