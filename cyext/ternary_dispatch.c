/* Kernel path table and the driver that splits a matmul's output rows into tasks for the pool. */
#include <stdint.h>

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

tq_quantize_row_fn tq_quantize_row_fn_for(int path) {
    switch (path) {
#ifdef TQ_HAVE_X86
    case TQ_PATH_AVX2: return tq_quantize_row_avx2;
    case TQ_PATH_AVX512BW:
    case TQ_PATH_AVX512VNNI: return tq_quantize_row_avx512;
#endif
    default: return tq_quantize_row_portable;
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
/* Tasks per thread: a few, so a thread that starts late leaves its share to the others. */
#define TQ_TASKS_PER_THREAD 4

typedef struct {
    const tq_gemm_args *a;
    tq_gemm_fn fn;
    int64_t tiles, tasks;
} gemm_job;

/* Task i: one contiguous range of whole 4-row output tiles. */
static void gemm_task(void *ctx, int64_t i, int thread) {
    const gemm_job *j = (const gemm_job *)ctx;
    int64_t n0 = 4 * (j->tiles * i / j->tasks), n1 = 4 * (j->tiles * (i + 1) / j->tasks);
    if (n1 > j->a->N) n1 = j->a->N;
    if (n0 < n1) j->fn(j->a, n0, n1);
}

/* The result does not depend on the split: every output element is computed by the same code
 * whichever thread runs it. */
void tq_gemm(const tq_gemm_args *a, int path, int n_threads) {
    if (a->M == 0 || a->N == 0) return;
    gemm_job job = {a, path_fn(path), (a->N + 3) / 4, 1};
    int64_t useful = a->M * a->N * a->n_blocks * TQ_BLOCK / TQ_GEMM_MIN_WORK_PER_THREAD;
    int64_t nt = n_threads < useful ? n_threads : useful;
    if (nt > 1) job.tasks = TQ_TASKS_PER_THREAD * nt < job.tiles ? TQ_TASKS_PER_THREAD * nt : job.tiles;
    tq_parallel(job.tasks, gemm_task, &job, nt > 1 ? (int)nt : 1);
}
