/* The kernels' thread pool (ternary and, through a capsule, floatops; task_pool.h): a call never
 * waits for a thread that has not started.
 *
 * Why not OpenMP: an OpenMP parallel region ends in a barrier that waits for every thread of the team.
 * When other processes keep the cores busy (a shared machine, or the server's own gRPC and Python
 * threads), a worker often is not on a CPU when a region starts, and the caller then waits whole
 * scheduler slices for it. Measured on the 2-CPU development machine under load: a 2-thread matmul
 * of 22 us took 12-16 ms at the 90th percentile (mean 0.7-3.8 ms, against 67 us on one thread).
 * Here the caller claims tasks like any worker and returns as soon as all tasks are done; a worker
 * that wakes late finds nothing left. Under load a call degrades to about one-thread speed instead.
 *
 * Protocol: one job slot. `claim` packs (generation << 32 | next task index); a caller fills the job
 * fields (release stores), resets `done` and publishes a new generation with a release store.
 * Workers and the caller take task i by compare-and-swap of `claim` from (gen, i) to (gen, i + 1),
 * after checking i < n_tasks. The caller returns once `done` (tasks finished) reaches the task
 * count, so no task of its job is still running after it returns; before it frees the slot it
 * stores claim = (gen, CLAIM_EXHAUSTED). A second caller arriving while the slot is taken (several
 * Python threads) runs its job on its own thread. Idle workers poll for a short while (mostly
 * yielding the CPU), then sleep on a condition variable.
 *
 * Invariant: a successful CAS at (gen, i) means task i of job `gen` is still unclaimed, so job `gen`
 * has not finished, and every job field that thread read before the CAS is job gen's own. Why:
 * reading (gen, i) with acquire synchronises with the store that published `gen`, so the fields read
 * afterwards are gen's or a later job's. A later job's fields are written (release) only after the
 * caller of gen stored (gen, CLAIM_EXHAUSTED) and freed the slot; a thread that read any of them
 * (acquire) therefore sees `claim` at (gen, CLAIM_EXHAUSTED) or later, and its CAS from (gen, i) fails.
 * Without the exhausted marker, `claim` would stay at (gen, n_tasks) after the job, and a worker
 * stalled between reading it and reading n_tasks could pair it with the next job's larger n_tasks
 * and run a task of a job that is not yet (or no longer) its own, counting it in the next job's
 * `done`. The one gap: a thread stalled across 2^32 jobs (the generation wraps).
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>

#include "ternary_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

#define MAX_WORKERS (TQ_MAX_THREADS - 1)
/* An idle worker first spins briefly, then polls between sched_yield calls (so another thread that
 * wants this CPU, such as the server's Python threads, gets it at once), then sleeps. Together about
 * half a millisecond: longer than the gaps between the kernel calls of a forward pass. */
#define WORKER_SPINS 2000
#define WORKER_YIELDS 300
#define CALLER_SPINS 2000 /* then the waiting caller yields its CPU (a worker may need it to finish) */
/* The task index a finished job leaves in `claim`: never below a job's task count. */
#define CLAIM_EXHAUSTED 0xffffffffu

static struct {
    _Atomic uint64_t claim;
    _Atomic int64_t done;
    _Atomic int busy;
    /* the current job, written by its caller before it publishes the generation */
    _Atomic(tq_task_fn) fn;
    _Atomic(void *) ctx;
    _Atomic int64_t n_tasks;
    _Atomic int helpers; /* workers 0 .. helpers-1 take part */
    uint32_t generation; /* only touched by the caller holding `busy` */
    int n_workers;       /* under lock */
    int sleepers;        /* under lock */
    int atfork_registered;
    int test_delay_us; /* test hook, see read_test_delay; 0 (off) unless the environment asks */
    int test_delay_read;
    uint32_t start_generation[TQ_MAX_THREADS]; /* what worker i has already seen when it starts */
    pthread_mutex_t lock;
    pthread_cond_t wake;
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

/* Take and run tasks of generation `gen` until none is left; `thread` is this thread's index in the job. */
static void run_tasks(uint32_t gen, int thread) {
    for (;;) {
        uint64_t c = atomic_load_explicit(&pool.claim, memory_order_acquire);
        if ((uint32_t)(c >> 32) != gen) return;
        if (pool.test_delay_us && thread && (int64_t)(c & 0xffffffffu) >= atomic_load(&pool.n_tasks))
            usleep(pool.test_delay_us); /* test hook: linger where a job looks finished */
        int64_t i = (int64_t)(c & 0xffffffffu);
        /* acquire: reading a later job's field makes that job's exhausted marker for `gen` visible */
        tq_task_fn fn = atomic_load_explicit(&pool.fn, memory_order_acquire);
        void *ctx = atomic_load_explicit(&pool.ctx, memory_order_acquire);
        if (i >= atomic_load_explicit(&pool.n_tasks, memory_order_acquire)) return;
        if (!atomic_compare_exchange_weak_explicit(&pool.claim, &c, c + 1, memory_order_acq_rel,
                                                   memory_order_acquire))
            continue;
        /* claimed task i of `gen`: that job is unfinished and fn/ctx are its own (the invariant above) */
        fn(ctx, i, thread);
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
    }
}

static uint64_t wait_for_generation_after(uint32_t seen) {
    uint64_t c;
    for (int i = 0; i < WORKER_SPINS + WORKER_YIELDS; i++) {
        c = atomic_load_explicit(&pool.claim, memory_order_acquire);
        if ((uint32_t)(c >> 32) != seen) return c;
        if (i < WORKER_SPINS)
            cpu_relax();
        else
            sched_yield();
    }
    pthread_mutex_lock(&pool.lock);
    pool.sleepers++;
    while ((uint32_t)((c = atomic_load_explicit(&pool.claim, memory_order_acquire)) >> 32) == seen)
        pthread_cond_wait(&pool.wake, &pool.lock);
    pool.sleepers--;
    pthread_mutex_unlock(&pool.lock);
    return c;
}

static void *worker_main(void *arg) {
    int id = (int)(intptr_t)arg;
    uint32_t seen = pool.start_generation[id]; /* written before pthread_create, which orders it */
    for (;;) {
        uint64_t c = wait_for_generation_after(seen);
        seen = (uint32_t)(c >> 32);
        /* acquire, as for the fields in run_tasks: if this is a later job's, no claim of `seen` succeeds */
        if (id < atomic_load_explicit(&pool.helpers, memory_order_acquire)) run_tasks(seen, id + 1);
    }
    return NULL;
}

/* A forked child has none of the parent's workers and may inherit a locked mutex: start afresh. */
static void reset_after_fork(void) {
    pool.n_workers = 0;
    pool.sleepers = 0;
    atomic_store(&pool.busy, 0);
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
}

/* Test hook: BITNET_GRPC_POOL_TEST_DELAY=<microseconds> makes a worker that finds its job without
 * tasks left sleep between reading `claim` and reading the job fields, and a caller sleep (twice as
 * long) between writing the job fields and publishing its generation: the windows in which a stale
 * worker could take a task of the next job (tests/test_kernels_ternary.py).
 * Read once, under the lock, before the first worker starts; costs one predictable branch per claim. */
static void read_test_delay(void) {
    if (pool.test_delay_read) return;
    const char *s = getenv("BITNET_GRPC_POOL_TEST_DELAY");
    int us = s ? atoi(s) : 0;
    pool.test_delay_us = us > 0 && us <= 1000000 ? us : 0;
    pool.test_delay_read = 1;
}

/* Start workers up to `wanted`; returns how many exist (fewer if the system refuses threads). */
static int ensure_workers(int wanted) {
    pthread_mutex_lock(&pool.lock);
    if (!pool.atfork_registered) pool.atfork_registered = pthread_atfork(NULL, NULL, reset_after_fork) == 0;
    read_test_delay();
    while (pool.n_workers < wanted) {
        pthread_t t;
        pool.start_generation[pool.n_workers] = pool.generation;
        if (pthread_create(&t, NULL, worker_main, (void *)(intptr_t)pool.n_workers) != 0) break;
        pthread_detach(t);
        pool.n_workers++;
    }
    int n = pool.n_workers;
    pthread_mutex_unlock(&pool.lock);
    return n;
}

void tq_parallel(int64_t n_tasks, tq_task_fn fn, void *ctx, int n_threads) {
    int helpers = n_threads - 1;
    if (helpers > MAX_WORKERS) helpers = MAX_WORKERS;
    if (helpers > n_tasks - 1) helpers = (int)(n_tasks - 1);
    if (helpers > 0 && n_tasks < CLAIM_EXHAUSTED &&
        atomic_exchange_explicit(&pool.busy, 1, memory_order_acquire) == 0) {
        int started = ensure_workers(helpers);
        if (started < helpers) helpers = started;
        atomic_store_explicit(&pool.fn, fn, memory_order_release);
        atomic_store_explicit(&pool.ctx, ctx, memory_order_release);
        atomic_store_explicit(&pool.n_tasks, n_tasks, memory_order_release);
        atomic_store_explicit(&pool.helpers, helpers, memory_order_release);
        atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
        if (pool.test_delay_us) usleep(2 * pool.test_delay_us);
        uint32_t gen = ++pool.generation;
        atomic_store_explicit(&pool.claim, (uint64_t)gen << 32, memory_order_release);
        pthread_mutex_lock(&pool.lock);
        if (pool.sleepers) pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
        run_tasks(gen, 0);
        for (int polls = 0; atomic_load_explicit(&pool.done, memory_order_acquire) < n_tasks; polls++) {
            if (polls < CALLER_SPINS)
                cpu_relax();
            else
                sched_yield();
        }
        /* every task is claimed, so `claim` is (gen, n_tasks); no claim of this job may succeed now */
        atomic_store_explicit(&pool.claim, ((uint64_t)gen << 32) | CLAIM_EXHAUSTED, memory_order_release);
        atomic_store_explicit(&pool.busy, 0, memory_order_release);
        return;
    }
    for (int64_t i = 0; i < n_tasks; i++) fn(ctx, i, 0);
}
