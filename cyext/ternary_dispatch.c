/* Kernel path table and the OpenMP driver that splits a matmul's output rows between threads. */
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "ternary_kernels.h"

static const char *const PATH_NAMES[TQ_N_PATHS] = {"portable", "avx2", "avx512bw", "avx512vnni"};

static tq_gemm_fn path_fn(int path) {
    switch (path) {
#ifdef TQ_HAVE_X86
    case TQ_PATH_AVX2: return tq_gemm_avx2;
    case TQ_PATH_AVX512BW: return tq_gemm_avx512bw;
    case TQ_PATH_AVX512VNNI: return tq_gemm_avx512vnni;
#endif
    default: return tq_gemm_portable;
    }
}

int tq_path_available(int path) {
    if (path == TQ_PATH_PORTABLE) return 1;
#ifdef TQ_HAVE_X86
    if (path > 0 && path < TQ_N_PATHS) return tq_x86_cpu_has(path);
#endif
    return 0;
}

const char *tq_path_name(int path) { return path >= 0 && path < TQ_N_PATHS ? PATH_NAMES[path] : "?"; }

int tq_best_path(void) {
    for (int p = TQ_N_PATHS - 1; p > 0; p--)
        if (tq_path_available(p)) return p;
    return TQ_PATH_PORTABLE;
}

/* Below this many multiply-adds a second thread costs more to wake than it saves. */
#define TQ_GEMM_MIN_WORK_PER_THREAD (1 << 19)

/* Each thread gets one contiguous range of output rows, in whole 4-row tiles, so a thread streams its
 * own part of the weight matrix once. The result does not depend on the split: every output element
 * is computed by the same code whichever thread runs it. */
void tq_gemm(const tq_gemm_args *a, int path, int n_threads) {
    tq_gemm_fn fn = path_fn(path);
    int64_t tiles = (a->N + 3) / 4;
    int64_t work = a->M * a->N * a->n_blocks * TQ_BLOCK;
    int64_t useful = work / TQ_GEMM_MIN_WORK_PER_THREAD;
    int nt = n_threads;
    if (nt > tiles) nt = (int)tiles;
    if (nt > useful) nt = useful > 1 ? (int)useful : 1;
    if (nt <= 1 || a->M == 0) {
        if (a->N > 0 && a->M > 0) fn(a, 0, a->N);
        return;
    }
#pragma omp parallel num_threads(nt)
    {
#ifdef _OPENMP
        int t = omp_get_thread_num(), T = omp_get_num_threads();
#else
        int t = 0, T = 1;
#endif
        int64_t n0 = 4 * (tiles * t / T), n1 = 4 * (tiles * (t + 1) / T);
        if (n1 > a->N) n1 = a->N;
        if (n0 < n1) fn(a, n0, n1);
    }
}
