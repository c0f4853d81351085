"""Files from our GGUF writer run in llama.cpp (arch `bitnet`) and mean what we think they mean.

The oracle is a float64 numpy forward pass of BITNET.md section 1 written here (SiLU, since llama.cpp's
bitnet graph hard-codes it). An F32 file of ternary weights runs in llama.cpp without activation
quantisation, so it must match closely; TQ2_0 and TQ1_0 quantise activations per 256-block, so they
only stay near it, but hold the same weights and must agree with each other exactly.
"""

from __future__ import annotations

from pathlib import Path

import _formats_helpers as h
import numpy as np
import pytest
from bitnet_grpc.server.gguf_export import write_gguf

llama_cpp = pytest.importorskip("llama_cpp")


def _rms(x: np.ndarray, g: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g


def _rope_neox(x: np.ndarray, theta: float) -> np.ndarray:
    """x [T, heads, head_dim]: dimension i pairs with i + head_dim/2."""
    half = x.shape[-1] // 2
    angle = np.arange(x.shape[0])[:, None] * theta ** (-np.arange(half) * 2.0 / x.shape[-1])[None]
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _reference_logits(w, tokens: list[int]) -> np.ndarray:
    c, f = w.config, w.float_tensors

    def linear(x: np.ndarray, name: str) -> np.ndarray:
        t = w.ternary[name]
        return x @ (t.codes.astype(np.float64) * t.scale).T

    x = f["token_embd.weight"][tokens].astype(np.float64)
    n = len(tokens)
    for layer in range(c.n_layers):
        p = f"blk.{layer}."
        a = _rms(x, f[p + "attn_norm.weight"], c.rms_eps)
        q = _rope_neox(linear(a, p + "attn_q.weight").reshape(n, c.n_heads, c.head_dim), c.rope_theta)
        k = _rope_neox(linear(a, p + "attn_k.weight").reshape(n, c.n_kv_heads, c.head_dim), c.rope_theta)
        v = linear(a, p + "attn_v.weight").reshape(n, c.n_kv_heads, c.head_dim)
        group = c.n_heads // c.n_kv_heads
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(c.head_dim) + np.triu(np.full((n, n), -np.inf), 1)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        att = np.einsum("hts,shd->thd", probs, v).reshape(n, -1)
        x = x + linear(_rms(att, f[p + "attn_sub_norm.weight"], c.rms_eps), p + "attn_output.weight")
        m = _rms(x, f[p + "ffn_norm.weight"], c.rms_eps)
        gate, up = linear(m, p + "ffn_gate.weight"), linear(m, p + "ffn_up.weight")
        m = _rms(gate / (1 + np.exp(-gate)) * up, f[p + "ffn_sub_norm.weight"], c.rms_eps)
        x = x + linear(m, p + "ffn_down.weight")
    return _rms(x, f["output_norm.weight"], c.rms_eps) @ f["token_embd.weight"].T.astype(np.float64)


def _llama_logits(path: Path, tokens: list[int]) -> np.ndarray:
    model = llama_cpp.Llama(
        str(path),
        n_ctx=64,
        logits_all=True,
        verbose=False,
        n_threads=2,
        type_k=0,
        type_v=0,  # f32 KV cache
    )
    model.eval(tokens)
    return np.array(model.scores[: len(tokens)])


def test_llama_cpp_runs_our_files_as_we_mean_them(tmp_path: Path) -> None:
    weights = h.random_weights(seed=3, arch="bitnet", activation="silu")
    for t in weights.ternary.values():
        t.scale = 0.1  # weight std ~0.1 so every layer matters (BITNET.md section 5)
    tokens = [h.BOS, 70, 71, 72, 256, 257, 80, 90]
    reference = _reference_logits(weights, tokens)
    logits = {}
    for weight_type in ("f32", "tq2_0", "tq1_0"):
        path = tmp_path / f"{weight_type}.gguf"
        write_gguf(weights, path, weight_type, embed_type="f32")
        logits[weight_type] = _llama_logits(path, tokens)
    np.testing.assert_allclose(logits["f32"], reference, atol=1e-3)
    np.testing.assert_array_equal(logits["tq2_0"], logits["tq1_0"])
    assert np.abs(logits["tq2_0"] - reference).max() < 3.0  # per-block activation quantisation only
