/* x86-64 SIMD ternary matmuls (AVX2, AVX-512BW and AVX-512 VNNI) and row quantisation (AVX2, AVX-512).
 *
 * Each function carries its own target attribute, so the extension is compiled for baseline x86-64 and
 * these paths are only entered after a run-time CPU check (tq_x86_cpu_has). All of them compute the
 * exact integer dot products of the codes c = w + 1 in {0, 1, 2} with int8 activations:
 *  - AVX2 / AVX-512BW: maddubs (u8 x s8 -> pairs summed to int16, each pair at most 2 * 2 * 128 = 512 in
 *    magnitude), the 4 int16 results of one half block (AVX2) or block (AVX-512BW) added (at most 2048,
 *    far from 32767), then widened to int32 with madd against ones. Nothing can saturate or wrap.
 *  - VNNI: vpdpbusd multiplies u8 x s8 and accumulates straight into int32 lanes.
 * Tiles: several activation rows share each unpacked weight vector, and for VNNI several weight rows
 * share each activation vector, so the unpack cost and the loads are spread over many multiply-adds.
 */
#if defined(__x86_64__)
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "ternary_kernels.h"

#define TQ_INLINE static inline __attribute__((always_inline))
#define TARGET_AVX2 __attribute__((target("avx2")))
#define TARGET_AVX512BW __attribute__((target("avx512f,avx512bw")))
#define TARGET_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

/* Activation rows per chunk: the chunk's int8 rows (chunk * Kp bytes) should stay in L2 while every
 * weight row of the thread's range passes over them. */
static int64_t m_chunk(const tq_gemm_args *a) {
    int64_t row_bytes = a->n_blocks * TQ_BLOCK;
    int64_t rows = row_bytes > 0 ? (256 * 1024) / row_bytes : a->M;
    rows = rows < 4 ? 4 : rows & ~(int64_t)3;
    return rows;
}

/* A real model's weights come from DRAM (they never fit the cache), and each weight byte is used once
 * per call in decode. Asking for the line 16 KB ahead of every weight row stream, into L2, doubled
 * the DRAM rate of the decode kernel on Zen 4 (about 8 -> 20 GB/s on one core); the hardware
 * prefetcher alone does not run far enough ahead of four interleaved row streams. Prefetches past
 * the end of the matrix are harmless (they never fault). */
#define PREFETCH_WEIGHTS(p) _mm_prefetch((const char *)(p) + 256 * TQ_BLOCK_BYTES, _MM_HINT_T1)

int tq_x86_cpu_has(int path) {
    __builtin_cpu_init();
    int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
    switch (path) {
    case TQ_PATH_AVX2: return __builtin_cpu_supports("avx2") != 0;
    case TQ_PATH_AVX512BW: return avx512;
    case TQ_PATH_AVX512VNNI:
        return avx512 && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    default: return 0;
    }
}

/* ------------------------------------------------------------------------------------------ AVX2 */

TARGET_AVX2 TQ_INLINE int32_t hsum_256(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* MR activation rows against one weight row (AVX2 has 16 registers: one weight row at a time). The
 * int16 sums are widened every half block: carrying them over the whole block spilled registers. */
TARGET_AVX2 TQ_INLINE void avx2_tile(const tq_gemm_args *a, int64_t m0, int64_t n, const int MR) {
    const __m256i mask = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    const uint8_t *w = a->w + n * a->w_stride;
    const int8_t *x[4];
    __m256i acc[4];
    for (int i = 0; i < MR; i++) {
        x[i] = a->xq + (m0 + i) * a->x_stride;
        acc[i] = _mm256_setzero_si256();
    }
    for (int64_t b = 0; b < a->n_blocks; b++) {
        PREFETCH_WEIGHTS(w + b * TQ_BLOCK_BYTES);
        for (int h = 0; h < 2; h++) {
            __m256i raw = _mm256_loadu_si256((const __m256i *)(w + b * TQ_BLOCK_BYTES + 32 * h));
            __m256i c0 = _mm256_and_si256(raw, mask);
            __m256i c1 = _mm256_and_si256(_mm256_srli_epi16(raw, 2), mask);
            __m256i c2 = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
            __m256i c3 = _mm256_and_si256(_mm256_srli_epi16(raw, 6), mask);
            for (int i = 0; i < MR; i++) {
                const int8_t *xb = x[i] + b * TQ_BLOCK + 32 * h;
                __m256i p0 = _mm256_maddubs_epi16(c0, _mm256_loadu_si256((const __m256i *)(xb)));
                __m256i p1 = _mm256_maddubs_epi16(c1, _mm256_loadu_si256((const __m256i *)(xb + 64)));
                __m256i p2 = _mm256_maddubs_epi16(c2, _mm256_loadu_si256((const __m256i *)(xb + 128)));
                __m256i p3 = _mm256_maddubs_epi16(c3, _mm256_loadu_si256((const __m256i *)(xb + 192)));
                __m256i s = _mm256_add_epi16(_mm256_add_epi16(p0, p1), _mm256_add_epi16(p2, p3));
                acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(s, ones));
            }
        }
    }
    for (int i = 0; i < MR; i++) tq_store(a, m0 + i, n, hsum_256(acc[i]));
}

TARGET_AVX2 void tq_gemm_avx2(const tq_gemm_args *a, int64_t n0, int64_t n1) {
    const int64_t mc = m_chunk(a);
    for (int64_t c0 = 0; c0 < a->M; c0 += mc) {
        int64_t c1 = c0 + mc < a->M ? c0 + mc : a->M;
        for (int64_t n = n0; n < n1; n++) {
            int64_t m = c0;
            for (; m + 4 <= c1; m += 4) avx2_tile(a, m, n, 4);
            switch (c1 - m) {
            case 3: avx2_tile(a, m, n, 3); break;
            case 2: avx2_tile(a, m, n, 2); break;
            case 1: avx2_tile(a, m, n, 1); break;
            default: break;
            }
        }
    }
}

/* ------------------------------------------------------------------------------------ AVX-512BW */

/* MR activation rows against NR weight rows, maddubs into int16, widened once per block. */
TARGET_AVX512BW TQ_INLINE void avx512bw_tile(const tq_gemm_args *a, int64_t m0, int64_t n0, const int MR,
                                             const int NR) {
    const __m512i mask = _mm512_set1_epi8(3), ones = _mm512_set1_epi16(1);
    const uint8_t *w[2];
    const int8_t *x[4];
    __m512i acc[4][2];
    for (int r = 0; r < NR; r++) w[r] = a->w + (n0 + r) * a->w_stride;
    for (int i = 0; i < MR; i++) {
        x[i] = a->xq + (m0 + i) * a->x_stride;
        for (int r = 0; r < NR; r++) acc[i][r] = _mm512_setzero_si512();
    }
    for (int64_t b = 0; b < a->n_blocks; b++) {
        __m512i c[2][4];
        for (int r = 0; r < NR; r++) {
            __m512i raw = _mm512_loadu_si512((const void *)(w[r] + b * TQ_BLOCK_BYTES));
            PREFETCH_WEIGHTS(w[r] + b * TQ_BLOCK_BYTES);
            c[r][0] = _mm512_and_si512(raw, mask);
            c[r][1] = _mm512_and_si512(_mm512_srli_epi16(raw, 2), mask);
            c[r][2] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), mask);
            c[r][3] = _mm512_and_si512(_mm512_srli_epi16(raw, 6), mask);
        }
        for (int i = 0; i < MR; i++) {
            const int8_t *xb = x[i] + b * TQ_BLOCK;
            __m512i x0 = _mm512_loadu_si512((const void *)(xb));
            __m512i x1 = _mm512_loadu_si512((const void *)(xb + 64));
            __m512i x2 = _mm512_loadu_si512((const void *)(xb + 128));
            __m512i x3 = _mm512_loadu_si512((const void *)(xb + 192));
            for (int r = 0; r < NR; r++) {
                __m512i s = _mm512_add_epi16(
                    _mm512_add_epi16(_mm512_maddubs_epi16(c[r][0], x0), _mm512_maddubs_epi16(c[r][1], x1)),
                    _mm512_add_epi16(_mm512_maddubs_epi16(c[r][2], x2), _mm512_maddubs_epi16(c[r][3], x3)));
                acc[i][r] = _mm512_add_epi32(acc[i][r], _mm512_madd_epi16(s, ones));
            }
        }
    }
    for (int i = 0; i < MR; i++)
        for (int r = 0; r < NR; r++) tq_store(a, m0 + i, n0 + r, _mm512_reduce_add_epi32(acc[i][r]));
}

TARGET_AVX512BW TQ_INLINE void avx512bw_rows(const tq_gemm_args *a, int64_t c0, int64_t c1, int64_t n,
                                             const int NR) {
    int64_t m = c0;
    for (; m + 4 <= c1; m += 4) avx512bw_tile(a, m, n, 4, NR);
    switch (c1 - m) {
    case 3: avx512bw_tile(a, m, n, 3, NR); break;
    case 2: avx512bw_tile(a, m, n, 2, NR); break;
    case 1: avx512bw_tile(a, m, n, 1, NR); break;
    default: break;
    }
}

TARGET_AVX512BW void tq_gemm_avx512bw(const tq_gemm_args *a, int64_t n0, int64_t n1) {
    const int64_t mc = m_chunk(a);
    for (int64_t c0 = 0; c0 < a->M; c0 += mc) {
        int64_t c1 = c0 + mc < a->M ? c0 + mc : a->M;
        int64_t n = n0;
        for (; n + 2 <= n1; n += 2) avx512bw_rows(a, c0, c1, n, 2);
        if (n < n1) avx512bw_rows(a, c0, c1, n, 1);
    }
}

/* ---------------------------------------------------------------------------------- AVX-512 VNNI */

/* acc += dot4(u8 codes, s8 activations) per int32 lane. Inline asm rather than the intrinsic: GCC 12
 * register-allocates the intrinsic's tied accumulator badly here (copies and stack spills inside the
 * inner loop, about 25% slower); the asm form keeps every accumulator in its own register. */
#define DPBUSD(acc, codes, act) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(codes), "vm"(act))

/* Sums of four vectors at once: lane r of the result is the sum of all lanes of v[r]. */
TARGET_VNNI TQ_INLINE __m128i hsum4_512(__m512i v0, __m512i v1, __m512i v2, __m512i v3) {
    __m512i s01 = _mm512_add_epi32(_mm512_unpacklo_epi32(v0, v1), _mm512_unpackhi_epi32(v0, v1));
    __m512i s23 = _mm512_add_epi32(_mm512_unpacklo_epi32(v2, v3), _mm512_unpackhi_epi32(v2, v3));
    /* each 128-bit chunk now holds [v0, v1, v0, v1] and [v2, v3, v2, v3] partial sums */
    __m512i s = _mm512_add_epi32(_mm512_unpacklo_epi64(s01, s23), _mm512_unpackhi_epi64(s01, s23));
    /* each chunk: [v0, v1, v2, v3]; add the four chunks */
    __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64(s, 1));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

/* Four finished dot products at once: lane by lane the IEEE operations of tq_store (a scalar division
 * per output cost as much as a 4x4 tile's multiply-adds when K is one block). */
TARGET_VNNI TQ_INLINE void store_row_sums(const tq_gemm_args *a, int64_t m, int64_t n0, int NR, __m128i sums) {
    if (NR == 4) {
        __m128 v = _mm_cvtepi32_ps(_mm_sub_epi32(sums, _mm_set1_epi32(a->x_sum[m])));
        v = _mm_mul_ps(_mm_div_ps(v, _mm_set1_ps(a->x_scale[m])), _mm_loadu_ps(a->w_scale + n0));
        _mm_storeu_ps(a->out + m * a->out_stride + n0, v);
        return;
    }
    int32_t s[4];
    _mm_storeu_si128((__m128i *)s, sums);
    for (int r = 0; r < NR; r++) tq_store(a, m, n0 + r, s[r]);
}

/* One activation row against NR weight rows (decode). No shifts: masking byte bits 2l..2l+1 in place
 * gives c * 4^l, which vpdpbusd takes as an unsigned byte (at most 192); each l keeps its own
 * accumulator and is divided back exactly at the end (arithmetic shift of a multiple of 4^l). On
 * Zen 4 the shifts would compete with vpdpbusd for the same pipes; the masks run beside it for free.
 * Per lane |acc| <= 4 * 192 * 128 * n_blocks: within int32 for K up to 2^22 (checked in Python). */
TARGET_VNNI TQ_INLINE void vnni_row(const tq_gemm_args *a, int64_t m, int64_t n0, const int NR) {
    const __m512i k0 = _mm512_set1_epi8(0x03), k1 = _mm512_set1_epi8(0x0c);
    const __m512i k2 = _mm512_set1_epi8(0x30), k3 = _mm512_set1_epi8((char)0xc0);
    const int8_t *x = a->xq + m * a->x_stride;
    const uint8_t *w[4];
    __m512i acc[4][4];
    for (int r = 0; r < NR; r++) {
        w[r] = a->w + (n0 + r) * a->w_stride;
        for (int l = 0; l < 4; l++) acc[r][l] = _mm512_setzero_si512();
    }
    for (int64_t b = 0; b < a->n_blocks; b++) {
        const int8_t *xb = x + b * TQ_BLOCK;
        __m512i x0 = _mm512_loadu_si512((const void *)(xb));
        __m512i x1 = _mm512_loadu_si512((const void *)(xb + 64));
        __m512i x2 = _mm512_loadu_si512((const void *)(xb + 128));
        __m512i x3 = _mm512_loadu_si512((const void *)(xb + 192));
        for (int r = 0; r < NR; r++) {
            __m512i raw = _mm512_loadu_si512((const void *)(w[r] + b * TQ_BLOCK_BYTES));
            PREFETCH_WEIGHTS(w[r] + b * TQ_BLOCK_BYTES);
            DPBUSD(acc[r][0], _mm512_and_si512(raw, k0), x0);
            DPBUSD(acc[r][1], _mm512_and_si512(raw, k1), x1);
            DPBUSD(acc[r][2], _mm512_and_si512(raw, k2), x2);
            DPBUSD(acc[r][3], _mm512_and_si512(raw, k3), x3);
        }
    }
    __m512i tot[4];
    for (int r = 0; r < 4; r++) tot[r] = _mm512_setzero_si512();
    for (int r = 0; r < NR; r++)
        tot[r] = _mm512_add_epi32(_mm512_add_epi32(acc[r][0], _mm512_srai_epi32(acc[r][1], 2)),
                                  _mm512_add_epi32(_mm512_srai_epi32(acc[r][2], 4), _mm512_srai_epi32(acc[r][3], 6)));
    store_row_sums(a, m, n0, NR, hsum4_512(tot[0], tot[1], tot[2], tot[3]));
}

/* Four activation rows against four weight rows (prefill, batched decode): each weight block is
 * unpacked once (shift and mask) for four rows, each activation vector feeds four weight rows: 64
 * vpdpbusd per 20 loads and 28 unpack operations. Written out with named registers because GCC spills
 * the array form of this 16-accumulator tile. */
TARGET_VNNI TQ_INLINE void vnni_tile_4x4(const tq_gemm_args *a, int64_t m0, int64_t n0) {
    const __m512i mask = _mm512_set1_epi8(3);
    const uint8_t *w0 = a->w + n0 * a->w_stride, *w1 = w0 + a->w_stride;
    const uint8_t *w2 = w1 + a->w_stride, *w3 = w2 + a->w_stride;
    const int8_t *p0 = a->xq + m0 * a->x_stride, *p1 = p0 + a->x_stride;
    const int8_t *p2 = p1 + a->x_stride, *p3 = p2 + a->x_stride;
#define TQ_FOR_4X4(F) F(0, 0) F(0, 1) F(0, 2) F(0, 3) F(1, 0) F(1, 1) F(1, 2) F(1, 3) \
                      F(2, 0) F(2, 1) F(2, 2) F(2, 3) F(3, 0) F(3, 1) F(3, 2) F(3, 3)
#define TQ_ZERO(i, r) __m512i acc##i##r = _mm512_setzero_si512();
#define TQ_DP(i, r) DPBUSD(acc##i##r, c##r, x##i);
    TQ_FOR_4X4(TQ_ZERO)
    for (int64_t b = 0; b < a->n_blocks; b++) {
        const int64_t wo = b * TQ_BLOCK_BYTES, xo = b * TQ_BLOCK;
        __m512i r0 = _mm512_loadu_si512((const void *)(w0 + wo)), r1 = _mm512_loadu_si512((const void *)(w1 + wo));
        __m512i r2 = _mm512_loadu_si512((const void *)(w2 + wo)), r3 = _mm512_loadu_si512((const void *)(w3 + wo));
        PREFETCH_WEIGHTS(w0 + wo);
        PREFETCH_WEIGHTS(w1 + wo);
        PREFETCH_WEIGHTS(w2 + wo);
        PREFETCH_WEIGHTS(w3 + wo);
#define TQ_SLICE(L)                                                                                       \
    {                                                                                                     \
        __m512i x0 = _mm512_loadu_si512((const void *)(p0 + xo + 64 * (L)));                              \
        __m512i x1 = _mm512_loadu_si512((const void *)(p1 + xo + 64 * (L)));                              \
        __m512i x2 = _mm512_loadu_si512((const void *)(p2 + xo + 64 * (L)));                              \
        __m512i x3 = _mm512_loadu_si512((const void *)(p3 + xo + 64 * (L)));                              \
        __m512i c0 = _mm512_and_si512(_mm512_srli_epi16(r0, 2 * (L)), mask);                              \
        __m512i c1 = _mm512_and_si512(_mm512_srli_epi16(r1, 2 * (L)), mask);                              \
        __m512i c2 = _mm512_and_si512(_mm512_srli_epi16(r2, 2 * (L)), mask);                              \
        __m512i c3 = _mm512_and_si512(_mm512_srli_epi16(r3, 2 * (L)), mask);                              \
        TQ_FOR_4X4(TQ_DP)                                                                                 \
    }
        TQ_SLICE(0)
        TQ_SLICE(1)
        TQ_SLICE(2)
        TQ_SLICE(3)
    }
    store_row_sums(a, m0 + 0, n0, 4, hsum4_512(acc00, acc01, acc02, acc03));
    store_row_sums(a, m0 + 1, n0, 4, hsum4_512(acc10, acc11, acc12, acc13));
    store_row_sums(a, m0 + 2, n0, 4, hsum4_512(acc20, acc21, acc22, acc23));
    store_row_sums(a, m0 + 3, n0, 4, hsum4_512(acc30, acc31, acc32, acc33));
#undef TQ_SLICE
#undef TQ_DP
#undef TQ_ZERO
#undef TQ_FOR_4X4
}

/* The same tile for the edges: MR in 1..4 activation rows, NR in 1..4 weight rows. */
TARGET_VNNI TQ_INLINE void vnni_tile(const tq_gemm_args *a, int64_t m0, int64_t n0, const int MR, const int NR) {
    const __m512i mask = _mm512_set1_epi8(3);
    const uint8_t *w[4];
    const int8_t *x[4];
    __m512i acc[4][4];
    for (int r = 0; r < NR; r++) w[r] = a->w + (n0 + r) * a->w_stride;
    for (int i = 0; i < MR; i++) {
        x[i] = a->xq + (m0 + i) * a->x_stride;
        for (int r = 0; r < NR; r++) acc[i][r] = _mm512_setzero_si512();
    }
    for (int64_t b = 0; b < a->n_blocks; b++) {
        __m512i raw[4];
        for (int r = 0; r < NR; r++) {
            raw[r] = _mm512_loadu_si512((const void *)(w[r] + b * TQ_BLOCK_BYTES));
            PREFETCH_WEIGHTS(w[r] + b * TQ_BLOCK_BYTES);
        }
        for (int l = 0; l < 4; l++) {
            __m512i xv[4];
            for (int i = 0; i < MR; i++) xv[i] = _mm512_loadu_si512((const void *)(x[i] + b * TQ_BLOCK + 64 * l));
            for (int r = 0; r < NR; r++) {
                __m512i c = _mm512_and_si512(_mm512_srli_epi16(raw[r], 2 * l), mask);
                for (int i = 0; i < MR; i++) DPBUSD(acc[i][r], c, xv[i]);
            }
        }
    }
    const __m512i zero = _mm512_setzero_si512();
    for (int i = 0; i < MR; i++)
        store_row_sums(a, m0 + i, n0, NR,
                       hsum4_512(acc[i][0], NR > 1 ? acc[i][1] : zero, NR > 2 ? acc[i][2] : zero,
                                 NR > 3 ? acc[i][3] : zero));
}

TARGET_VNNI TQ_INLINE void vnni_rows(const tq_gemm_args *a, int64_t c0, int64_t c1, int64_t n, const int NR) {
    int64_t m = c0;
    for (; m + 4 <= c1; m += 4) {
        if (NR == 4)
            vnni_tile_4x4(a, m, n);
        else
            vnni_tile(a, m, n, 4, NR);
    }
    switch (c1 - m) {
    case 3: vnni_tile(a, m, n, 3, NR); break;
    case 2: vnni_tile(a, m, n, 2, NR); break;
    case 1: vnni_row(a, m, n, NR); break;
    default: break;
    }
}

TARGET_VNNI void tq_gemm_avx512vnni(const tq_gemm_args *a, int64_t n0, int64_t n1) {
    const int64_t mc = m_chunk(a);
    for (int64_t c0 = 0; c0 < a->M; c0 += mc) {
        int64_t c1 = c0 + mc < a->M ? c0 + mc : a->M;
        int64_t n = n0;
        for (; n + 4 <= n1; n += 4) vnni_rows(a, c0, c1, n, 4);
        for (; n < n1; n++) vnni_rows(a, c0, c1, n, 1);
    }
}

/* ----------------------------------------------------------------------------------- quantisation */

/* The same row quantisation as tq_quantize_row_portable, 8 or 16 floats at a time: the maximum is exact
 * in any order, x * scale is the same IEEE product, min/max clip like the scalar compares (the row is
 * finite by then), and cvtps2dq rounds half to even under the default rounding mode, as the scalar
 * magic-number add does. So the bytes, the scale and the sum are identical. */

TARGET_AVX2 int tq_quantize_row_avx2(const float *row, int64_t K, int64_t Kp, int8_t *q, float *scale_out,
                                     int32_t *sum_out) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), fmax = _mm256_set1_ps(FLT_MAX);
    __m256 vmax = _mm256_setzero_ps();
    int not_finite = 0;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 v = _mm256_and_ps(_mm256_loadu_ps(row + k), abs_mask);
        not_finite |= _mm256_movemask_ps(_mm256_cmp_ps(v, fmax, _CMP_NLE_UQ));
        vmax = _mm256_max_ps(vmax, v);
    }
    float lanes[8], amax = 0.0f;
    _mm256_storeu_ps(lanes, vmax);
    for (int i = 0; i < 8; i++) amax = lanes[i] > amax ? lanes[i] : amax;
    for (; k < K; k++) {
        float v = fabsf(row[k]);
        not_finite |= !(v <= FLT_MAX);
        amax = v > amax ? v : amax;
    }
    if (not_finite) return 1;
    float scale = 127.0f / (amax > 1e-5f ? amax : 1e-5f);
    const __m256 s = _mm256_set1_ps(scale), lo = _mm256_set1_ps(-128.0f), hi = _mm256_set1_ps(127.0f);
    __m256i acc = _mm256_setzero_si256();
    for (k = 0; k + 8 <= K; k += 8) {
        __m256 v = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_loadu_ps(row + k), s), lo), hi);
        __m256i i = _mm256_cvtps_epi32(v);
        acc = _mm256_add_epi32(acc, i);
        __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
        _mm_storel_epi64((__m128i *)(q + k), _mm_packs_epi16(w16, w16));
    }
    int32_t sum = hsum_256(acc);
    for (; k < K; k++) {
        float v = row[k] * scale;
        v = v < -128.0f ? -128.0f : v;
        v = v > 127.0f ? 127.0f : v;
        int8_t c = (int8_t)_mm_cvtss_si32(_mm_set_ss(v));
        q[k] = c;
        sum += c;
    }
    memset(q + K, 0, (size_t)(Kp - K));
    *scale_out = scale;
    *sum_out = sum;
    return 0;
}

TARGET_AVX512BW int tq_quantize_row_avx512(const float *row, int64_t K, int64_t Kp, int8_t *q, float *scale_out,
                                           int32_t *sum_out) {
    const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
    const __m512 fmax = _mm512_set1_ps(FLT_MAX);
    __m512 vmax = _mm512_setzero_ps();
    __mmask16 not_finite = 0;
    for (int64_t k = 0; k < K; k += 16) {
        __mmask16 m = (__mmask16)(K - k >= 16 ? 0xffff : (1u << (K - k)) - 1);
        __m512 v = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(_mm512_maskz_loadu_ps(m, row + k)), abs_mask));
        not_finite |= _mm512_cmp_ps_mask(v, fmax, _CMP_NLE_UQ);
        vmax = _mm512_max_ps(vmax, v);
    }
    if (not_finite) return 1;
    float amax = _mm512_reduce_max_ps(vmax);
    float scale = 127.0f / (amax > 1e-5f ? amax : 1e-5f);
    const __m512 s = _mm512_set1_ps(scale), lo = _mm512_set1_ps(-128.0f), hi = _mm512_set1_ps(127.0f);
    __m512i acc = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 16) {
        __mmask16 m = (__mmask16)(K - k >= 16 ? 0xffff : (1u << (K - k)) - 1);
        __m512 v = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + k), s), lo), hi);
        __m512i i = _mm512_cvtps_epi32(v); /* masked-off lanes are 0 */
        acc = _mm512_add_epi32(acc, i);
        _mm512_mask_cvtepi32_storeu_epi8(q + k, m, i);
    }
    memset(q + K, 0, (size_t)(Kp - K));
    *scale_out = scale;
    *sum_out = _mm512_reduce_add_epi32(acc);
    return 0;
}

#endif /* __x86_64__ */
