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
__attribute__((target("avx512f"))) static void weights_avx512(const float *x, int64_t n, float m, float inv_t,
                                                               float *w) {
    const __m512 vm = _mm512_set1_ps(m), vt = _mm512_set1_ps(inv_t);
    const __m512 log2e = _mm512_set1_ps(FS_LOG2E), rounder = _mm512_set1_ps(FS_ROUNDER);
    const __m512 hi = _mm512_set1_ps(FS_LN2_HI), lo = _mm512_set1_ps(FS_LN2_LO);
    const __m512 lowest = _mm512_set1_ps(FS_EXP_MIN);
    const __m512 c7 = _mm512_set1_ps(1.0f / 5040.0f), c6 = _mm512_set1_ps(1.0f / 720.0f);
    const __m512 c5 = _mm512_set1_ps(1.0f / 120.0f), c4 = _mm512_set1_ps(1.0f / 24.0f);
    const __m512 c3 = _mm512_set1_ps(1.0f / 6.0f), c2 = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 z = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), vm), vt);
        __mmask16 live = _mm512_cmp_ps_mask(z, lowest, _CMP_GE_OQ);
        z = _mm512_maskz_mov_ps(live, z); /* dead lanes compute e^0 and are zeroed below */
        __m512 nf = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(z, log2e), rounder), rounder);
        __m512 r = _mm512_sub_ps(_mm512_sub_ps(z, _mm512_mul_ps(nf, hi)), _mm512_mul_ps(nf, lo));
        __m512 p = c7;
        p = _mm512_add_ps(_mm512_mul_ps(p, r), c6);
        p = _mm512_add_ps(_mm512_mul_ps(p, r), c5);
        p = _mm512_add_ps(_mm512_mul_ps(p, r), c4);
        p = _mm512_add_ps(_mm512_mul_ps(p, r), c3);
        p = _mm512_add_ps(_mm512_mul_ps(p, r), c2);
        p = _mm512_add_ps(_mm512_mul_ps(p, r), one);
        p = _mm512_add_ps(_mm512_mul_ps(p, r), one);
        __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(nf), _mm512_set1_epi32(127)), 23);
        _mm512_storeu_ps(w + i, _mm512_maskz_mul_ps(live, p, _mm512_castsi512_ps(e)));
    }
    for (; i < n; i++) w[i] = fs_exp_neg((x[i] - m) * inv_t);
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

int64_t fs_draw_row(const float *x, int64_t n, float inv_t, double u, float *weights, double *block_sums) {
    if (n <= 0) return 0;
    float m = row_max(x, n);
    if (!isfinite(m)) {
        for (int64_t i = 0; i < n; i++)
            if (x[i] == m) return i;
        return 0;
    }
#if FS_X86
    if (g_path >= 1)
        weights_avx512(x, n, m, inv_t, weights);
    else
#endif
        weights_portable(x, n, m, inv_t, weights);

    int64_t n_blocks = (n + FS_BLOCK - 1) / FS_BLOCK;
    double total = 0.0;
    for (int64_t b = 0; b < n_blocks; b++) {
        int64_t start = b * FS_BLOCK;
        block_sums[b] = block_sum(weights + start, n - start < FS_BLOCK ? n - start : FS_BLOCK);
        total += block_sums[b];
    }
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
