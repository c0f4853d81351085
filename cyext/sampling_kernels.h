/* Drawing a token from softmax(logits / temperature), one row at a time, in a fixed order.
 *
 * Why C: the scheduler draws the tokens of a whole batch every step, and with numpy that is a dozen
 * small calls (and float64 copies of every row) on the engine thread holding the GIL. Here a row is
 * three passes over its logits without the GIL, rows split over the worker pool.
 *
 * The definition every path follows (cyext/reference.py emulates it with numpy float32 arithmetic):
 *   m = max_i x[i] over the x[i] that are not NaN        (exact; NaN logits get weight 0)
 *   w[i] = fs_exp_neg((x[i] - m) * inv_t)                (float32; inv_t = (float)(1 / temperature))
 *   block sums: blocks of FS_BLOCK weights; each sums (double)w[i] in 8 lanes (lane i % 8 of the
 *     block, in increasing i), folded as a tree (lanes j += j + 4, then j += j + 2, then j += j + 1);
 *   cum[b] = cum[b - 1] + sum[b] in double; target = u * cum[last];
 *   block = number of cum[b] <= target (at most the last block); before = cum[block - 1] or 0;
 *   inside the block, c = sequential double sum of w; index = number of c <= target - before (at most
 *     the block's last element); if w[index] == 0 (rounding can land there), step back to the nearest
 *     earlier non-zero weight.
 * fs_exp_neg(z), z <= 0: 0 below FS_EXP_MIN; else n = round(z * log2(e)) (by adding and subtracting
 *   1.5 * 2^23), r = (z - n * LN2_HI) - n * LN2_LO, p = the degree 7 Taylor polynomial of e^r in Horner
 *   form (coefficients 1/k! rounded to float), result p * 2^n. Relative error about 1e-7: plenty for
 *   drawing; what matters is that every path computes the same bits.
 */
#ifndef SAMPLING_KERNELS_H
#define SAMPLING_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#define FS_BLOCK 128

/* Paths: 0 = portable C, 1 = AVX-512F (same operations, 16 at a time). */
int fs_best_path(void);
int fs_select_path(int path);
int fs_current_path(void);

/* e^z for z <= 0 as defined above (one value; the row kernel runs the same steps vectorised). */
float fs_exp_neg(float z);

/* The weights and block sums of one row of n >= 1 logits (the first two passes of the draw); returns m.
 * When m or inv_t is not finite (a temperature so small that 1 / T overflows a float) nothing is
 * written. */
float fs_row_weights(const float *x, int64_t n, float inv_t, float *weights, double *block_sums);

/* The index drawn from one row of n logits with uniform u in [0, 1); scratch: weights (n floats) and
 * block_sums (one double per FS_BLOCK weights, rounded up). A row whose maximum m is not finite
 * (+inf, or -inf when every logit is -inf or NaN) has no distribution, and an infinite inv_t leaves
 * only the maximum: both return the first index holding m, or 0. */
int64_t fs_draw_row(const float *x, int64_t n, float inv_t, double u, float *weights, double *block_sums);

#endif
