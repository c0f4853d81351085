/* Fixed-order float kernels (see floatops_kernels.h for the order every path must follow). */
#include "floatops_kernels.h"

#include <math.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#define FO_X86 1
#include <immintrin.h>
#else
#define FO_X86 0
#endif

static int g_path = 0; /* portable until fo_select_path() says otherwise */

/* ---- weight element types: float32, IEEE half, bfloat16 (both widen to float exactly) ---------- */

float fo_half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu;
    uint32_t mantissa = h & 0x3ffu;
    uint32_t bits;
    float f;
    if (exponent == 0x1f) {
        bits = sign | 0x7f800000u | (mantissa << 13); /* inf / nan */
    } else if (exponent == 0) {
        /* zero or subnormal: mantissa * 2^-24, exact in float */
        f = (float)mantissa * 5.9604644775390625e-08f;
        return sign ? -f : f;
    } else {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    }
    memcpy(&f, &bits, sizeof f);
    return f;
}

float fo_bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float elem_f32(const void *w, ptrdiff_t i) { return ((const float *)w)[i]; }
static inline float elem_f16(const void *w, ptrdiff_t i) { return fo_half_to_float(((const uint16_t *)w)[i]); }
static inline float elem_bf16(const void *w, ptrdiff_t i) { return fo_bf16_to_float(((const uint16_t *)w)[i]); }

/* Fold the lanes in the documented tree order. */
static inline float fold_lanes(float *lane) {
    for (int w = FO_LANES / 2; w > 0; w /= 2)
        for (int j = 0; j < w; j++) lane[j] += lane[j + w];
    return lane[0];
}

/* ---- portable dot products ------------------------------------------------------------------- */

#define FO_PORTABLE_DOT(NAME, ELEM)                                                                  \
    static float NAME(const float *a, const void *b, ptrdiff_t n) {                                  \
        float lane[FO_LANES] = {0};                                                                  \
        ptrdiff_t i = 0;                                                                             \
        for (; i + FO_LANES <= n; i += FO_LANES)                                                     \
            for (int j = 0; j < FO_LANES; j++) lane[j] += a[i + j] * ELEM(b, i + j);                 \
        for (int j = 0; i < n; i++, j++) lane[j] += a[i] * ELEM(b, i);                               \
        return fold_lanes(lane);                                                                     \
    }
FO_PORTABLE_DOT(dot_f32_portable, elem_f32)
FO_PORTABLE_DOT(dot_f16_portable, elem_f16)
FO_PORTABLE_DOT(dot_bf16_portable, elem_bf16)

/* ---- AVX2 dot products: lanes 0-7 in one register, 8-15 in another; mul and add stay separate
 * instructions (no FMA), exactly as the portable C computes them. ------------------------------- */

#if FO_X86
/* The tree fold of fold_lanes() done in registers: w = 8 is lo + hi, w = 4 adds the 128-bit halves,
   w = 2 and w = 1 pair the remaining lanes. Same additions, same bits. */
__attribute__((target("avx2"))) static inline float fold_avx2(__m256 lo, __m256 hi) {
    __m256 s8 = _mm256_add_ps(lo, hi);
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

/* Eight weights from element i on, widened to float. */
#define LOAD_F32(b, i) _mm256_loadu_ps((const float *)(b) + (i))
#define LOAD_F16(b, i) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)(b) + (i))))
#define LOAD_BF16(b, i)                                                                              \
    _mm256_castsi256_ps(                                                                             \
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)(b) + (i)))), 16))

/* ROWS activation rows x[r] (r < ROWS) against one weight row b: each row keeps its own 16 lanes; the
   weight vector is loaded once per step, and 2 * ROWS independent add chains hide latency. */
#define FO_AVX2_DOTS(NAME, ROWS, LOAD, ELEM)                                                        \
    __attribute__((target("avx2,f16c"))) static void NAME(const float *const *x, const void *b,     \
                                                          ptrdiff_t n, float *out) {                \
        __m256 lo[ROWS], hi[ROWS];                                                                  \
        for (int r = 0; r < ROWS; r++) lo[r] = hi[r] = _mm256_setzero_ps();                         \
        ptrdiff_t i = 0;                                                                            \
        for (; i + FO_LANES <= n; i += FO_LANES) {                                                  \
            __m256 w_lo = LOAD(b, i), w_hi = LOAD(b, i + 8);                                        \
            for (int r = 0; r < ROWS; r++) {                                                        \
                lo[r] = _mm256_add_ps(lo[r], _mm256_mul_ps(_mm256_loadu_ps(x[r] + i), w_lo));       \
                hi[r] = _mm256_add_ps(hi[r], _mm256_mul_ps(_mm256_loadu_ps(x[r] + i + 8), w_hi));   \
            }                                                                                       \
        }                                                                                           \
        for (int r = 0; r < ROWS; r++) {                                                            \
            if (i == n) {                                                                           \
                out[r] = fold_avx2(lo[r], hi[r]);                                                   \
                continue;                                                                           \
            }                                                                                       \
            float lane[FO_LANES];                                                                   \
            _mm256_storeu_ps(lane, lo[r]);                                                          \
            _mm256_storeu_ps(lane + 8, hi[r]);                                                      \
            for (ptrdiff_t t = i, j = 0; t < n; t++, j++) lane[j] += x[r][t] * ELEM(b, t);          \
            out[r] = fold_lanes(lane);                                                              \
        }                                                                                           \
    }
FO_AVX2_DOTS(dot1_f32_avx2, 1, LOAD_F32, elem_f32)
FO_AVX2_DOTS(dot1_f16_avx2, 1, LOAD_F16, elem_f16)
FO_AVX2_DOTS(dot1_bf16_avx2, 1, LOAD_BF16, elem_bf16)
FO_AVX2_DOTS(dot4_f32_avx2, 4, LOAD_F32, elem_f32)
FO_AVX2_DOTS(dot4_f16_avx2, 4, LOAD_F16, elem_f16)
FO_AVX2_DOTS(dot4_bf16_avx2, 4, LOAD_BF16, elem_bf16)

/* One query against four key rows `stride` floats apart (attention scores). */
__attribute__((target("avx2"))) static void dot_q4_avx2(const float *q, const float *k, ptrdiff_t stride,
                                                        ptrdiff_t n, float out[4]) {
    __m256 lo[4], hi[4];
    for (int r = 0; r < 4; r++) lo[r] = hi[r] = _mm256_setzero_ps();
    ptrdiff_t i = 0;
    for (; i + FO_LANES <= n; i += FO_LANES) {
        __m256 q_lo = _mm256_loadu_ps(q + i), q_hi = _mm256_loadu_ps(q + i + 8);
        for (int r = 0; r < 4; r++) {
            lo[r] = _mm256_add_ps(lo[r], _mm256_mul_ps(q_lo, _mm256_loadu_ps(k + r * stride + i)));
            hi[r] = _mm256_add_ps(hi[r], _mm256_mul_ps(q_hi, _mm256_loadu_ps(k + r * stride + i + 8)));
        }
    }
    for (int r = 0; r < 4; r++) {
        if (i == n) {
            out[r] = fold_avx2(lo[r], hi[r]);
            continue;
        }
        float lane[FO_LANES];
        _mm256_storeu_ps(lane, lo[r]);
        _mm256_storeu_ps(lane + 8, hi[r]);
        for (ptrdiff_t t = i, j = 0; t < n; t++, j++) lane[j] += q[t] * k[r * stride + t];
        out[r] = fold_lanes(lane);
    }
}

/* out[d] += p * v[d]; element-wise, so any vector width gives the same bits. */
__attribute__((target("avx2"))) static void axpy_avx2(float *out, float p, const float *v, ptrdiff_t n) {
    __m256 pv = _mm256_set1_ps(p);
    ptrdiff_t d = 0;
    for (; d + 8 <= n; d += 8)
        _mm256_storeu_ps(out + d,
                         _mm256_add_ps(_mm256_loadu_ps(out + d), _mm256_mul_ps(pv, _mm256_loadu_ps(v + d))));
    for (; d < n; d++) out[d] = out[d] + p * v[d];
}

/* Four axpy steps in position order, keeping each out vector in a register between them. */
__attribute__((target("avx2"))) static void axpy4_avx2(float *out, const float *p, const float *v,
                                                       ptrdiff_t stride, ptrdiff_t n) {
    __m256 p0 = _mm256_set1_ps(p[0]), p1 = _mm256_set1_ps(p[1]);
    __m256 p2 = _mm256_set1_ps(p[2]), p3 = _mm256_set1_ps(p[3]);
    ptrdiff_t d = 0;
    for (; d + 8 <= n; d += 8) {
        __m256 o = _mm256_loadu_ps(out + d);
        o = _mm256_add_ps(o, _mm256_mul_ps(p0, _mm256_loadu_ps(v + d)));
        o = _mm256_add_ps(o, _mm256_mul_ps(p1, _mm256_loadu_ps(v + stride + d)));
        o = _mm256_add_ps(o, _mm256_mul_ps(p2, _mm256_loadu_ps(v + 2 * stride + d)));
        o = _mm256_add_ps(o, _mm256_mul_ps(p3, _mm256_loadu_ps(v + 3 * stride + d)));
        _mm256_storeu_ps(out + d, o);
    }
    for (; d < n; d++)
        out[d] = (((out[d] + p[0] * v[d]) + p[1] * v[stride + d]) + p[2] * v[2 * stride + d]) +
                 p[3] * v[3 * stride + d];
}

/* ---- AVX-512 (F, BW, VL, DQ): one zmm holds the 16 lanes of one dot product, so a register tile of
 * activation rows x weight rows keeps every accumulator in a register and reuses each load several
 * times. Still a separate mul and add per step (no FMA), so the bits are the portable C's. --------- */

#define FO_UNROLL _Pragma("GCC unroll 16")
#define FO_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c")))

/* Sixteen weights from element i on, widened to float; the masked form reads only the lanes in m
   (others are 0). */
FO_AVX512 static inline __m512 load16(int wtype, const void *b, ptrdiff_t i) {
    if (wtype == FO_W_F32) return _mm512_loadu_ps((const float *)b + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)b + i));
    if (wtype == FO_W_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
FO_AVX512 static inline __m512 load16_mask(int wtype, const void *b, ptrdiff_t i, __mmask16 m) {
    if (wtype == FO_W_F32) return _mm512_maskz_loadu_ps(m, (const float *)b + i);
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)b + i);
    if (wtype == FO_W_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* The tree fold of 16 accumulators at once, a[4 * v + r] for v, r < 4: each step adds lane j + w to
   lane j of every accumulator (the additions of fold_lanes), while shuffles pack the halves of
   different accumulators into one register. The result holds a[4 * v + r] folded in lane 4 * r + v. */
FO_AVX512 static inline __m512 fold16_avx512(const __m512 *a) {
    __m512 s[8], t[4], u[2];
    FO_UNROLL
    for (int k = 0; k < 8; k++) /* w = 8: low 256 bits + high 256 bits */
        s[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0x44),
                             _mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0xEE));
    FO_UNROLL
    for (int k = 0; k < 4; k++) /* w = 4: 128-bit chunk 0 + chunk 1 of each 8-lane partial */
        t[k] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * k], s[2 * k + 1], 0x88),
                             _mm512_shuffle_f32x4(s[2 * k], s[2 * k + 1], 0xDD));
    FO_UNROLL
    for (int k = 0; k < 2; k++) /* w = 2: lanes 0, 1 + lanes 2, 3 within each chunk */
        u[k] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * k], t[2 * k + 1], 0x44),
                             _mm512_shuffle_ps(t[2 * k], t[2 * k + 1], 0xEE));
    /* w = 1: lane 0 + lane 1 */
    return _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], 0x88), _mm512_shuffle_ps(u[0], u[1], 0xDD));
}

/* The tree fold of one accumulator: fold_avx2 of its low and high 256 bits (the same additions). */
FO_AVX512 static inline float fold1_avx512(__m512 a) {
    return fold_avx2(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
}

/* R activation rows (xs floats apart) x V weight rows (row_bytes apart), R, V <= 4: out[r * os + v] =
   dot(x_r, w_v). Inlined with constant R, V, wtype so the loops unroll and the accumulators stay in
   registers. pf (or NULL): the next V weight rows (contiguous), asked for from memory at the rate this
   tile reads its own. */
FO_AVX512 static inline __attribute__((always_inline)) void tile_avx512(const float *x, ptrdiff_t xs, const int R,
                                                                       const char *w, ptrdiff_t row_bytes,
                                                                       const int V, const int wtype, ptrdiff_t n,
                                                                       float *out, ptrdiff_t os, const char *pf) {
    const ptrdiff_t esize = wtype == FO_W_F32 ? 4 : 2;
    __m512 acc[16];
    FO_UNROLL
    for (int k = 0; k < 16; k++) acc[k] = _mm512_setzero_ps();
    ptrdiff_t i = 0;
    for (; i + FO_LANES <= n; i += FO_LANES) {
        __m512 xv[4], wv[4];
        FO_UNROLL
        for (int r = 0; r < R; r++) xv[r] = _mm512_loadu_ps(x + r * xs + i);
        FO_UNROLL
        for (int v = 0; v < V; v++) wv[v] = load16(wtype, w + v * row_bytes, i);
        if (pf) {
            for (int k = 0; k < (esize == 4 ? V : (V + 1) / 2); k++)
                _mm_prefetch(pf + i * esize * V + 64 * k, _MM_HINT_T0);
        }
        FO_UNROLL
        for (int v = 0; v < V; v++)
            FO_UNROLL
            for (int r = 0; r < R; r++) acc[4 * v + r] = _mm512_add_ps(acc[4 * v + r], _mm512_mul_ps(xv[r], wv[v]));
    }
    if (i < n) { /* the tail: element i + j to lane j, the other lanes unchanged */
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        __m512 xv[4], wv[4];
        FO_UNROLL
        for (int r = 0; r < R; r++) xv[r] = _mm512_maskz_loadu_ps(m, x + r * xs + i);
        FO_UNROLL
        for (int v = 0; v < V; v++) wv[v] = load16_mask(wtype, w + v * row_bytes, i, m);
        FO_UNROLL
        for (int v = 0; v < V; v++)
            FO_UNROLL
            for (int r = 0; r < R; r++)
                acc[4 * v + r] = _mm512_mask_add_ps(acc[4 * v + r], m, acc[4 * v + r], _mm512_mul_ps(xv[r], wv[v]));
    }
    if (R * V <= 2) { /* one or two dot products: fold each alone, not 16 registers mostly of zeros */
        FO_UNROLL
        for (int r = 0; r < R; r++)
            FO_UNROLL
            for (int v = 0; v < V; v++) out[r * os + v] = fold1_avx512(acc[4 * v + r]);
        return;
    }
    __m512 res = fold16_avx512(acc);
    float lane[FO_LANES];
    _mm512_storeu_ps(lane, res);
    FO_UNROLL
    for (int r = 0; r < R; r++)
        FO_UNROLL
        for (int v = 0; v < V; v++) out[r * os + v] = lane[4 * r + v];
}

#define FO_TILE(NAME, R, V, WT)                                                                      \
    FO_AVX512 static void NAME(const float *x, ptrdiff_t xs, const char *w, ptrdiff_t row_bytes,      \
                               ptrdiff_t n, float *out, ptrdiff_t os, const char *pf) {              \
        tile_avx512(x, xs, R, w, row_bytes, V, WT, n, out, os, pf);                                  \
    }
#define FO_TILES(WT, SUFFIX)                                                                          \
    FO_TILE(tile1x4_##SUFFIX, 1, 4, WT)                                                              \
    FO_TILE(tile2x4_##SUFFIX, 2, 4, WT)                                                              \
    FO_TILE(tile3x4_##SUFFIX, 3, 4, WT)                                                              \
    FO_TILE(tile4x4_##SUFFIX, 4, 4, WT)                                                              \
    FO_TILE(tile1x1_##SUFFIX, 1, 1, WT)                                                              \
    FO_TILE(tile2x1_##SUFFIX, 2, 1, WT)                                                              \
    FO_TILE(tile3x1_##SUFFIX, 3, 1, WT)                                                              \
    FO_TILE(tile4x1_##SUFFIX, 4, 1, WT)
FO_TILES(FO_W_F32, f32)
FO_TILES(FO_W_F16, f16)
FO_TILES(FO_W_BF16, bf16)

typedef void (*tile_fn)(const float *, ptrdiff_t, const char *, ptrdiff_t, ptrdiff_t, float *, ptrdiff_t,
                        const char *);
/* [wtype][V == 4][R - 1] */
static const tile_fn g_tiles[3][2][4] = {
    {{tile1x1_f32, tile2x1_f32, tile3x1_f32, tile4x1_f32}, {tile1x4_f32, tile2x4_f32, tile3x4_f32, tile4x4_f32}},
    {{tile1x1_f16, tile2x1_f16, tile3x1_f16, tile4x1_f16}, {tile1x4_f16, tile2x4_f16, tile3x4_f16, tile4x4_f16}},
    {{tile1x1_bf16, tile2x1_bf16, tile3x1_bf16, tile4x1_bf16},
     {tile1x4_bf16, tile2x4_bf16, tile3x4_bf16, tile4x4_bf16}},
};

/* Widen `count` rows of n half / bfloat16 weights (row_bytes apart) into float rows n apart (exact). */
FO_AVX512 static void widen_rows_avx512(const char *w, ptrdiff_t row_bytes, int wtype, int count, ptrdiff_t n,
                                        float *dst) {
    for (int v = 0; v < count; v++) {
        ptrdiff_t i = 0;
        for (; i + FO_LANES <= n; i += FO_LANES) _mm512_storeu_ps(dst + v * n + i, load16(wtype, w + v * row_bytes, i));
        if (i < n) {
            __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
            _mm512_mask_storeu_ps(dst + v * n + i, m, load16_mask(wtype, w + v * row_bytes, i, m));
        }
    }
}

/* Half / bfloat16 rows up to this long are widened once per group of four weight rows when more than
   one tile of activation rows will read them (16 KB of stack per 1024). */
#define FO_WIDEN_MAX 2048

/* The head block on the AVX-512 path: groups of four weight rows outside (4 KB of f32 at d = 256, they
   stay in L1 while every activation row passes over them, so each weight byte comes from memory
   once), activation rows in tiles of four inside. */
static void head_rows_avx512(const float *x, ptrdiff_t xs, ptrdiff_t rows, const char *w, ptrdiff_t n_w,
                             int wtype, ptrdiff_t n, float *out, ptrdiff_t os) {
    float widened[4 * FO_WIDEN_MAX];
    ptrdiff_t row_bytes = n * (wtype == FO_W_F32 ? 4 : 2);
    int widen = wtype != FO_W_F32 && rows > 4 && n <= FO_WIDEN_MAX;
    /* One or two activation rows read each weight once: memory-bound when the head is not in cache,
       and four rows of over 1 KB each are four streams a row apart, which came from memory at about
       half the rate of one sequential stream (d = 2560: 5.4 ms against 2.8 for a 16384-row f16 head).
       Then single weight rows in order; a group of four short rows is itself contiguous. */
    int by_four = rows > 2 || row_bytes <= 1024;
    if (!by_four) {
        /* There the AVX2 single-row dot (the avx2 path's, same bits) measured 3-15% faster than the
           1 x 1 / 2 x 1 tiles inside the 730M model's decode step (f16 head 32002 x 1536, one thread),
           though level with them in isolation. */
        for (ptrdiff_t r = 0; r < rows; r++) {
            const float *xr[1] = {x + r * xs};
            for (ptrdiff_t v = 0; v < n_w; v++) {
                if (wtype == FO_W_F16)
                    dot1_f16_avx2(xr, w + v * row_bytes, n, out + r * os + v);
                else if (wtype == FO_W_BF16)
                    dot1_bf16_avx2(xr, w + v * row_bytes, n, out + r * os + v);
                else
                    dot1_f32_avx2(xr, w + v * row_bytes, n, out + r * os + v);
            }
        }
        return;
    }
    for (ptrdiff_t v = 0; v < n_w;) {
        int wide = by_four && n_w - v >= 4;
        const tile_fn *tiles = g_tiles[widen ? FO_W_F32 : wtype][wide];
        const char *wv = w + v * row_bytes;
        ptrdiff_t wv_bytes = row_bytes;
        if (widen) { /* the conversion then runs once per weight element, not once per tile of rows */
            widen_rows_avx512(wv, row_bytes, wtype, wide ? 4 : 1, n, widened);
            wv = (const char *)widened;
            wv_bytes = n * 4;
        }
        /* short rows: the first tile of activation rows also fetches the next group from memory (the
           group after a 4 KB group is the next 4 KB; with longer rows this measured slower) */
        const char *next = row_bytes <= 1024 ? w + (v + (wide ? 4 : 1)) * row_bytes : NULL;
        for (ptrdiff_t r = 0; r < rows; r += 4) {
            ptrdiff_t R = rows - r < 4 ? rows - r : 4;
            tiles[R - 1](x + r * xs, xs, wv, wv_bytes, n, out + r * os + v, os, r == 0 ? next : NULL);
        }
        v += wide ? 4 : 1;
    }
}
#endif

static void axpy_portable(float *out, float p, const float *v, ptrdiff_t n) {
    for (ptrdiff_t d = 0; d < n; d++) out[d] = out[d] + p * v[d];
}

/* ---- path selection ---------------------------------------------------------------------------- */

int fo_best_path(void) {
#if FO_X86
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("f16c")) return 0;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        return 2;
    return 1;
#endif
    return 0;
}

int fo_select_path(int path) {
    int best = fo_best_path();
    g_path = path < 0 ? 0 : (path > best ? best : path);
    return g_path;
}

int fo_current_path(void) { return g_path; }

/* ---- public kernels ---------------------------------------------------------------------------- */

float fo_dot(const float *a, const void *b, int wtype, ptrdiff_t n) {
    float out;
#if FO_X86
    if (g_path >= 1) {
        const float *x[1] = {a};
        if (wtype == FO_W_F16)
            dot1_f16_avx2(x, b, n, &out);
        else if (wtype == FO_W_BF16)
            dot1_bf16_avx2(x, b, n, &out);
        else
            dot1_f32_avx2(x, b, n, &out);
        return out;
    }
#endif
    if (wtype == FO_W_F16) return dot_f16_portable(a, b, n);
    if (wtype == FO_W_BF16) return dot_bf16_portable(a, b, n);
    out = dot_f32_portable(a, b, n);
    return out;
}

static void dot4(const float *const x[4], const void *b, int wtype, ptrdiff_t n, float out[4]) {
#if FO_X86
    if (g_path >= 1) {
        if (wtype == FO_W_F16)
            dot4_f16_avx2(x, b, n, out);
        else if (wtype == FO_W_BF16)
            dot4_bf16_avx2(x, b, n, out);
        else
            dot4_f32_avx2(x, b, n, out);
        return;
    }
#endif
    for (int r = 0; r < 4; r++) out[r] = fo_dot(x[r], b, wtype, n);
}

void fo_head_rows(const float *x, ptrdiff_t xs, ptrdiff_t rows, const void *w, ptrdiff_t n_w, int wtype,
                  ptrdiff_t n, float *out, ptrdiff_t os) {
    /* Row groups outside, weight rows inside: a group of four activation rows stays in L1 while the
       block of weight rows streams past it (from memory once, then from L2 for the next groups). */
#if FO_X86
    if (g_path >= 2) {
        head_rows_avx512(x, xs, rows, (const char *)w, n_w, wtype, n, out, os);
        return;
    }
#endif
    const char *w_bytes = (const char *)w;
    ptrdiff_t row_bytes = n * (wtype == FO_W_F32 ? 4 : 2);
    ptrdiff_t r = 0;
    for (; r + 4 <= rows; r += 4) {
        const float *group[4] = {x + r * xs, x + (r + 1) * xs, x + (r + 2) * xs, x + (r + 3) * xs};
        for (ptrdiff_t v = 0; v < n_w; v++) {
            float res[4];
            dot4(group, w_bytes + v * row_bytes, wtype, n, res);
            for (int j = 0; j < 4; j++) out[(r + j) * os + v] = res[j];
        }
    }
    for (; r < rows; r++)
        for (ptrdiff_t v = 0; v < n_w; v++) out[r * os + v] = fo_dot(x + r * xs, w_bytes + v * row_bytes, wtype, n);
}

#if FO_X86
/* Ask for rows t .. t+3 (each head_dim floats, pos_stride apart) ahead of use: a decode step reads each
   layer's cache once, from DRAM, in short per-head streams the hardware prefetcher ramps up on too late. */
static inline void prefetch_rows(const float *base, ptrdiff_t t, ptrdiff_t n_pos, ptrdiff_t stride,
                                 ptrdiff_t head_dim) {
    for (ptrdiff_t r = t; r < t + 4 && r < n_pos; r++)
        for (ptrdiff_t c = 0; c < head_dim; c += 16) _mm_prefetch((const char *)(base + r * stride + c), _MM_HINT_T0);
}
#define FO_PREFETCH_AHEAD 8 /* positions */
#endif

void fo_attend(const float *q, const float *k, const float *v, ptrdiff_t n_pos, ptrdiff_t pos_stride,
               ptrdiff_t head_dim, float scale, float *scores, float *out) {
    void (*axpy)(float *, float, const float *, ptrdiff_t) = axpy_portable;
    float max_score = -INFINITY, total = 0.0f;
    ptrdiff_t t = 0;
#if FO_X86
    if (g_path >= 1) {
        axpy = axpy_avx2;
        for (; t + 4 <= n_pos; t += 4) {
            prefetch_rows(k, t + FO_PREFETCH_AHEAD, n_pos, pos_stride, head_dim);
            dot_q4_avx2(q, k + t * pos_stride, pos_stride, head_dim, scores + t);
        }
    }
#endif
    for (; t < n_pos; t++) scores[t] = fo_dot(q, k + t * pos_stride, FO_W_F32, head_dim);
    for (t = 0; t < n_pos; t++) {
        scores[t] = scores[t] * scale;
        if (scores[t] > max_score) max_score = scores[t];
    }
    for (t = 0; t < n_pos; t++) scores[t] = expf(scores[t] - max_score);
    for (t = 0; t < n_pos; t++) total = total + scores[t]; /* after the calls: nothing live across them */
    for (ptrdiff_t d = 0; d < head_dim; d++) out[d] = 0.0f;
    t = 0;
#if FO_X86
    if (g_path >= 1)
        for (; t + 4 <= n_pos; t += 4) {
            prefetch_rows(v, t + FO_PREFETCH_AHEAD, n_pos, pos_stride, head_dim);
            axpy4_avx2(out, scores + t, v + t * pos_stride, pos_stride, head_dim);
        }
#endif
    for (; t < n_pos; t++) axpy(out, scores[t], v + t * pos_stride, head_dim);
    float inv = 1.0f / total;
    for (ptrdiff_t d = 0; d < head_dim; d++) out[d] = out[d] * inv;
}

#if FO_X86
/* out_g = sum_t p_g[t] * v_t in position order for G heads (G <= 4, compile-time), over dims d0 ..
   d0 + 63 (chunks masked to head_dim): each v row is loaded once for all G heads and the G x 4 output
   vectors stay in registers across the whole position loop; then out_g *= inv_g. Element-wise the
   same additions as axpy_portable, starting from 0. */
FO_AVX512 static inline __attribute__((always_inline)) void attend_out_avx512(
    const int G, const int C, const float *p, ptrdiff_t p_stride, const float *v, ptrdiff_t n_pos, ptrdiff_t pos_stride,
    ptrdiff_t head_dim, ptrdiff_t d0, const float *inv, float *out, ptrdiff_t out_stride) {
    __mmask16 m[8];
    FO_UNROLL
    for (int c = 0; c < C; c++) {
        ptrdiff_t left = head_dim - d0 - 16 * c;
        m[c] = left >= 16 ? (__mmask16)0xffff : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
    }
    __m512 acc[4][8];
    FO_UNROLL
    for (int g = 0; g < G; g++)
        FO_UNROLL
        for (int c = 0; c < C; c++) acc[g][c] = _mm512_setzero_ps();
    const float *vd = v + d0;
    for (ptrdiff_t t = 0; t < n_pos; t++) {
        if (t + FO_PREFETCH_AHEAD < n_pos)
            for (ptrdiff_t c = 0; c < 16 * C && d0 + c < head_dim; c += 16)
                _mm_prefetch((const char *)(vd + (t + FO_PREFETCH_AHEAD) * pos_stride + c), _MM_HINT_T0);
        __m512 vv[8];
        FO_UNROLL
        for (int c = 0; c < C; c++) vv[c] = _mm512_maskz_loadu_ps(m[c], vd + t * pos_stride + 16 * c);
        FO_UNROLL
        for (int g = 0; g < G; g++) {
            __m512 pv = _mm512_set1_ps(p[g * p_stride + t]);
            FO_UNROLL
            for (int c = 0; c < C; c++) acc[g][c] = _mm512_add_ps(acc[g][c], _mm512_mul_ps(pv, vv[c]));
        }
    }
    FO_UNROLL
    for (int g = 0; g < G; g++) {
        __m512 iv = _mm512_set1_ps(inv[g]);
        FO_UNROLL
        for (int c = 0; c < C; c++)
            _mm512_mask_storeu_ps(out + g * out_stride + d0 + 16 * c, m[c], _mm512_mul_ps(acc[g][c], iv));
    }
}

#define FO_ATTEND_OUT(G, C, NAME)                                                                    \
    FO_AVX512 static void NAME(const float *p, ptrdiff_t p_stride, const float *v, ptrdiff_t n_pos,      \
                               ptrdiff_t pos_stride, ptrdiff_t head_dim, ptrdiff_t d0, const float *inv,   \
                               float *out, ptrdiff_t out_stride) {                                         \
        attend_out_avx512(G, C, p, p_stride, v, n_pos, pos_stride, head_dim, d0, inv, out, out_stride); \
    }
FO_ATTEND_OUT(1, 4, attend_out1_avx512)
FO_ATTEND_OUT(2, 4, attend_out2_avx512)
FO_ATTEND_OUT(3, 4, attend_out3_avx512)
FO_ATTEND_OUT(4, 4, attend_out4_avx512)
FO_ATTEND_OUT(1, 8, attend_out1w_avx512)
FO_ATTEND_OUT(2, 8, attend_out2w_avx512)
typedef void (*attend_out_fn)(const float *, ptrdiff_t, const float *, ptrdiff_t, ptrdiff_t, ptrdiff_t, ptrdiff_t,
                              const float *, float *, ptrdiff_t);
static const attend_out_fn g_attend_out[4] = {attend_out1_avx512, attend_out2_avx512, attend_out3_avx512,
                                              attend_out4_avx512};
/* one or two heads over up to 128 dims in one pass over V (8 chunks of 16) */
static const attend_out_fn g_attend_out_wide[2] = {attend_out1w_avx512, attend_out2w_avx512};

/* Scaled scores of NQ queries (NQ = 1, 2 or 4, q_stride apart) against P = 16 / NQ positions (k rows
   pos_stride apart): the 16 dots as one register tile, so one fold serves them all; dot (q, k_p) of
   query g sits in accumulator 4 * v + r with r = p % 4, v = (p / 4) * NQ + g, folded into lane
   4 * r + v. s[g * s_stride + p] = dot * scale (the same multiply fo_attend does after the dot). */
FO_AVX512 static inline __attribute__((always_inline)) void scores_tile_avx512(const int NQ, const float *q,
                                                                              ptrdiff_t q_stride, const float *k,
                                                                              ptrdiff_t pos_stride, ptrdiff_t n,
                                                                              float scale, float *s,
                                                                              ptrdiff_t s_stride) {
    const int P = 16 / NQ;
    __m512 acc[16];
    FO_UNROLL
    for (int a = 0; a < 16; a++) acc[a] = _mm512_setzero_ps();
    ptrdiff_t i = 0;
    for (; i + FO_LANES <= n; i += FO_LANES) {
        __m512 qv[4];
        FO_UNROLL
        for (int g = 0; g < NQ; g++) qv[g] = _mm512_loadu_ps(q + g * q_stride + i);
        FO_UNROLL
        for (int p = 0; p < P; p++) {
            __m512 kv = _mm512_loadu_ps(k + p * pos_stride + i);
            FO_UNROLL
            for (int g = 0; g < NQ; g++) {
                int a = 4 * ((p / 4) * NQ + g) + p % 4;
                acc[a] = _mm512_add_ps(acc[a], _mm512_mul_ps(qv[g], kv));
            }
        }
    }
    if (i < n) {
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        __m512 qv[4];
        FO_UNROLL
        for (int g = 0; g < NQ; g++) qv[g] = _mm512_maskz_loadu_ps(m, q + g * q_stride + i);
        FO_UNROLL
        for (int p = 0; p < P; p++) {
            __m512 kv = _mm512_maskz_loadu_ps(m, k + p * pos_stride + i);
            FO_UNROLL
            for (int g = 0; g < NQ; g++) {
                int a = 4 * ((p / 4) * NQ + g) + p % 4;
                acc[a] = _mm512_mask_add_ps(acc[a], m, acc[a], _mm512_mul_ps(qv[g], kv));
            }
        }
    }
    /* gather query g's P scores into lanes g * P .. g * P + P - 1, in position order */
    int order[FO_LANES];
    FO_UNROLL
    for (int g = 0; g < NQ; g++)
        FO_UNROLL
        for (int p = 0; p < P; p++) order[g * P + p] = 4 * (p % 4) + (p / 4) * NQ + g;
    __m512 res = _mm512_permutexvar_ps(_mm512_loadu_si512(order), fold16_avx512(acc));
    res = _mm512_mul_ps(res, _mm512_set1_ps(scale));
    FO_UNROLL
    for (int g = 0; g < NQ; g++) /* lanes outside the mask are not written (nor read) */
        _mm512_mask_storeu_ps(s + g * s_stride - g * P, (__mmask16)(((1u << P) - 1) << (g * P)), res);
}

#define FO_SCORES(NQ)                                                                                \
    FO_AVX512 static void scores##NQ##_avx512(const float *q, ptrdiff_t q_stride, const float *k,       \
                                              ptrdiff_t pos_stride, ptrdiff_t n, float scale, float *s,  \
                                              ptrdiff_t s_stride) {                                    \
        scores_tile_avx512(NQ, q, q_stride, k, pos_stride, n, scale, s, s_stride);                    \
    }
FO_SCORES(1)
FO_SCORES(2)
FO_SCORES(4)
typedef void (*scores_fn)(const float *, ptrdiff_t, const float *, ptrdiff_t, ptrdiff_t, float, float *, ptrdiff_t);
static const scores_fn g_scores[5] = {NULL, scores1_avx512, scores2_avx512, NULL, scores4_avx512};

/* The largest of n scores: max_ps(s, m) keeps m when s is NaN, so NaNs are skipped as by fo_attend's
   `if (s > max)`; the value is the same whatever the order (up to the sign of a zero maximum, and
   s - (+0) and s - (-0) give the same expf). */
FO_AVX512 static float max_scores_avx512(const float *s, ptrdiff_t n) {
    __m512 m = _mm512_set1_ps(-INFINITY);
    ptrdiff_t t = 0;
    for (; t + 16 <= n; t += 16) m = _mm512_max_ps(_mm512_loadu_ps(s + t), m);
    if (t < n) m = _mm512_max_ps(_mm512_mask_loadu_ps(m, (__mmask16)((1u << (n - t)) - 1), s + t), m);
    return _mm512_reduce_max_ps(m);
}

/* n_q <= 4 query heads over one KV head; scores: n_q rows of n_pos. */
static void attend_group_avx512(const float *q, ptrdiff_t q_stride, int n_q, const float *k, const float *v,
                                ptrdiff_t n_pos, ptrdiff_t pos_stride, ptrdiff_t head_dim, float scale,
                                float *scores, float *out, ptrdiff_t out_stride) {
    /* scaled scores: 16 dots per register tile where n_q divides 16, the head tiles (the query heads as
       activation rows, positions as weight rows) for the rest */
    ptrdiff_t t = 0;
    if (g_scores[n_q]) {
        const ptrdiff_t P = 16 / n_q;
        for (; t + P <= n_pos; t += P) {
            /* FO_PREFETCH_AHEAD positions ahead, as fo_attend (a decode step reads K from DRAM; 2 * P
               ahead measured 5-10% slower at n_q = 1, head_dim 96) */
            for (ptrdiff_t pp = 0; pp < P; pp += 4)
                prefetch_rows(k, t + FO_PREFETCH_AHEAD + pp, n_pos, pos_stride, head_dim);
            g_scores[n_q](q, q_stride, k + t * pos_stride, pos_stride, head_dim, scale, scores + t, n_pos);
        }
    }
    ptrdiff_t scaled = t;
    for (; t + 4 <= n_pos; t += 4) {
        prefetch_rows(k, t + FO_PREFETCH_AHEAD, n_pos, pos_stride, head_dim);
        g_tiles[FO_W_F32][1][n_q - 1](q, q_stride, (const char *)(k + t * pos_stride), pos_stride * 4, head_dim,
                                      scores + t, n_pos, NULL);
    }
    for (; t < n_pos; t++)
        g_tiles[FO_W_F32][0][n_q - 1](q, q_stride, (const char *)(k + t * pos_stride), pos_stride * 4, head_dim,
                                      scores + t, n_pos, NULL);
    /* softmax of each head exactly as fo_attend */
    float inv[4];
    for (int g = 0; g < n_q; g++) {
        float *s = scores + g * n_pos, max_score;
        for (t = scaled; t < n_pos; t++) s[t] = s[t] * scale;
        max_score = max_scores_avx512(s, n_pos);
        /* the calls first, then the sum in position order: the same additions, and no sum to keep
           across calls */
        for (t = 0; t < n_pos; t++) s[t] = expf(s[t] - max_score);
    }
    /* each head's sum in position order; two heads' chains side by side (the adds wait on each other
       within a head, not across heads) */
    for (int g = 0; g < n_q; g += 2) {
        const float *s0 = scores + g * n_pos, *s1 = s0 + n_pos;
        float total0 = 0.0f, total1 = 0.0f;
        if (g + 1 < n_q) {
            for (t = 0; t < n_pos; t++) {
                total0 = total0 + s0[t];
                total1 = total1 + s1[t];
            }
            inv[g + 1] = 1.0f / total1;
        } else {
            for (t = 0; t < n_pos; t++) total0 = total0 + s0[t];
        }
        inv[g] = 1.0f / total0;
    }
    /* one pass over V when the whole head fits the registers: rows of head_dim 96 in two passes (dims
       0-63, then 64-95) came from DRAM about 10% slower than fo_attend's single pass */
    if (n_q <= 2 && head_dim > 64 && head_dim <= 128) {
        g_attend_out_wide[n_q - 1](scores, n_pos, v, n_pos, pos_stride, head_dim, 0, inv, out, out_stride);
        return;
    }
    for (ptrdiff_t d0 = 0; d0 < head_dim; d0 += 64)
        g_attend_out[n_q - 1](scores, n_pos, v, n_pos, pos_stride, head_dim, d0, inv, out, out_stride);
}
#endif

/* Scores of a whole group fit here when the caller's scratch row is too short. */
#define FO_GROUP_SCORES 4096

void fo_attend_group(const float *q, ptrdiff_t q_stride, ptrdiff_t n_q, const float *k, const float *v,
                     ptrdiff_t n_pos, ptrdiff_t pos_stride, ptrdiff_t head_dim, float scale, float *scratch,
                     ptrdiff_t scratch_len, float *out, ptrdiff_t out_stride) {
#if FO_X86
    /* One query head per KV head (no GQA: nothing to share) goes through fo_attend: the grouped path
       measured up to 10-20% slower there in the 730M model's decode step (16 heads of 96, K and V
       from DRAM). */
    if (g_path >= 2 && n_q > 1) {
        float local[FO_GROUP_SCORES];
        float *scores = scratch;
        ptrdiff_t room = scratch_len;
        if (n_q * n_pos > scratch_len && n_pos <= FO_GROUP_SCORES / 4) {
            scores = local;
            room = FO_GROUP_SCORES;
        }
        ptrdiff_t per = room / n_pos; /* heads per pass (room >= n_pos) */
        if (per > 4) per = 4;
        for (ptrdiff_t g = 0; g < n_q; g += per) {
            int count = (int)(n_q - g < per ? n_q - g : per);
            attend_group_avx512(q + g * q_stride, q_stride, count, k, v, n_pos, pos_stride, head_dim, scale, scores,
                                out + g * out_stride, out_stride);
        }
        return;
    }
#endif
    for (ptrdiff_t g = 0; g < n_q; g++)
        fo_attend(q + g * q_stride, k, v, n_pos, pos_stride, head_dim, scale, scratch, out + g * out_stride);
}

#if FO_X86
/* fo_sum_squares with its 8 lanes in one zmm of doubles; the tail's masked add leaves other lanes be. */
FO_AVX512 static double sum_squares_avx512(const float *x, ptrdiff_t n) {
    __m512d acc = _mm512_setzero_pd();
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m512d d = _mm512_cvtps_pd(_mm256_loadu_ps(x + i));
        acc = _mm512_add_pd(acc, _mm512_mul_pd(d, d));
    }
    if (i < n) {
        __mmask8 m = (__mmask8)((1u << (n - i)) - 1);
        __m512d d = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, x + i));
        acc = _mm512_mask_add_pd(acc, m, acc, _mm512_mul_pd(d, d));
    }
    __m256d s4 = _mm256_add_pd(_mm512_castpd512_pd256(acc), _mm512_extractf64x4_pd(acc, 1)); /* w = 4 */
    __m128d s2 = _mm_add_pd(_mm256_castpd256_pd128(s4), _mm256_extractf128_pd(s4, 1));       /* w = 2 */
    return _mm_cvtsd_f64(_mm_add_sd(s2, _mm_unpackhi_pd(s2, s2)));                            /* w = 1 */
}

/* out = (x * inv) * w, element-wise. */
FO_AVX512 static void scale_mul_avx512(const float *x, float inv, const float *w, float *out, ptrdiff_t n) {
    __m512 iv = _mm512_set1_ps(inv);
    ptrdiff_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), iv), _mm512_loadu_ps(w + i)));
    if (i < n) {
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(out + i, m,
                              _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), iv),
                                            _mm512_maskz_loadu_ps(m, w + i)));
    }
}
#endif

void fo_rmsnorm_row(const float *x, const float *w, float *out, ptrdiff_t d, double eps) {
    float inv = (float)(1.0 / sqrt(fo_sum_squares(x, d) / (double)d + eps));
#if FO_X86
    if (g_path >= 2) {
        scale_mul_avx512(x, inv, w, out, d);
        return;
    }
#endif
    for (ptrdiff_t i = 0; i < d; i++) out[i] = (x[i] * inv) * w[i];
}

double fo_sum_squares(const float *x, ptrdiff_t n) {
#if FO_X86
    if (g_path >= 2) return sum_squares_avx512(x, n);
#endif
    double lane[8] = {0};
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) lane[j] += (double)x[i + j] * (double)x[i + j];
    for (int j = 0; i < n; i++, j++) lane[j] += (double)x[i] * (double)x[i];
    for (int w = 4; w > 0; w /= 2)
        for (int j = 0; j < w; j++) lane[j] += lane[j + w];
    return lane[0];
}

void fo_relu2_gate(const float *restrict gate, const float *restrict up, float *restrict out, ptrdiff_t n) {
    ptrdiff_t i = 0;
#if FO_X86
    /* gcc will not if-convert the select under IEEE trapping rules; maxps(g, 0) is the same select
       (it returns 0 for g <= 0 and for NaN, like the scalar line below). SSE is baseline on x86-64. */
    const __m128 zero = _mm_setzero_ps();
    for (; i + 4 <= n; i += 4) {
        __m128 v = _mm_max_ps(_mm_loadu_ps(gate + i), zero);
        _mm_storeu_ps(out + i, _mm_mul_ps(_mm_mul_ps(v, v), _mm_loadu_ps(up + i)));
    }
#endif
    for (; i < n; i++) {
        float v = gate[i] > 0.0f ? gate[i] : 0.0f;
        out[i] = (v * v) * up[i];
    }
}
