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


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32: the upper half of the float's bits."""
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


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
    """Causal GQA attention: row r, head j over cache[slots[r], j // group, :positions[r]+1].

    Caches are [n_slots, n_kv_heads, ctx, head_dim].
    """
    rows = q.shape[0]
    n_kv, head_dim = k_cache.shape[1], k_cache.shape[3]
    n_heads = q.shape[1] // head_dim
    group = n_heads // n_kv
    scale = np.float32(1.0 / np.sqrt(head_dim))
    out = np.zeros((rows, n_heads, head_dim), np.float32)
    for r in range(rows):
        n_pos = int(positions[r]) + 1
        keys = k_cache[slots[r], :, :n_pos]  # [n_kv, n_pos, head_dim]
        values = v_cache[slots[r], :, :n_pos]
        for j in range(n_heads):
            qh = q[r, j * head_dim : (j + 1) * head_dim]
            scores = fixed_order_dot(qh[None, :], keys[j // group])[0] * scale
            p = np.exp(scores - scores.max())
            out[r, j] = (p[:, None] * values[j // group]).sum(axis=0, dtype=np.float64) / p.sum(
                dtype=np.float64
            )
    return out.reshape(rows, -1)


# ======================================================================================================
# ternary kernels (bitnet_grpc.cyext.ternary) - owner: kernels
#
# Same names and arguments as the kernels (functions that fill `out` return a new array instead). Every
# result matches the compiled kernels bit for bit: integer work is exact, and the float steps are the
# same IEEE operations in the same order.
# ======================================================================================================

BLOCK = 256  # weights per packed block (64 bytes)


def padded_k(k: int) -> int:
    """K rounded up to whole 256-weight blocks."""
    return (k + BLOCK - 1) // BLOCK * BLOCK


def ternarize(w: np.ndarray) -> tuple[np.ndarray, float]:
    """Absmean: scale = float32(max(mean|W|, 1e-5)), codes = clip(rint(W / scale), -1, 1).

    mean|W| in float64, each row summed left to right (cumsum is sequential), then the row sums left to
    right: the kernel's fixed order, so the scale matches bit for bit.
    """
    w = np.asarray(w, dtype=np.float32)
    abs64 = np.abs(w).astype(np.float64)
    row_sums = np.cumsum(abs64, axis=1)[:, -1]
    total = float(np.cumsum(row_sums)[-1])
    mean = total / float(w.size)
    scale = np.float32(max(mean, 1e-5))
    codes = np.clip(np.rint(w / scale), -1, 1).astype(np.int8)
    return codes, float(scale)


def pack_ternary(codes: np.ndarray) -> np.ndarray:
    """codes [N, K] in {-1, 0, 1} -> uint8 [N, padded_k(K) // 4]: byte j of each 64-byte block holds
    block elements j + 64*l as c = w + 1 in bits 2l..2l+1; padding has code 1 (weight 0)."""
    n, k = codes.shape
    kp = padded_k(k)
    c = np.ones((n, kp), dtype=np.uint8)
    c[:, :k] = codes.astype(np.int16) + 1
    c = c.reshape(n, kp // BLOCK, 4, 64)  # [row, block, l, j]
    packed = c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)
    return packed.reshape(n, kp // 4).astype(np.uint8)


def unpack_ternary(packed: np.ndarray, k: int) -> np.ndarray:
    """Inverse of pack_ternary."""
    n, nbytes = packed.shape
    p = packed.reshape(n, nbytes // 64, 1, 64)
    shifts = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
    c = (p >> shifts) & 3  # [row, block, l, j] -> element 256*block + 64*l + j
    return (c.reshape(n, nbytes * 4)[:, :k].astype(np.int8) - 1).astype(np.int8)


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Absmax int8 per row: x_scale = 127 / max(max|x|, 1e-5) in float32, xq = clip(rint(x * x_scale),
    -128, 127) (round half to even), zero padded to padded_k(K); x_sum = xq summed over the row."""
    x = np.asarray(x, dtype=np.float32)
    m, k = x.shape
    amax = np.abs(x).max(axis=1) if k else np.zeros(m, dtype=np.float32)
    x_scale = (np.float32(127) / np.maximum(amax, np.float32(1e-5))).astype(np.float32)
    q = np.clip(np.rint(x * x_scale[:, None]), -128, 127).astype(np.int8)
    xq = np.zeros((m, padded_k(k)), dtype=np.int8)
    xq[:, :k] = q
    return xq, x_scale, xq.sum(axis=1, dtype=np.int32)


def ternary_matmul(
    xq: np.ndarray,
    x_scale: np.ndarray,
    x_sum: np.ndarray,
    packed: np.ndarray,
    w_scale: np.ndarray,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """((float32)(xq . w) / x_scale) * w_scale, the dot product with the ternary weights themselves
    (not the code/x_sum identity the kernels use), in exact int64 then cast (it fits int32)."""
    w = unpack_ternary(packed, packed.shape[1] * 4).astype(np.int64)
    acc = xq.astype(np.int64) @ w.T
    assert np.abs(acc).max(initial=0) < 2**31
    acc32 = acc.astype(np.int32).astype(np.float32)
    result = (acc32 / x_scale.astype(np.float32)[:, None]) * w_scale.astype(np.float32)[None, :]
    return result.astype(np.float32)


def bitlinear(x: np.ndarray, packed: np.ndarray, w_scale: np.ndarray) -> np.ndarray:
    """quantize_rows then ternary_matmul."""
    xq, x_scale, x_sum = quantize_rows(x)
    return ternary_matmul(xq, x_scale, x_sum, packed, w_scale)


LUT_ROWS = 32  # weight rows per group of the LUT layout (cyext/ternary_lut.c)
LUT_CHUNK = 28  # most index words per chunk


def lut_words(kp: int) -> int:
    """16-bit index words per row of the LUT layout: 9 weights each."""
    return (kp + 8) // 9


def pack_lut(packed: np.ndarray) -> np.ndarray:
    """2-bit packed [N, Kp // 4] -> the LUT layout, flat uint16: rows in groups of 32 (padding rows are
    zero weights), each row's codes c = w + 1 (zero padded to a multiple of 9) as words of three 5-bit
    indices c0 + 3 c1 + 9 c2 (bits 5t..5t+4 for weights 9q + 3t + s), the words cut into
    ceil(words / 28) even chunks, chunk-major: [chunk][group][word of the chunk][row of the group]."""
    n, nbytes = packed.shape
    kp = nbytes * 4
    words, groups = lut_words(kp), -(-n // LUT_ROWS)
    codes = np.ones((groups * LUT_ROWS, words * 9), np.uint16)
    codes[:n, :kp] = unpack_ternary(packed, kp).astype(np.int16) + 1
    digits = codes.reshape(groups * LUT_ROWS, words, 3, 3)  # [row, word, t, s]
    index = digits[..., 0] + 3 * digits[..., 1] + 9 * digits[..., 2]
    word = index[..., 0] | (index[..., 1] << 5) | (index[..., 2] << 10)  # [row, word]
    word = word.reshape(groups, LUT_ROWS, words).transpose(0, 2, 1)  # [group, word, row]
    chunks = -(-words // LUT_CHUNK)
    bounds = [words * c // chunks for c in range(chunks + 1)]
    parts = [word[:, q0:q1, :].reshape(-1) for q0, q1 in zip(bounds[:-1], bounds[1:], strict=True)]
    return np.concatenate(parts).astype(np.uint16) if parts else np.zeros(0, np.uint16)


# ======================================================================================================
# token drawing (bitnet_grpc.cyext.sampling) - owner: engine
#
# The same float32 and float64 operations as sampling_kernels.c, in the same order: the drawn index and
# the weights are bit-identical to the kernel's.
# ======================================================================================================

SAMPLING_BLOCK = 128
_EXP_MIN = np.float32(-87.0)
_LOG2E = np.float32(1.44269504088896341)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_ROUNDER = np.float32(12582912.0)
_EXP_COEFFS = [np.float32(1.0 / f) for f in (5040, 720, 120, 24, 6, 2, 1, 1)]


def exp_neg(z: np.ndarray) -> np.ndarray:
    """e^z for z <= 0 (float32): round z * log2(e) to n, reduce, degree 7 Taylor polynomial, times 2^n."""
    z = np.asarray(z, np.float32)
    live = z >= _EXP_MIN
    z = np.where(live, z, np.float32(0))
    n = (z * _LOG2E + _ROUNDER) - _ROUNDER
    r = (z - n * _LN2_HI) - n * _LN2_LO
    p = _EXP_COEFFS[0] * np.ones_like(r)
    for c in _EXP_COEFFS[1:]:
        p = p * r + c
    scale = ((n.astype(np.int32) + 127) << 23).astype(np.uint32).view(np.float32)
    return np.where(live, p * scale, np.float32(0))


def _lane_sum(w: np.ndarray) -> float:
    """Sum of a block in 8 float64 lanes (lane i % 8, increasing i), folded 4, 2, 1."""
    lanes = np.zeros(8)
    for i, value in enumerate(w.astype(np.float64)):
        lanes[i % 8] += value
    for s in (4, 2, 1):
        lanes[:s] += lanes[s : 2 * s]
    return float(lanes[0])


def row_weights(x: np.ndarray, temperature: float) -> tuple[float, np.ndarray, np.ndarray]:
    """(maximum, weights, block sums) of one logits row, as sampling.row_weights computes them (for a
    finite maximum and a temperature whose inverse is a finite float32)."""
    x = np.asarray(x, np.float32)
    m = np.max(x, initial=-np.inf, where=~np.isnan(x))  # NaN logits are ignored (weight 0)
    w = exp_neg((x - m) * np.float32(1.0 / temperature))
    sums = np.array([_lane_sum(w[s : s + SAMPLING_BLOCK]) for s in range(0, len(w), SAMPLING_BLOCK)])
    return float(m), w, sums


def draw_row(x: np.ndarray, temperature: float, u: float) -> int:
    """The index sampling.draw_rows draws from one logits row (see sampling_kernels.h)."""
    x = np.asarray(x, np.float32)
    m = np.max(x, initial=-np.inf, where=~np.isnan(x))
    with np.errstate(over="ignore"):
        inv_t = np.float32(np.float64(1.0) / np.float64(temperature))
    if not np.isfinite(m) or not np.isfinite(inv_t):
        hits = np.flatnonzero(x == m)  # no distribution, or only the maximum is left
        return int(hits[0]) if hits.size else 0
    _, w, sums = row_weights(x, temperature)
    total = 0.0
    for s in sums:
        total += s
    target = u * total
    block, before = 0, 0.0
    while block < len(sums) - 1 and before + sums[block] <= target:
        before += sums[block]
        block += 1
    start = block * SAMPLING_BLOCK
    inside = w[start : start + SAMPLING_BLOCK]
    index, inner = 0, 0.0
    while index < len(inside) - 1:
        inner += float(inside[index])
        if not inner <= target - before:
            break
        index += 1
    pick = start + index
    while pick > 0 and w[pick] == 0:
        pick -= 1
    return pick
