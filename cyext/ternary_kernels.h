/* Ternary kernels in plain C, shared by cyext/ternary.pyx (the Python API) and the SIMD sources.
 *
 * The packed layout, the rounding rules and the exactness argument are documented at the top of
 * ternary.pyx (the LUT layout at the top of ternary_lut.c); this header only declares what the .c files
 * provide. All functions may be called from several threads at once (the only shared state is the
 * worker pool, which serialises itself; the LUT kernel's table buffers belong to each calling thread)
 * and never touch Python.
 */
#ifndef BITNET_GRPC_TERNARY_KERNELS_H
#define BITNET_GRPC_TERNARY_KERNELS_H

#include <stdint.h>

#include "task_pool.h"

#define TQ_BLOCK 256      /* weights per packed block */
#define TQ_BLOCK_BYTES 64 /* 2 bits per weight */

/* Kernel implementations, in order of preference (last available one wins by default). */
enum {
    TQ_PATH_PORTABLE = 0,
    TQ_PATH_AVX2 = 1,
    TQ_PATH_AVX512BW = 2,
    TQ_PATH_AVX512VNNI = 3,
    TQ_N_PATHS = 4
};

/* One ternary matmul: out[m, n] = ((float)(dot(c[n], xq[m]) - x_sum[m]) / x_scale[m]) * w_scale[n],
 * with c[n] the codes w + 1 of packed row n. Strides are in elements of each array's type. */
typedef struct {
    const int8_t *xq;      /* [M, n_blocks * 256], zero padded */
    int64_t x_stride;
    const float *x_scale;  /* [M] */
    const int32_t *x_sum;  /* [M], sum of xq over the row */
    const uint8_t *w;      /* [N, n_blocks * 64] packed codes */
    int64_t w_stride;
    const float *w_scale;  /* [N] */
    float *out;            /* [M, N] */
    int64_t out_stride;
    int64_t M, N, n_blocks;
} tq_gemm_args;

/* Computes output columns [n0, n1) of every row; n0 is a multiple of 4. */
typedef void (*tq_gemm_fn)(const tq_gemm_args *a, int64_t n0, int64_t n1);

/* Store one finished dot product. Every path calls this so the float rounding is identical. */
static inline void tq_store(const tq_gemm_args *a, int64_t m, int64_t n, int32_t dot_codes) {
    int32_t acc = dot_codes - a->x_sum[m];
    a->out[m * a->out_stride + n] = ((float)acc / a->x_scale[m]) * a->w_scale[n];
}

/* ternary_pool.c (declared in task_pool.h, shared with floatops) */
void tq_parallel(int64_t n_tasks, tq_task_fn task, void *ctx, int n_threads);

/* ternary_dispatch.c */
int tq_path_available(int path);
const char *tq_path_name(int path);
int tq_best_path(void);
void tq_gemm(const tq_gemm_args *a, int path, int n_threads);

/* ternary_portable.c */
void tq_gemm_portable(const tq_gemm_args *a, int64_t n0, int64_t n1);
/* Quantise one row (K floats) into q[0, Kp) (zero padded), its scale and sum; returns 1 without
 * writing anything if the row holds NaN or infinity. Every path gives the same bytes. */
typedef int (*tq_quantize_row_fn)(const float *row, int64_t K, int64_t Kp, int8_t *q, float *scale, int32_t *sum);
int tq_quantize_row_portable(const float *row, int64_t K, int64_t Kp, int8_t *q, float *scale, int32_t *sum);
tq_quantize_row_fn tq_quantize_row_fn_for(int path); /* ternary_dispatch.c */
/* Returns -1 on success, else the index of the first row holding NaN or infinity. `path` as for tq_gemm. */
int64_t tq_quantize_rows(const float *x, int64_t x_stride, int64_t M, int64_t K, int64_t Kp, int8_t *xq,
                         int64_t xq_stride, float *x_scale, int32_t *x_sum, int path, int n_threads);
/* Returns -1 on success, else the flat index of the first code outside {-1, 0, 1}. */
int64_t tq_pack(const int8_t *codes, int64_t N, int64_t K, int64_t Kp, uint8_t *packed, int n_threads);
/* Returns -1 on success, else the flat index (in packed) of the first byte holding code 3. */
int64_t tq_unpack(const uint8_t *packed, int64_t N, int64_t K, int64_t Kp, int8_t *codes, int n_threads);
/* Returns -1 on success, else the flat index of the first non-finite weight. */
int64_t tq_ternarize(const float *w, int64_t N, int64_t K, int8_t *codes, float *scale, double *row_sums,
                     int n_threads);

/* ternary_lut.c: the LUT layout (layout and exactness argument at the top of that file) */
#define TQ_LUT_ROWS 32  /* weight rows per group: one zmm of 16-bit indices */
#define TQ_LUT_CHUNK 28 /* index words (84 lookups) summed in int16 before widening */
static inline int64_t tq_lut_words(int64_t Kp) { return (Kp + 8) / 9; } /* 9 weights per word */

typedef struct {
    const int8_t *xq; /* [M, Kp], zero padded */
    int64_t x_stride;
    const float *x_scale;  /* [M] */
    const uint16_t *w;     /* [ceil(N / 32)][tq_lut_words(Kp)][32] */
    const float *w_scale;  /* [N] */
    float *out;            /* [M, N] */
    int64_t out_stride;
    int64_t M, N, Kp;
} tq_lut_args;

/* Returns -1 on success, -2 if out of memory, else the flat index (in packed) of the first byte holding
 * code 3. */
int64_t tq_pack_lut(const uint8_t *packed, int64_t N, int64_t Kp, uint16_t *lut, int n_threads);
int tq_lut_simd_available(void);
/* simd = 0 forces plain C. Returns -1 if the table buffer cannot be allocated, else 0. */
int tq_gemm_lut(const tq_lut_args *a, int simd, int n_threads);
/* The float input of a bitlinear call, quantised into a->xq / a->x_scale inside the matmul's own tasks
 * (each thread quantises the rows whose tables it builds), with the row function of a kernel path. */
typedef struct {
    const float *x; /* [M, K] */
    int64_t x_stride; /* in floats */
    int64_t K;
    int32_t *x_sum; /* [M] */
    tq_quantize_row_fn row_fn;
} tq_lut_quantize;
/* Quantise (if quant is not NULL) and multiply. Returns -1 on success, -2 if the table buffer cannot be
 * allocated, else the first row holding NaN or infinity (out then holds garbage). */
int64_t tq_bitlinear_lut(const tq_lut_args *a, const tq_lut_quantize *quant, int simd, int n_threads);

/* ternary_x86.c: compiled only on x86-64, each function with its own target attribute. */
#if defined(__x86_64__)
#define TQ_HAVE_X86 1
void tq_gemm_avx2(const tq_gemm_args *a, int64_t n0, int64_t n1);
void tq_gemm_avx512bw(const tq_gemm_args *a, int64_t n0, int64_t n1);
void tq_gemm_avx512vnni(const tq_gemm_args *a, int64_t n0, int64_t n1);
int tq_quantize_row_avx2(const float *row, int64_t K, int64_t Kp, int8_t *q, float *scale, int32_t *sum);
int tq_quantize_row_avx512(const float *row, int64_t K, int64_t Kp, int8_t *q, float *scale, int32_t *sum);
int tq_x86_cpu_has(int path);
#endif

#endif
