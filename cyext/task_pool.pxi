# The kernels' worker pool (task_pool.h, owned by the ternary extension) as seen from another Cython
# module: `include "task_pool.pxi"` declares it and binds `_parallel` through the pool's capsule.

from cpython.pycapsule cimport PyCapsule_GetPointer
from libc.stdint cimport int64_t

from bitnet_grpc.cyext import ternary as _ternary


ctypedef void (*task_fn)(void *ctx, int64_t i, int thread) noexcept nogil


cdef extern from "task_pool.h" nogil:
    int TQ_MAX_THREADS
    const char *TQ_POOL_CAPSULE
    ctypedef void (*tq_parallel_fn)(int64_t n_tasks, task_fn task, void *ctx, int n_threads)


# tq_parallel of the ternary extension: the one worker pool of the process
cdef tq_parallel_fn _parallel = <tq_parallel_fn>PyCapsule_GetPointer(_ternary._POOL_CAPSULE, TQ_POOL_CAPSULE)
