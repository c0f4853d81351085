"""Plain numpy references for the compiled kernels in `bitnet_grpc.cyext`."""

from __future__ import annotations

import numpy as np

# ======================================================================================================
# float kernels (bitnet_grpc.cyext.floatops) - owner: engine
#
# Straightforward numpy versions of each float kernel. `matmul_rows`, `rope` and `relu2_gate` follow
# the compiled kernels' operation order exactly (bit-identical results); `rmsnorm`, `silu_gate` and
# `attention` agree to float32 rounding (numpy sums pairwise and has its own exp).
# ======================================================================================================

FLOAT_LANES = 16  # lanes of the fixed-order dot product (cyext/floatops_kernels.h)


def fixed_order_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """All dot products a[..., i, :] . b[..., j, :] in the kernels' order; returns float32 [..., I, J].

    Lane l sums products of elements l, l+16, ... in increasing order (tail elements land in lanes
    0, 1, ... which equals zero-padding), then lanes fold as a tree: lane[j] += lane[j + w], w = 8..1.
    """
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    d = a.shape[-1]
    pad = (-d) % FLOAT_LANES
    if pad:
        a = np.concatenate([a, np.zeros((*a.shape[:-1], pad), np.float32)], axis=-1)
        b = np.concatenate([b, np.zeros((*b.shape[:-1], pad), np.float32)], axis=-1)
    lanes = np.zeros((*a.shape[:-1], b.shape[-2], FLOAT_LANES), np.float32)
    for start in range(0, a.shape[-1], FLOAT_LANES):
        chunk_a = a[..., :, None, start : start + FLOAT_LANES]
        chunk_b = b[..., None, :, start : start + FLOAT_LANES]
        lanes += chunk_a * chunk_b
    width = FLOAT_LANES // 2
    while width:
        lanes[..., :width] += lanes[..., width : 2 * width]
        width //= 2
    return lanes[..., 0].copy()


def matmul_rows(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Output head: logits [rows, vocab] = x [rows, d] . w [vocab, d]^T (w float32 or float16)."""
    return fixed_order_dot(x, np.asarray(w).astype(np.float32))


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    x = np.asarray(x, np.float32)
    mean_sq = np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True)
    inv = (1.0 / np.sqrt(mean_sq + eps)).astype(np.float32)
    return (x * inv) * np.asarray(weight, np.float32)


def rope_tables(ctx: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [ctx, head_dim/2] for frequencies theta^(-2i/head_dim), angles computed in float64."""
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.arange(ctx, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rope(x: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray, n_heads: int) -> np.ndarray:
    """NeoX rotate-half rotary embedding of x [rows, n_heads * head_dim]; returns a new array."""
    rows = x.shape[0]
    heads = np.asarray(x, np.float32).reshape(rows, n_heads, -1)
    half = heads.shape[-1] // 2
    c = cos[positions][:, None, :]
    s = sin[positions][:, None, :]
    a, b = heads[..., :half], heads[..., half:]
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1).reshape(rows, -1)


def relu2_gate(gate_up: np.ndarray) -> np.ndarray:
    g, u = np.split(np.asarray(gate_up, np.float32), 2, axis=-1)
    r = np.maximum(g, np.float32(0))
    return (r * r) * u


def silu_gate(gate_up: np.ndarray) -> np.ndarray:
    g, u = np.split(np.asarray(gate_up, np.float32), 2, axis=-1)
    return (g / (np.float32(1) + np.exp(-g))) * u


def attention(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    slots: np.ndarray,
    positions: np.ndarray,
) -> np.ndarray:
    """Causal GQA attention: row r, head j over cache[slots[r], :positions[r]+1, j // group]."""
    rows = q.shape[0]
    n_kv, head_dim = k_cache.shape[2], k_cache.shape[3]
    n_heads = q.shape[1] // head_dim
    group = n_heads // n_kv
    scale = np.float32(1.0 / np.sqrt(head_dim))
    out = np.zeros((rows, n_heads, head_dim), np.float32)
    for r in range(rows):
        n_pos = int(positions[r]) + 1
        keys = k_cache[slots[r], :n_pos]  # [n_pos, n_kv, head_dim]
        values = v_cache[slots[r], :n_pos]
        for j in range(n_heads):
            qh = q[r, j * head_dim : (j + 1) * head_dim]
            scores = fixed_order_dot(qh[None, :], keys[:, j // group])[0] * scale
            p = np.exp(scores - scores.max())
            out[r, j] = (p[:, None] * values[:, j // group]).sum(axis=0, dtype=np.float64) / p.sum(
                dtype=np.float64
            )
    return out.reshape(rows, -1)
