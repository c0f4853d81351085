/* Ternary matmul by table lookup: vpermw instead of a multiplier, in the "LUT layout" of the weights.
 *
 * Why: on Zen 4 every byte multiplier (vpdpbusd, vpmaddubsw; zmm or ymm) tops out at 64 u8 x s8
 * multiply-adds per cycle, and the unpacking they need costs more. A lookup covers more weights per
 * instruction: for three activations x0, x1, x2 of a row, a table of all 27 signed sums
 * w0*x0 + w1*x1 + w2*x2 (w in {-1, 0, 1}) fits one zmm of int16; vpermw then takes 32 indices (the
 * weight triples of 32 weight rows) and returns 32 partial sums: 96 multiply-adds per instruction,
 * plus one vpaddw to accumulate. Measured on Zen 4 (microbenchmark, one core): vpermw + vpaddw pairs
 * run at 0.80-0.82 per cycle = 77-79 multiply-adds per cycle, against 64 for vpdpbusd alone and about
 * 51 for the unpack + vpdpbusd mix of the tiled kernel.
 *
 * LUT layout (pack_lut): weight rows in groups of TQ_LUT_ROWS = 32 (the last group padded with zero
 * weights); each row's Kp weights (zero padded to a multiple of 9) in words of 9 weights; a 16-bit word
 * holds three 5-bit indices i_t = c0 + 3 c1 + 9 c2 of the codes c = w + 1 of weights 9q + 3t + s,
 * s = 0..2, in bits 5t..5t+4 (vpermw reads only the low 5 bits of each index, so the other two come
 * from one shift each). The words = ceil(Kp / 9) words of a row are cut into C = ceil(words / 28)
 * chunks as evenly as possible (chunk c: words [words*c/C, words*(c+1)/C)), and the array is
 * chunk-major: [chunk][group][word of the chunk][32 rows], so the kernel's pass over one chunk for a
 * range of groups reads one contiguous stream. G * words * 32 uint16 in all (G = ceil(N / 32)), no
 * padding inside: 1.78 bits per weight.
 *
 * Exactness: a table entry is at most 3 * 128 = 384 in magnitude. The kernel adds the lookups of
 * TQ_LUT_CHUNK = 28 words (84 lookups) in int16: |sum| <= 84 * 384 = 32256 <= 32767, so it cannot
 * wrap, whatever the weights and activations (tested with all weights -1 against x = -128). Then it
 * widens to int32. The result is the exact signed dot product, scaled by the same float operations as
 * tq_store, so this layout gives the same bits as the 2-bit kernels.
 *
 * Loop order: K in chunks of 28 words; per chunk the tables of four activation rows (4 x 84 x 64 bytes
 * = 21 KB) stay in L1 while the index words of every weight group of the task's range stream past;
 * the int32 sums of a chunk are added in the output array itself (its float32 slots hold int32 bits
 * until the final scaling pass). Rows run in blocks whose tables fit TABLE_BUDGET per thread.
 *
 * Rows from the quantiser (bitlinear_into) hold no -128, which lets rows of Kp = 256 (K <= 256) be summed in
 * int16 in one pass and stored as floats by the tiles themselves (span_fits); such calls also
 * quantise their rows inside the tasks (tq_bitlinear_lut). Tiles are up to 4 rows by 4 weight groups.
 *
 * Threads never share tables: lines written by one core and read by another travel between the cores
 * on every call (2 threads, M = 8, 2560 x 2560: a quarter of the time went to storing tables whose
 * lines the other core still held). With many rows, tasks are ranges of row tiles, each building the
 * tables of its own rows and reading all weights (read-only, shared without cost); with few rows,
 * tasks are ranges of weight groups and each thread builds the tables of all rows once, in its own
 * buffer, when it takes its first task.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ternary_kernels.h"

#define CHUNK_GROUPS (3 * TQ_LUT_CHUNK) /* 3-weight tables per chunk, at most: 84 */
#define TABLE_BYTES 64                  /* 32 int16 entries, 27 used */
#define TABLE_BUDGET (2 << 20)          /* bytes of tables per thread and row block */
#define MR 4                            /* activation rows per tile */
/* Over a matrix of more than this many bytes, tiles take one weight group at a time. Groups in twos and
 * fours win 10-25% when the words are in cache (the default model's matrices, 30-90 KB), but over
 * weights streamed from DRAM they cost up to half the speed (8192 x 1536, one thread, 32 matrices in
 * turn, us per call: M = 1 166 with one group per tile, 353-379 with two or four; M = 2 222-248 and
 * 400-456; M = 3 262-297 and 460-515). A decode step of a large model reads even its 0.5 MB matrices
 * (1536 x 1536) from DRAM: with a 1 MB threshold its bitlinear calls still ran 7-10% slower. */
#define STREAMED_BYTES (256 << 10)

/* -------------------------------------------------------------------------------------- layout */

static inline int64_t n_chunks(int64_t words) { return (words + TQ_LUT_CHUNK - 1) / TQ_LUT_CHUNK; }
static inline int64_t chunk_start(int64_t words, int64_t c) { return words * c / n_chunks(words); }

/* The index words of group g in chunk c: chunk_start(c+1) - chunk_start(c) words of 32 rows. */
static inline const uint16_t *chunk_words(const uint16_t *lut, int64_t groups, int64_t words, int64_t c,
                                          int64_t g) {
    int64_t q0 = chunk_start(words, c), cq = chunk_start(words, c + 1) - q0;
    return lut + (groups * q0 + g * cq) * TQ_LUT_ROWS;
}

typedef struct {
    const uint8_t *packed;
    uint16_t *lut;
    int64_t N, Kp, words, groups, tasks;
    _Atomic int64_t bad;    /* lowest index (in packed) of a byte holding code 3 */
    _Atomic int out_of_memory;
} pack_lut_job;

static void record_bad(pack_lut_job *j, int64_t byte) {
    int64_t cur = atomic_load_explicit(&j->bad, memory_order_relaxed);
    while (byte < cur &&
           !atomic_compare_exchange_weak_explicit(&j->bad, &cur, byte, memory_order_relaxed, memory_order_relaxed)) {
    }
}

/* Codes c = w + 1 of row n in element order, padded with 1 (weight 0) to 9 * words; rows past N are all 1. */
static void row_codes(pack_lut_job *j, int64_t n, uint8_t *codes) {
    const int64_t row_bytes = j->Kp / 4;
    memset(codes, 1, (size_t)(9 * j->words));
    if (n >= j->N) return;
    const uint8_t *row = j->packed + n * row_bytes;
    for (int64_t b = 0; b < j->Kp / TQ_BLOCK; b++)
        for (int jj = 0; jj < TQ_BLOCK_BYTES; jj++) {
            unsigned byte = row[b * TQ_BLOCK_BYTES + jj];
            for (int l = 0; l < 4; l++) {
                unsigned c = (byte >> (2 * l)) & 3;
                if (c == 3) {
                    record_bad(j, n * row_bytes + b * TQ_BLOCK_BYTES + jj);
                    c = 1;
                }
                codes[b * TQ_BLOCK + 64 * l + jj] = (uint8_t)c;
            }
        }
}

static void pack_lut_task(void *ctx, int64_t i, int thread) {
    pack_lut_job *j = (pack_lut_job *)ctx;
    uint8_t *codes = malloc((size_t)(9 * j->words) + 1);
    if (!codes) {
        atomic_store(&j->out_of_memory, 1);
        return;
    }
    for (int64_t g = j->groups * i / j->tasks; g < j->groups * (i + 1) / j->tasks; g++) {
        for (int r = 0; r < TQ_LUT_ROWS; r++) {
            row_codes(j, g * TQ_LUT_ROWS + r, codes);
            int64_t chunk = 0;
            for (int64_t q = 0; q < j->words; q++) {
                const uint8_t *c = codes + 9 * q;
                unsigned word = 0;
                for (int t = 0; t < 3; t++) word |= (unsigned)(c[3 * t] + 3 * c[3 * t + 1] + 9 * c[3 * t + 2]) << (5 * t);
                if (q == chunk_start(j->words, chunk + 1)) chunk++;
                uint16_t *dst = (uint16_t *)chunk_words(j->lut, j->groups, j->words, chunk, g);
                dst[(q - chunk_start(j->words, chunk)) * TQ_LUT_ROWS + r] = (uint16_t)word;
            }
        }
    }
    free(codes);
}

int64_t tq_pack_lut(const uint8_t *packed, int64_t N, int64_t Kp, uint16_t *lut, int n_threads) {
    int64_t groups = (N + TQ_LUT_ROWS - 1) / TQ_LUT_ROWS;
    pack_lut_job j = {packed, lut, N, Kp, tq_lut_words(Kp), groups, 1, INT64_MAX, 0};
    int threads = N * Kp >= (1 << 20) && n_threads > 1 ? n_threads : 1;
    j.tasks = threads > 1 ? (4 * threads < groups ? 4 * threads : groups) : 1;
    tq_parallel(j.tasks, pack_lut_task, &j, threads);
    if (atomic_load(&j.out_of_memory)) return -2;
    int64_t bad = atomic_load(&j.bad);
    return bad == INT64_MAX ? -1 : bad;
}

/* -------------------------------------------------------------------------------------- tables */

/* Table of the 3-weight group t (0 .. 3 * chunk size) of chunk c, row m of a block of mb rows:
 * chunk-major, so the tables of a tile's four rows for one chunk are contiguous. */
static inline int16_t *table_at(int16_t *tables, int64_t mb, int64_t c, int64_t m, int64_t t) {
    return tables + ((c * mb + m) * CHUNK_GROUPS + t) * (TABLE_BYTES / 2);
}

/* entry e: sum over s of (digit s of e in base 3, minus 1) * x[s]; entries 27..31 are 0 */
static void table_portable(const int8_t *x, int64_t k0, int64_t Kp, int16_t *t) {
    int v[3];
    for (int s = 0; s < 3; s++) v[s] = k0 + s < Kp ? x[k0 + s] : 0;
    for (int e = 0; e < 32; e++)
        t[e] = (int16_t)(e < 27 ? (e % 3 - 1) * v[0] + (e / 3 % 3 - 1) * v[1] + (e / 9 - 1) * v[2] : 0);
}

#ifdef TQ_HAVE_X86
#include <immintrin.h>
#define TARGET_BW __attribute__((target("avx512f,avx512bw")))

/* The tables of one row: T = maddubs((c0, c1), (x0, x1)) + maddubs((c2, 0), (x2, x3)) with unsigned codes
 * c = w + 1 (pairs at most 2 * 2 * 128 = 512: no saturation), then minus entry 13 (c = 1, 1, 1:
 * x0 + x1 + x2), which turns code sums into signed-weight sums; lanes 27..31 zeroed by the mask. */
TARGET_BW static void tables_row_avx512(const int8_t *x, int64_t Kp, int16_t *tables, int64_t mb, int64_t m) {
    uint8_t u01[64], u2[64];
    for (int e = 0; e < 32; e++) {
        int in = e < 27;
        u01[2 * e] = (uint8_t)(in ? e % 3 : 0);
        u01[2 * e + 1] = (uint8_t)(in ? e / 3 % 3 : 0);
        u2[2 * e] = (uint8_t)(in ? e / 9 : 0);
        u2[2 * e + 1] = 0;
    }
    const __m512i c01 = _mm512_loadu_si512(u01), c2 = _mm512_loadu_si512(u2);
    const __m512i entry13 = _mm512_set1_epi16(13);
    const int64_t words = tq_lut_words(Kp);
    for (int64_t c = 0; c < n_chunks(words); c++) {
        for (int64_t g = 3 * chunk_start(words, c); g < 3 * chunk_start(words, c + 1); g++) {
            int16_t *dst = table_at(tables, mb, c, m, g - 3 * chunk_start(words, c));
            if (3 * g + 3 >= Kp) { /* the last groups: x[3g + 3] is past the row */
                table_portable(x, 3 * g, Kp, dst);
                continue;
            }
            int16_t p01, p23;
            memcpy(&p01, x + 3 * g, 2);
            memcpy(&p23, x + 3 * g + 2, 2);
            __m512i tc = _mm512_add_epi16(_mm512_maddubs_epi16(c01, _mm512_set1_epi16(p01)),
                                          _mm512_maddubs_epi16(c2, _mm512_set1_epi16(p23)));
            _mm512_storeu_si512(dst, _mm512_maskz_sub_epi16(0x07ffffff, tc, _mm512_permutexvar_epi16(entry13, tc)));
        }
    }
}
#endif

/* -------------------------------------------------------------------------------------- kernels */

typedef struct {
    const tq_lut_args *a;
    int16_t *tables; /* one region of table_stride entries per thread index */
    int64_t table_stride, m0, mb, groups, tasks;
    int simd, split_rows; /* split_rows: tasks are ranges of row tiles, else of weight groups */
    int streamed;         /* the matrix is larger than STREAMED_BYTES: its words come from DRAM */
    unsigned char built[TQ_MAX_THREADS]; /* built[t]: thread t's tables hold this block's rows */
    const tq_lut_quantize *quant;        /* not NULL: split_rows tasks quantise their own rows first */
    _Atomic int64_t *bad_row;            /* lowest row a task found holding NaN or infinity (shared: tasks
                                            copy the job, so the atomic itself lives outside it) */
} lut_job;

/* Quantise rows m0 .. m1-1 of the float input into a->xq (the activations of the matmul). */
static void quantize_rows(lut_job *j, int64_t m0, int64_t m1) {
    const tq_lut_quantize *qz = j->quant;
    const tq_lut_args *a = j->a;
    for (int64_t m = m0; m < m1; m++) {
        if (qz->row_fn(qz->x + m * qz->x_stride, qz->K, a->Kp, (int8_t *)a->xq + m * a->x_stride,
                       (float *)a->x_scale + m, qz->x_sum + m)) {
            int64_t cur = atomic_load_explicit(j->bad_row, memory_order_relaxed);
            while (m < cur && !atomic_compare_exchange_weak_explicit(j->bad_row, &cur, m, memory_order_relaxed,
                                                                     memory_order_relaxed)) {
            }
        }
    }
}

/* The tables of rows m0 .. m0+mb-1 into one thread's region. */
static void build_tables(const lut_job *j, int16_t *tables) {
    const tq_lut_args *a = j->a;
    const int64_t words = tq_lut_words(a->Kp);
    for (int64_t m = 0; m < j->mb; m++) {
        const int8_t *x = a->xq + (j->m0 + m) * a->x_stride;
#ifdef TQ_HAVE_X86
        if (j->simd) {
            tables_row_avx512(x, a->Kp, tables, j->mb, m);
            continue;
        }
#endif
        for (int64_t c = 0; c < n_chunks(words); c++)
            for (int64_t g = 3 * chunk_start(words, c); g < 3 * chunk_start(words, c + 1); g++)
                table_portable(x, 3 * g, a->Kp, table_at(tables, j->mb, c, m, g - 3 * chunk_start(words, c)));
    }
}

static inline float scaled(const tq_lut_args *a, int64_t m, int64_t n, int32_t dot) {
    return ((float)dot / a->x_scale[m]) * a->w_scale[n]; /* the same operations as tq_store */
}

/* Plain C: every weight row against every row of the block, whole K, int32 sums. */
static void lut_rows_portable(const lut_job *j, int16_t *tables, int64_t g0, int64_t g1) {
    const tq_lut_args *a = j->a;
    const int64_t words = tq_lut_words(a->Kp);
    for (int64_t g = g0; g < g1; g++) {
        for (int r = 0; r < TQ_LUT_ROWS && g * TQ_LUT_ROWS + r < a->N; r++) {
            int64_t n = g * TQ_LUT_ROWS + r;
            for (int64_t m = 0; m < j->mb; m++) {
                int32_t dot = 0;
                for (int64_t c = 0; c < n_chunks(words); c++) {
                    const uint16_t *w = chunk_words(a->w, j->groups, words, c, g);
                    for (int64_t q = 0; q < chunk_start(words, c + 1) - chunk_start(words, c); q++) {
                        unsigned word = w[q * TQ_LUT_ROWS + r];
                        for (int t = 0; t < 3; t++)
                            dot += table_at(tables, j->mb, c, m, 3 * q + t)[(word >> (5 * t)) & 31];
                    }
                }
                a->out[(j->m0 + m) * a->out_stride + n] = scaled(a, j->m0 + m, n, dot);
            }
        }
    }
}

#ifdef TQ_HAVE_X86
#define TQ_INLINE static inline __attribute__((always_inline))

/* A chunk's index words for the task's groups are one contiguous stream. With one or two activation rows
 * the hardware prefetcher keeps up with it; with four rows per tile the loads come further apart and it
 * falls behind, so full tiles ask for the line 4 KB ahead into L2. Measured on Zen 4 with weights from
 * DRAM (one thread): M = 4: 116 -> 187 G weights/s, M = 8: 155 -> 211, M = 32: 187 -> 218; the same
 * prefetch on one-row tiles cost M = 1 about 10%. */
#define PREFETCH_AHEAD 4096

/* rows m0 .. m0+R-1 of the block against the GR weight groups g .. g+GR-1 over the words of chunks
 * c0 .. c1-1 (a span: int16 sums of at most span_words(j) words, see lut_rows_avx512), widened and added
 * to the int32 sums kept in `out`, or, when the span is the whole row (first and last), scaled and
 * stored as the final floats at once. Each table is loaded once for GR groups (1, 2 or 4) and each
 * index word once for R rows. */
TARGET_BW TQ_INLINE void lut_tile(const lut_job *j, int16_t *tables, int64_t m0, int64_t g, int64_t c0, int64_t c1,
                                  int first, int last, const int R, const int GR) {
    const tq_lut_args *a = j->a;
    const int64_t words = tq_lut_words(a->Kp);
    __m512i acc[4][MR];
    for (int gi = 0; gi < GR; gi++)
        for (int r = 0; r < R; r++) acc[gi][r] = _mm512_setzero_si512();
    for (int64_t c = c0; c < c1; c++) {
        const int64_t cq = chunk_start(words, c + 1) - chunk_start(words, c);
        const uint16_t *w[4];
        for (int gi = 0; gi < GR; gi++) w[gi] = chunk_words(a->w, j->groups, words, c, g + gi);
        const int16_t *t = table_at(tables, j->mb, c, m0, 0);
        for (int64_t q = 0; q < cq; q++) {
            __m512i i0[4], i1[4], i2[4];
            for (int gi = 0; gi < GR; gi++) {
                if (R == MR && m0 == 0) /* the first full tile of a chunk reads the weights from DRAM */
                    _mm_prefetch((const char *)(w[gi] + q * TQ_LUT_ROWS) + PREFETCH_AHEAD, _MM_HINT_T1);
                i0[gi] = _mm512_loadu_si512(w[gi] + q * TQ_LUT_ROWS);
                i1[gi] = _mm512_srli_epi16(i0[gi], 5);
                i2[gi] = _mm512_srli_epi16(i0[gi], 10);
            }
            for (int r = 0; r < R; r++) {
                const int16_t *tr = t + (r * CHUNK_GROUPS + 3 * q) * 32;
                __m512i t0 = _mm512_loadu_si512(tr), t1 = _mm512_loadu_si512(tr + 32);
                __m512i t2 = _mm512_loadu_si512(tr + 64);
                for (int gi = 0; gi < GR; gi++) {
                    acc[gi][r] = _mm512_add_epi16(acc[gi][r], _mm512_permutexvar_epi16(i0[gi], t0));
                    acc[gi][r] = _mm512_add_epi16(acc[gi][r], _mm512_permutexvar_epi16(i1[gi], t1));
                    acc[gi][r] = _mm512_add_epi16(acc[gi][r], _mm512_permutexvar_epi16(i2[gi], t2));
                }
            }
        }
    }
    for (int gi = 0; gi < GR; gi++) {
        int64_t n0 = (g + gi) * TQ_LUT_ROWS, valid = a->N - n0 < TQ_LUT_ROWS ? a->N - n0 : TQ_LUT_ROWS;
        __mmask16 lo = (__mmask16)(valid >= 16 ? 0xffff : (1u << valid) - 1);
        __mmask16 hi = (__mmask16)(valid >= 32 ? 0xffff : valid <= 16 ? 0 : (1u << (valid - 16)) - 1);
        for (int r = 0; r < R; r++) {
            const int64_t m = j->m0 + m0 + r;
            int32_t *o = (int32_t *)(a->out + m * a->out_stride + n0);
            __m512i s0 = _mm512_cvtepi16_epi32(_mm512_castsi512_si256(acc[gi][r]));
            __m512i s1 = _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(acc[gi][r], 1));
            if (first && last) { /* the same IEEE operations as finish_rows */
                const __m512 xs = _mm512_set1_ps(a->x_scale[m]);
                __m512 f0 = _mm512_div_ps(_mm512_cvtepi32_ps(s0), xs);
                __m512 f1 = _mm512_div_ps(_mm512_cvtepi32_ps(s1), xs);
                f0 = _mm512_mul_ps(f0, _mm512_maskz_loadu_ps(lo, a->w_scale + n0));
                f1 = _mm512_mul_ps(f1, _mm512_maskz_loadu_ps(hi, a->w_scale + n0 + 16));
                _mm512_mask_storeu_ps(a->out + m * a->out_stride + n0, lo, f0);
                _mm512_mask_storeu_ps(a->out + m * a->out_stride + n0 + 16, hi, f1);
                continue;
            }
            if (!first) {
                s0 = _mm512_add_epi32(s0, _mm512_maskz_loadu_epi32(lo, o));
                s1 = _mm512_add_epi32(s1, _mm512_maskz_loadu_epi32(hi, o + 16));
            }
            _mm512_mask_storeu_epi32(o, lo, s0);
            _mm512_mask_storeu_epi32(o + 16, hi, s1);
        }
    }
}

/* The int32 sums in out[m, n0:n1] become ((float)sum / x_scale[m]) * w_scale[n], lane by lane the
 * same IEEE operations as scaled(). */
TARGET_BW static void finish_rows(const tq_lut_args *a, int64_t m, int64_t n0, int64_t n1) {
    float *o = a->out + m * a->out_stride;
    const __m512 xs = _mm512_set1_ps(a->x_scale[m]);
    for (int64_t n = n0; n < n1; n += 16) {
        __mmask16 k = (__mmask16)(n1 - n >= 16 ? 0xffff : (1u << (n1 - n)) - 1);
        __m512 v = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(k, o + n));
        v = _mm512_mul_ps(_mm512_div_ps(v, xs), _mm512_maskz_loadu_ps(k, a->w_scale + n));
        _mm512_mask_storeu_ps(o + n, k, v);
    }
}

/* Whether chunks c0 .. c1-1 can be summed in int16 in one pass. A lookup is at most 3 * 128 in
 * magnitude, so one chunk (at most TQ_LUT_CHUNK = 28 words, 84 lookups: 32256) is safe for any int8
 * rows. Rows from the quantiser never hold -128 (|x| * (127 / max|x|) rounds to at most 127), and the
 * activations past Kp are zero, so a span covering at most 258 activations of the row (258 * 127 =
 * 32766) is safe too. Kp is a multiple of 256, so in practice that is Kp = 256 (K <= 256): the whole
 * row is one pass (256 * 127 = 32512 at most), and the tiles store the final floats
 * without int32 partial sums in `out` (measured: 256-column matrices, M = 16, about 10% faster). */
static inline int span_fits(const lut_job *j, int64_t words, int64_t c0, int64_t c1) {
    if (c1 == c0 + 1) return 1;
    if (!j->quant) return 0;
    int64_t k0 = 9 * chunk_start(words, c0), k1 = 9 * chunk_start(words, c1);
    if (k1 > j->a->Kp) k1 = j->a->Kp;
    return 127 * (k1 - k0) <= 32767;
}

/* Tiles of MR rows (the last one 1..MR) by GR = 4 weight groups, then 2 and 1 for the rest: a table
 * load and the loop overhead serve several groups, and few rows still get several accumulator chains.
 * Measured one thread, the default model's matrices: against GR = 1, GR = 2 gave M = 1 about 10% and
 * M = 16 about 5%; GR = 4 then M = 1 5-14%, M = 2-3 4-16%, M = 4-16 1-11% more. */
TARGET_BW TQ_INLINE void lut_span(const lut_job *j, int16_t *tables, int64_t g0, int64_t g1, int64_t c0, int64_t c1,
                                  int first, int last) {
    for (int64_t m = 0; m < j->mb; m += MR) {
        const int64_t R = j->mb - m < MR ? j->mb - m : MR;
        int64_t g = g0;
        for (; g + 4 <= g1 && !j->streamed; g += 4) {
            switch (R) {
            case 1: lut_tile(j, tables, m, g, c0, c1, first, last, 1, 4); break;
            case 2: lut_tile(j, tables, m, g, c0, c1, first, last, 2, 4); break;
            case 3: lut_tile(j, tables, m, g, c0, c1, first, last, 3, 4); break;
            default: lut_tile(j, tables, m, g, c0, c1, first, last, 4, 4); break;
            }
        }
        for (; g + 2 <= g1 && !j->streamed; g += 2) {
            switch (R) {
            case 1: lut_tile(j, tables, m, g, c0, c1, first, last, 1, 2); break;
            case 2: lut_tile(j, tables, m, g, c0, c1, first, last, 2, 2); break;
            case 3: lut_tile(j, tables, m, g, c0, c1, first, last, 3, 2); break;
            default: lut_tile(j, tables, m, g, c0, c1, first, last, 4, 2); break;
            }
        }
        for (; g < g1; g++) {
            switch (R) {
            case 1: lut_tile(j, tables, m, g, c0, c1, first, last, 1, 1); break;
            case 2: lut_tile(j, tables, m, g, c0, c1, first, last, 2, 1); break;
            case 3: lut_tile(j, tables, m, g, c0, c1, first, last, 3, 1); break;
            default: lut_tile(j, tables, m, g, c0, c1, first, last, 4, 1); break;
            }
        }
    }
}

TARGET_BW static void lut_rows_avx512(const lut_job *j, int16_t *tables, int64_t g0, int64_t g1) {
    const tq_lut_args *a = j->a;
    const int64_t words = tq_lut_words(a->Kp), chunks = n_chunks(words);
    int64_t n0 = g0 * TQ_LUT_ROWS, n1 = g1 * TQ_LUT_ROWS < a->N ? g1 * TQ_LUT_ROWS : a->N;
    if (words == 0) /* K = 0: every dot product is 0 */
        for (int64_t m = 0; m < j->mb; m++) memset(a->out + (j->m0 + m) * a->out_stride + n0, 0, (size_t)(n1 - n0) * 4);
    for (int64_t c0 = 0, c1; c0 < chunks; c0 = c1) {
        for (c1 = c0 + 1; c1 < chunks && span_fits(j, words, c0, c1 + 1); c1++) {
        }
        if (c0 == 0 && c1 == chunks) { /* one span: the tiles store the final floats */
            lut_span(j, tables, g0, g1, c0, c1, 1, 1);
            return;
        }
        lut_span(j, tables, g0, g1, c0, c1, c0 == 0, 0);
    }
    for (int64_t m = 0; m < j->mb; m++) finish_rows(a, j->m0 + m, n0, n1);
}
#endif

static void lut_run(const lut_job *j, int16_t *tables, int64_t g0, int64_t g1) {
#ifdef TQ_HAVE_X86
    if (j->simd) {
        lut_rows_avx512(j, tables, g0, g1);
        return;
    }
#endif
    lut_rows_portable(j, tables, g0, g1);
}

static void lut_task(void *ctx, int64_t i, int thread) {
    lut_job *j = (lut_job *)ctx;
    int16_t *tables = j->tables + thread * j->table_stride;
    if (j->split_rows) { /* row tiles [t0, t1) of the block against every weight group */
        int64_t tiles = (j->mb + MR - 1) / MR, t0 = tiles * i / j->tasks, t1 = tiles * (i + 1) / j->tasks;
        if (t0 >= t1) return;
        lut_job rows = *j;
        rows.m0 = j->m0 + t0 * MR;
        rows.mb = (t1 * MR < j->mb ? t1 * MR : j->mb) - t0 * MR;
        if (j->quant) quantize_rows(j, rows.m0, rows.m0 + rows.mb);
        build_tables(&rows, tables);
        lut_run(&rows, tables, 0, j->groups);
        return;
    }
    int64_t g0 = j->groups * i / j->tasks, g1 = j->groups * (i + 1) / j->tasks;
    if (g0 >= g1) return;
    if (!j->built[thread]) { /* only thread `thread` touches built[thread] */
        build_tables(j, tables);
        j->built[thread] = 1;
    }
    lut_run(j, tables, g0, g1);
}

/* -------------------------------------------------------------------------------------- driver */

/* Each calling thread keeps its table buffer between calls (decode calls this hundreds of times a
 * second; a fresh multi-megabyte allocation would page-fault every time). Freed when the thread ends. */
static pthread_key_t tables_key;
static pthread_once_t tables_key_once = PTHREAD_ONCE_INIT;
static __thread int16_t *tls_tables;
static __thread size_t tls_tables_size;

static void free_tables(void *p) { free(p); }
static void make_tables_key(void) { pthread_key_create(&tables_key, free_tables); }

static int16_t *thread_tables(size_t bytes) {
    if (bytes <= tls_tables_size) return tls_tables;
    pthread_once(&tables_key_once, make_tables_key);
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes) != 0) return NULL;
    free(tls_tables);
    tls_tables = (int16_t *)p;
    tls_tables_size = bytes;
    pthread_setspecific(tables_key, p);
    return tls_tables;
}

int tq_lut_simd_available(void) {
#ifdef TQ_HAVE_X86
    return tq_x86_cpu_has(TQ_PATH_AVX512BW);
#else
    return 0;
#endif
}

/* Below this many multiply-adds a second thread costs more to wake than it saves (as in tq_gemm). */
#define LUT_MIN_WORK_PER_THREAD (1 << 19)
/* Tasks per thread: few, so that each reuses its tables (or, split by rows, its weights) over much work;
 * two still leave most of a late worker's share to the others. With one shared set of tables
 * (M = 32, 2 threads, 2560 x 2560), 1 task per thread gave 390 G weights/s, 2: 375, 4: 340. */
#define TASKS_PER_THREAD 2

int tq_gemm_lut(const tq_lut_args *a, int simd, int n_threads) {
    int64_t r = tq_bitlinear_lut(a, NULL, simd, n_threads);
    return r == -2 ? -1 : 0;
}

int64_t tq_bitlinear_lut(const tq_lut_args *a, const tq_lut_quantize *quant, int simd, int n_threads) {
    if (a->M == 0 || a->N == 0) return -1;
    simd = simd && tq_lut_simd_available();
    const int64_t words = tq_lut_words(a->Kp), chunks = n_chunks(words);
    const int64_t row_bytes = chunks * CHUNK_GROUPS * TABLE_BYTES;
    int64_t block = TABLE_BUDGET / (row_bytes > 0 ? row_bytes : 1);
    block = block < MR ? MR : block - block % MR;
    if (block > a->M) block = a->M;
    const int64_t groups = (a->N + TQ_LUT_ROWS - 1) / TQ_LUT_ROWS;
    int64_t useful = block * a->N * a->Kp / LUT_MIN_WORK_PER_THREAD;
    int threads = useful < n_threads ? (int)(useful > 1 ? useful : 1) : n_threads;
    if (threads > TQ_MAX_THREADS) threads = TQ_MAX_THREADS;
    const int64_t stride = (block * row_bytes > 0 ? block * row_bytes : 64) / 2; /* int16 entries */
    int16_t *tables = thread_tables((size_t)(threads * stride * 2));
    if (!tables) return -2;
    lut_job j;
    j.a = a;
    j.tables = tables;
    j.table_stride = stride;
    j.groups = groups;
    j.simd = simd;
    j.streamed = groups * words * TQ_LUT_ROWS * 2 > STREAMED_BYTES;
    j.quant = quant;
    _Atomic int64_t bad_row;
    atomic_init(&bad_row, INT64_MAX);
    j.bad_row = &bad_row;
    for (int64_t m0 = 0; m0 < a->M; m0 += block) {
        j.m0 = m0;
        j.mb = a->M - m0 < block ? a->M - m0 : block;
        int64_t tiles = (j.mb + MR - 1) / MR, parts = threads > 1 ? TASKS_PER_THREAD * threads : 1;
        /* measured 2 threads, M = 8, 2560 x 2560: 450 G weights/s split by rows, 300-360 split by groups */
        j.split_rows = threads > 1 && tiles >= threads;
        int64_t units = j.split_rows ? tiles : groups;
        j.tasks = parts < units ? parts : units;
        memset(j.built, 0, sizeof j.built);
        /* tasks split by groups all read every row of the block: quantise them first */
        if (quant && !j.split_rows) quantize_rows(&j, m0, m0 + j.mb);
        tq_parallel(j.tasks, lut_task, &j, threads);
    }
    int64_t bad = atomic_load_explicit(&bad_row, memory_order_relaxed);
    return bad == INT64_MAX ? -1 : bad;
}
