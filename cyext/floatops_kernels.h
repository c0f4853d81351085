/* Float kernels with a fixed summation order, used by floatops.pyx.
 *
 * Why a fixed order: numpy/BLAS choose blocking by matrix shape and thread count, so a row's result can
 * change with the batch it runs in. Here every dot product of length n is defined as:
 *   lane j (0 <= j < FO_LANES) sums a[i] * b[i] for i = j, j + FO_LANES, ... in increasing i
 *   (each product rounded to float, then added: built with -ffp-contract=off, so no FMA);
 *   the n % FO_LANES tail elements go to lanes 0, 1, ... in order;
 *   the lanes are then folded as a tree: for w = 8, 4, 2, 1: lane[j] += lane[j + w].
 * Every code path (portable C, AVX2, AVX-512) computes exactly this, so results are bit-identical across
 * paths, thread counts and batch shapes. cyext/reference.py emulates it in numpy.
 */
#ifndef FLOATOPS_KERNELS_H
#define FLOATOPS_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#define FO_LANES 16

/* Element types of a weight matrix; half and bfloat16 widen to float exactly before the multiply. */
enum { FO_W_F32 = 0, FO_W_F16 = 1, FO_W_BF16 = 2 };

/* 0 = portable C, 1 = AVX2 (+F16C), 2 = AVX-512 (F, BW, VL, DQ; the output head in register tiles of
 * 4 activation rows x 4 weight rows, one zmm accumulator per dot product). fo_select_path() clamps
 * to what the CPU supports. */
int fo_best_path(void);
int fo_select_path(int path);
int fo_current_path(void);

float fo_half_to_float(uint16_t h);
float fo_bf16_to_float(uint16_t h);

/* dot(a, b) in the documented order; b has element type wtype. */
float fo_dot(const float *a, const void *b, int wtype, ptrdiff_t n);

/* out[r * os + v] = dot(x + r * xs, row v of w) for r < rows, v < n_w (rows of w are n elements of
 * type wtype): one block of the output head. Several activation rows share each weight load. */
void fo_head_rows(const float *x, ptrdiff_t xs, ptrdiff_t rows, const void *w, ptrdiff_t n_w, int wtype,
                  ptrdiff_t n, float *out, ptrdiff_t os);

/* Attention of one query head over positions 0..n_pos-1 of one cached KV head (k, v point at position
 * 0; positions are pos_stride floats apart): scores = dot(q, k_t) * scale; softmax with the maximum
 * subtracted, expf, sum in position order; out = sum_t p_t * v_t in position order, times 1/sum.
 * scores needs n_pos floats of scratch. */
void fo_attend(const float *q, const float *k, const float *v, ptrdiff_t n_pos, ptrdiff_t pos_stride,
               ptrdiff_t head_dim, float scale, float *scores, float *out);

/* fo_attend for n_q query heads (q_stride floats apart; outputs out_stride apart) that share one KV
 * head: the same per-head computation and bits, with each K and V row loaded once for the group on
 * the AVX-512 path. scratch holds scratch_len >= n_pos floats (whole groups use n_q * n_pos when
 * they fit, else a stack buffer or smaller passes). */
void fo_attend_group(const float *q, ptrdiff_t q_stride, ptrdiff_t n_q, const float *k, const float *v,
                     ptrdiff_t n_pos, ptrdiff_t pos_stride, ptrdiff_t head_dim, float scale, float *scratch,
                     ptrdiff_t scratch_len, float *out, ptrdiff_t out_stride);

/* Sum of x[i]^2 in float64: 8 lanes (lane j takes i = j mod 8, tail to lanes 0, 1, ...), folded as a
 * tree (w = 4, 2, 1), so the order is fixed and the loop vectorises. */
double fo_sum_squares(const float *x, ptrdiff_t n);

/* One RMSNorm row: inv = (float)(1 / sqrt(fo_sum_squares(x, d) / d + eps)); out[i] = (x[i] * inv) * w[i].
 * out may be x. */
void fo_rmsnorm_row(const float *x, const float *w, float *out, ptrdiff_t d, double eps);

/* out = relu(gate)^2 * up, as (v * v) * up with v = gate > 0 ? gate : 0. */
void fo_relu2_gate(const float *restrict gate, const float *restrict up, float *restrict out, ptrdiff_t n);

#endif
