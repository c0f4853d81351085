"""The BitNet b1.58 forward pass over packed ternary weights (BITNET.md section 1).

One call runs a batch of rows - prefill chunks and decode tokens of several sequences mixed - through
all layers, writing each row's keys and values into its sequence's KV slot before attending, and returns
logits only for the rows that will be sampled. The heavy lifting is in nogil kernels:
`bitnet_grpc.cyext.ternary` for the BitLinear projections (int8 activations x 2-bit weights, exact int32
sums) and `bitnet_grpc.cyext.floatops` for norms, rotary embedding, attention and the output head.

Batch invariance: every kernel computes a row from that row alone, in a fixed order, so a sequence's
logits are bit-identical whatever else shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from bitnet_grpc.cyext import floatops, ternary
from bitnet_grpc.server.kv_cache import KVCache
from bitnet_grpc.server.weights import ModelConfig, ModelWeights, TernaryTensor


def rope_tables(ctx_size: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [ctx_size, head_dim/2] of pos * theta^(-2i/head_dim), computed in float64."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.outer(np.arange(ctx_size, dtype=np.float64), inv_freq)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


@dataclass
class PackedLinear:
    """One or more ternary projections of the same input, packed as one matrix.

    Fusing (q|k|v, gate|up) quantises the input once and reads the weights in one pass; `scale` holds
    each output row's tensor scale so the fused rows keep their own. On CPUs with AVX-512BW the weights
    are kept in the kernels' LUT layout (ternary.pack_lut: fewer bytes, table-lookup kernel, same
    results bit for bit), elsewhere in the 2-bit layout.
    """

    packed: np.ndarray  # uint8 [out, padded_k(in) / 4], or the flat uint16 LUT layout
    scale: np.ndarray  # float32 [out]
    in_features: int
    out_features: int

    @classmethod
    def fuse(cls, tensors: list[TernaryTensor]) -> PackedLinear:
        in_features = tensors[0].shape[1]
        if any(t.shape[1] != in_features for t in tensors):
            raise ValueError(
                f"cannot fuse projections of different input widths {[t.shape for t in tensors]}"
            )
        codes = tensors[0].codes if len(tensors) == 1 else np.concatenate([t.codes for t in tensors])
        scale = np.concatenate([np.full(t.shape[0], t.scale, np.float32) for t in tensors])
        packed = ternary.pack_ternary(np.ascontiguousarray(codes, np.int8))
        if ternary.lut_preferred():
            packed = ternary.pack_lut(packed)
        return cls(packed, scale, in_features, len(scale))


@dataclass
class VocabMatrix:
    """A [vocab, d_model] float matrix (embedding, output head), stored as compactly as is exact.

    The output head reads the whole matrix every step, so its bytes set the pace. Files store it as
    F16 (GGUF) or BF16 (Hugging Face); the loader hands over float32, and when every value survives
    the round trip the matrix goes back to 16 bits. Widening to float32 is exact, so the logits are
    the same as with the float32 matrix, bit for bit.
    """

    data: np.ndarray  # float32, or uint16 bit patterns of float16 / bfloat16
    dtype: str  # "f32", "f16" or "bf16"

    @classmethod
    def compact(cls, matrix: np.ndarray, cfg: ModelConfig, name: str) -> VocabMatrix:
        matrix = np.ascontiguousarray(matrix, np.float32)
        if matrix.shape != (cfg.vocab_size, cfg.d_model):
            raise ValueError(f"{name} has shape {matrix.shape}, expected {(cfg.vocab_size, cfg.d_model)}")
        with np.errstate(over="ignore"):  # values beyond float16's range just fail the check below
            half = matrix.astype(np.float16)
        if np.array_equal(half.astype(np.float32), matrix):
            return cls(half.view(np.uint16), "f16")
        bits = matrix.view(np.uint32)
        if not np.any(bits & 0xFFFF):
            return cls((bits >> 16).astype(np.uint16), "bf16")
        return cls(matrix, "f32")

    def lookup(self, tokens: np.ndarray, out: np.ndarray) -> None:
        """out[r] = row tokens[r] (ids already checked)."""
        if self.dtype == "f32":
            np.take(self.data, tokens, axis=0, out=out, mode="clip")
        else:
            floatops.embed_rows_half(self.data, tokens, out, self.dtype == "bf16")

    def matmul(self, x: np.ndarray, out: np.ndarray) -> None:
        """out = x . matrix^T with the kernels' fixed-order dot products."""
        if self.dtype == "f16":
            floatops.matmul_rows_f16(x, self.data, out)
        elif self.dtype == "bf16":
            floatops.matmul_rows_bf16(x, self.data, out)
        else:
            floatops.matmul_rows(x, self.data, out)


@dataclass
class Layer:
    attn_norm: np.ndarray
    qkv: PackedLinear  # q | k | v
    attn_sub_norm: np.ndarray
    attn_output: PackedLinear
    ffn_norm: np.ndarray
    gate_up: PackedLinear  # gate | up
    ffn_sub_norm: np.ndarray
    ffn_down: PackedLinear


class Scratch:
    """Activation buffers for up to `rows` rows, allocated once and reused by every forward call."""

    def __init__(self, cfg: ModelConfig, rows: int, ctx_size: int, threads: int) -> None:
        f32 = np.float32
        self.rows = rows
        self.x = np.empty((rows, cfg.d_model), f32)  # the residual stream
        self.h = np.empty((rows, cfg.d_model), f32)  # normed input of a projection
        self.qkv = np.empty((rows, cfg.q_dim + 2 * cfg.kv_dim), f32)
        self.attn = np.empty((rows, cfg.q_dim), f32)
        self.proj = np.empty((rows, cfg.d_model), f32)  # o and down projection outputs
        self.gate_up = np.empty((rows, 2 * cfg.d_ff), f32)
        self.mlp = np.empty((rows, cfg.d_ff), f32)
        self.scores = np.empty((max(1, threads), ctx_size), f32)  # attention scores, one row per thread
        # quantised input of a projection (int8 rows, their scales and sums), shared by all projections
        widest = ternary.padded_k(max(cfg.d_model, cfg.q_dim, cfg.d_ff))
        self.xq = np.empty((rows, widest), np.int8)
        self.x_scale = np.empty(rows, f32)
        self.x_sum = np.empty(rows, np.int32)


class Model:
    """Packed weights, KV cache and scratch of one BitNet model; `forward` is the whole computation."""

    def __init__(
        self, weights: ModelWeights, *, n_slots: int, ctx_size: int, threads: int | None = None
    ) -> None:
        cfg = weights.config
        if cfg.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embedding, got {cfg.head_dim}")
        if threads is not None:
            ternary.set_num_threads(threads)
            floatops.set_num_threads(threads)
        self.config = cfg
        self.ctx_size = ctx_size
        self.n_slots = n_slots
        self.eps = float(cfg.rms_eps)
        self.gate = floatops.relu2_gate if cfg.activation == "relu2" else floatops.silu_gate

        floats = weights.float_tensors
        self.embedding = VocabMatrix.compact(floats["token_embd.weight"], cfg, "token_embd.weight")
        # Tied models (2B4T) reuse the embedding as the output head; others carry output.weight.
        if "output.weight" in floats:
            self.output = VocabMatrix.compact(floats["output.weight"], cfg, "output.weight")
        else:
            self.output = self.embedding
        self.output_norm = np.ascontiguousarray(floats["output_norm.weight"], np.float32)

        def norm(name: str, dim: int) -> np.ndarray:
            w = np.ascontiguousarray(floats[name], np.float32)
            if w.shape != (dim,):
                raise ValueError(f"{name} has shape {w.shape}, expected ({dim},)")
            return w

        self.layers = []
        projection_shapes = cfg.projection_shapes()
        for i in range(cfg.n_layers):
            t = {p: weights.ternary[f"blk.{i}.{p}.weight"] for p in projection_shapes}
            for p, expected in projection_shapes.items():
                if t[p].shape != expected:
                    raise ValueError(f"blk.{i}.{p}.weight has shape {t[p].shape}, expected {expected}")
            self.layers.append(
                Layer(
                    attn_norm=norm(f"blk.{i}.attn_norm.weight", cfg.d_model),
                    qkv=PackedLinear.fuse([t["attn_q"], t["attn_k"], t["attn_v"]]),
                    attn_sub_norm=norm(f"blk.{i}.attn_sub_norm.weight", cfg.q_dim),
                    attn_output=PackedLinear.fuse([t["attn_output"]]),
                    ffn_norm=norm(f"blk.{i}.ffn_norm.weight", cfg.d_model),
                    gate_up=PackedLinear.fuse([t["ffn_gate"], t["ffn_up"]]),
                    ffn_sub_norm=norm(f"blk.{i}.ffn_sub_norm.weight", cfg.d_ff),
                    ffn_down=PackedLinear.fuse([t["ffn_down"]]),
                )
            )
        self.cos, self.sin = rope_tables(ctx_size, cfg.head_dim, cfg.rope_theta)
        self.kv = KVCache(cfg.n_layers, n_slots, ctx_size, cfg.n_kv_heads, cfg.head_dim)
        self._threads = max(floatops.get_num_threads(), 1)
        self._scratch = Scratch(cfg, 64, ctx_size, self._threads)

    # ---- helpers ------------------------------------------------------------------------------------

    def _scratch_for(self, rows: int) -> Scratch:
        if rows > self._scratch.rows:  # grow (rarely: the scheduler's batch size is fixed)
            self._scratch = Scratch(
                self.config, max(rows, 2 * self._scratch.rows), self.ctx_size, self._threads
            )
        return self._scratch

    @staticmethod
    def _bitlinear(s: Scratch, x: np.ndarray, lin: PackedLinear, out: np.ndarray) -> None:
        """out = BitLinear(x): per-row int8 absmax quantisation, exact int32 dot, scaled back.
        One kernel call quantising into the scratch buffers: no allocation on the hot path."""
        ternary.bitlinear_into(x, lin.packed, lin.scale, s.xq, s.x_scale, s.x_sum, out)

    def _check_rows(self, slots, tokens, positions, logit_rows):
        def differ() -> ValueError:
            shapes = f"slots {np.shape(slots)}, tokens {np.shape(tokens)}, positions {np.shape(positions)}"
            return ValueError(f"{shapes} differ")

        try:
            rows_in = np.array([slots, tokens, positions], dtype=np.int32)  # one copy, one min, one max
        except ValueError:
            raise differ() from None
        logit_rows = np.ascontiguousarray(logit_rows, np.int32)
        if rows_in.ndim != 2 or logit_rows.ndim != 1:
            raise differ()
        slots, tokens, positions = rows_in
        rows = tokens.shape[0]
        if rows:
            low, high = rows_in.min(axis=1), rows_in.max(axis=1)
            if low[2] < 0 or high[2] >= self.ctx_size:
                bad = low[2] if low[2] < 0 else high[2]
                raise ValueError(f"positions must be in 0..{self.ctx_size - 1} (ctx_size), got {bad}")
            if low[0] < 0 or high[0] >= self.n_slots:
                raise ValueError(f"slots must be in 0..{self.n_slots - 1}")
            if low[1] < 0 or high[1] >= self.config.vocab_size:
                raise ValueError(f"token ids must be in 0..{self.config.vocab_size - 1}")
        if logit_rows.size and (logit_rows.min() < 0 or logit_rows.max() >= rows):
            raise ValueError(f"logit_rows must index the {rows} rows")
        return slots, tokens, positions, logit_rows

    # ---- the forward pass ---------------------------------------------------------------------------

    def forward(
        self,
        slots: np.ndarray | list[int],
        tokens: np.ndarray | list[int],
        positions: np.ndarray | list[int],
        logit_rows: np.ndarray | list[int],
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Run rows (slot, token, position) through the model; return float32 [len(logit_rows), vocab].

        Each row's K/V land at (slot, position) of the cache before attention, and a row attends to
        positions 0..position of its slot, so the earlier positions must have been run before (or in
        this same call). `out`, when given, receives the logits (no allocation on the hot path).
        """
        slots, tokens, positions, logit_rows = self._check_rows(slots, tokens, positions, logit_rows)
        cfg = self.config
        rows = tokens.shape[0]
        s = self._scratch_for(max(rows, logit_rows.shape[0]))
        x, h = s.x[:rows], s.h[:rows]
        qkv, attn, proj = s.qkv[:rows], s.attn[:rows], s.proj[:rows]
        gate_up, mlp = s.gate_up[:rows], s.mlp[:rows]
        q = qkv[:, : cfg.q_dim]
        k = qkv[:, cfg.q_dim : cfg.q_dim + cfg.kv_dim]
        v = qkv[:, cfg.q_dim + cfg.kv_dim :]

        self.embedding.lookup(tokens, x)

        for i, layer in enumerate(self.layers):
            # attention block
            floatops.rmsnorm(x, layer.attn_norm, self.eps, h)
            self._bitlinear(s, h, layer.qkv, qkv)
            floatops.rope(q, positions, self.cos, self.sin, cfg.n_heads)
            floatops.rope(k, positions, self.cos, self.sin, cfg.n_kv_heads)
            floatops.kv_store(k, v, self.kv.keys[i], self.kv.values[i], slots, positions)
            floatops.attention(q, self.kv.keys[i], self.kv.values[i], slots, positions, attn, s.scores)
            floatops.rmsnorm(attn, layer.attn_sub_norm, self.eps, attn)
            self._bitlinear(s, attn, layer.attn_output, proj)
            np.add(x, proj, out=x)
            # feed-forward block
            floatops.rmsnorm(x, layer.ffn_norm, self.eps, h)
            self._bitlinear(s, h, layer.gate_up, gate_up)
            self.gate(gate_up, mlp)
            floatops.rmsnorm(mlp, layer.ffn_sub_norm, self.eps, mlp)
            self._bitlinear(s, mlp, layer.ffn_down, proj)
            np.add(x, proj, out=x)

        n_logits = logit_rows.shape[0]
        if out is None:
            out = np.empty((n_logits, cfg.vocab_size), np.float32)
        elif out.shape != (n_logits, cfg.vocab_size) or out.dtype != np.float32:
            raise ValueError(f"out must be float32 {(n_logits, cfg.vocab_size)}, got {out.dtype} {out.shape}")
        final = s.h[:n_logits]
        np.take(x, logit_rows, axis=0, out=final, mode="clip")
        floatops.rmsnorm(final, self.output_norm, self.eps, final)
        self.output.matmul(final, out)
        return out
