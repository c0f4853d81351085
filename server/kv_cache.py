"""The KV cache: keys and values of every past position, per layer and per sequence slot.

Preallocated once (float32, ``[n_slots, n_kv_heads, ctx, head_dim]`` per layer: head-major, so the
attention kernel reads each head's positions as one contiguous stream) so that no step allocates; a
sequence owns one slot for its lifetime. Entries are never cleared: a row only attends to
positions up to its own, and every one of those was written by the same sequence before (or in the same
forward pass), so stale data of a previous owner is never read.
"""

from __future__ import annotations

import numpy as np


class KVCache:
    """Keys and values for ``n_slots`` sequences of up to ``ctx_size`` positions each."""

    def __init__(self, n_layers: int, n_slots: int, ctx_size: int, n_kv_heads: int, head_dim: int) -> None:
        if n_slots < 1 or ctx_size < 1:
            raise ValueError(f"need n_slots >= 1 and ctx_size >= 1, got {n_slots}, {ctx_size}")
        self.n_slots = n_slots
        self.ctx_size = ctx_size
        shape = (n_slots, n_kv_heads, ctx_size, head_dim)
        self.keys = [np.zeros(shape, np.float32) for _ in range(n_layers)]
        self.values = [np.zeros(shape, np.float32) for _ in range(n_layers)]
        self._free = list(range(n_slots - 1, -1, -1))  # pop() hands out slot 0 first

    @staticmethod
    def bytes_needed(n_layers: int, n_slots: int, ctx_size: int, n_kv_heads: int, head_dim: int) -> int:
        return 2 * 4 * n_layers * n_slots * ctx_size * n_kv_heads * head_dim

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.keys) + sum(a.nbytes for a in self.values)

    def free_slots(self) -> int:
        return len(self._free)

    def alloc(self) -> int:
        """Take a free slot; raises RuntimeError when all are in use."""
        if not self._free:
            raise RuntimeError(f"all {self.n_slots} KV cache slots are in use")
        return self._free.pop()

    def free(self, slot: int) -> None:
        if not 0 <= slot < self.n_slots:
            raise ValueError(f"slot {slot} outside 0..{self.n_slots - 1}")
        if slot in self._free:
            raise ValueError(f"slot {slot} is already free")
        self._free.append(slot)
