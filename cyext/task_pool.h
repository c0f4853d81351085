/* The worker pool shared by the kernel extensions (implemented in ternary_pool.c).
 *
 * One pool per process: the ternary extension owns it and hands tq_parallel to other extensions
 * (floatops) as a PyCapsule named TQ_POOL_CAPSULE, so the two never run two sets of spinning
 * workers against each other on the same cores. See ternary_pool.c for why this is not OpenMP.
 */
#ifndef BITNET_GRPC_TASK_POOL_H
#define BITNET_GRPC_TASK_POOL_H

#include <stdint.h>

#define TQ_MAX_THREADS 256
#define TQ_POOL_CAPSULE "bitnet_grpc.cyext.ternary.tq_parallel"

/* Task i of a job, run by thread `thread` of the call: 0 is the calling thread, 1 .. n_threads - 1 the
 * pool workers taking part. At most one task runs on a given thread index at a time, so a job can
 * keep per-thread scratch indexed by it. */
typedef void (*tq_task_fn)(void *ctx, int64_t i, int thread);

/* Run task(ctx, i, thread) for i in [0, n_tasks) on the calling thread and up to n_threads - 1 pool
 * workers; returns when every task has finished. Never waits for a worker that has not started. */
typedef void (*tq_parallel_fn)(int64_t n_tasks, tq_task_fn task, void *ctx, int n_threads);

#endif
