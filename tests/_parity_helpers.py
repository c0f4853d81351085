"""Shared pieces of the golden-parity tests: goldens, running our engine, the comparison, a numpy forward.

Goldens (tests/fixtures/parity/*.npz, made by tools/make_fixtures.py) hold the oracle's top-16 logits and
ids per position plus the std of the full logit row; see tools/fixture_oracles.py. The numpy forward here
is a second, deliberately plain implementation of BitNet b1.58 (float64 except where BitNet quantises),
used to show the comparison's thresholds separate right from subtly wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).parent / "fixtures" / "parity"
NEAR_TIE = 0.25  # in units of the reference row's std


def load_golden(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"{name}.npz") as data:
        golden = {key: data[key] for key in data.files}
    golden["meta"] = json.loads(str(golden["meta"]))
    return golden


# ----------------------------------------------------------------------------------------------------------
# comparison


@dataclass
class Comparison:
    """How our logits relate to a golden's, over all compared positions."""

    positions: int = 0
    agree: int = 0
    misses: list[str] = field(default_factory=list)  # disagreements that are NOT near-ties
    near_tie_misses: int = 0
    rel_diffs: list[np.ndarray] = field(default_factory=list)  # |ours - ref| / std at the ref's top-k ids

    @property
    def agree_fraction(self) -> float:
        return self.agree / self.positions

    @property
    def median_rel_diff(self) -> float:
        return float(np.median(np.concatenate(self.rel_diffs)))

    def add(self, ours: np.ndarray, top_ids: np.ndarray, top_logits: np.ndarray, std: np.ndarray, where: str):
        """Compare rows `ours` [T, vocab] with a golden's top-k ids/logits [T, k] and std [T]."""
        for t in range(ours.shape[0]):
            self.positions += 1
            ref_best = int(top_ids[t, 0])
            mine = int(np.argmax(ours[t]))
            self.rel_diffs.append(np.abs(ours[t, top_ids[t]] - top_logits[t]) / std[t])
            if mine == ref_best:
                self.agree += 1
                continue
            hits = np.flatnonzero(top_ids[t] == mine)
            gap = (top_logits[t, 0] - top_logits[t, hits[0]]) / std[t] if hits.size else np.inf
            if gap <= NEAR_TIE:
                self.near_tie_misses += 1
            else:
                self.misses.append(f"{where} position {t}: ours {mine}, ref {ref_best}, gap {gap:.3f} std")

    def failures(self, min_agree: float, max_median_rel: float | None = None) -> list[str]:
        """Why the comparison fails the thresholds (empty: it passes)."""
        why = list(self.misses)
        if self.agree_fraction < min_agree:
            why.append(f"argmax agreement {self.agree_fraction:.3f} < {min_agree}")
        if max_median_rel is not None and self.median_rel_diff >= max_median_rel:
            why.append(f"median |logit diff| {self.median_rel_diff:.2e} std >= {max_median_rel:.0e}")
        return why

    def summary(self) -> str:
        return (
            f"{self.agree}/{self.positions} argmax agree ({self.near_tie_misses} near-tie misses, "
            f"{len(self.misses)} other), median |diff| {self.median_rel_diff:.2e} std"
        )


def compare_teacher_forced(logits_per_seq: list[np.ndarray], golden: dict[str, np.ndarray]) -> Comparison:
    cmp = Comparison()
    for i, ours in enumerate(logits_per_seq):
        cmp.add(ours, golden["top_ids"][i], golden["top_logits"][i], golden["std"][i], f"sequence {i}")
    return cmp


def compare_greedy(logits_per_prompt: list[np.ndarray], golden: dict[str, np.ndarray]) -> Comparison:
    cmp = Comparison()
    for i, ours in enumerate(logits_per_prompt):
        ids, top, std = golden["greedy_top_ids"][i], golden["greedy_top_logits"][i], golden["greedy_std"][i]
        cmp.add(ours, ids, top, std, f"greedy prompt {i}")
    return cmp


# ----------------------------------------------------------------------------------------------------------
# our engine


def engine_teacher_forced(model, sequences: np.ndarray) -> list[np.ndarray]:
    """Each sequence as one prefill call into slot 0, logits for every position."""
    out = []
    for seq in sequences:
        n = len(seq)
        positions = np.arange(n, dtype=np.int32)
        logits = model.forward(np.zeros(n, np.int32), np.asarray(seq, np.int32), positions, positions)
        out.append(np.array(logits, dtype=np.float32, copy=True))
    return out


def engine_decode_loop(model, prompts: np.ndarray, continuations: np.ndarray) -> list[np.ndarray]:
    """Prefill each prompt, then feed the reference's continuation one token per forward call (the decode
    path, reading the KV cache): row i holds the logits that predict continuation token i."""
    out = []
    for slot, (prompt, cont) in enumerate(zip(prompts, continuations, strict=True)):
        slot %= model.n_slots
        p = len(prompt)
        prefill = model.forward(
            np.full(p, slot, np.int32), np.asarray(prompt, np.int32), np.arange(p, dtype=np.int32), [p - 1]
        )
        rows = [np.array(prefill[0], dtype=np.float32, copy=True)]
        for i, token in enumerate(cont[:-1]):
            logits = model.forward([slot], [token], [p + i], [0])
            rows.append(np.array(logits[0], dtype=np.float32, copy=True))
        out.append(np.stack(rows))
    return out


# ----------------------------------------------------------------------------------------------------------
# a plain numpy BitNet forward


def _rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Rotate-half (NeoX) rotary embedding over whole heads; x [T, heads, head_dim]."""
    half = x.shape[-1] // 2
    inv_freq = theta ** (-np.arange(0, 2 * half, 2, dtype=np.float64) / (2 * half))
    angle = positions[:, None].astype(np.float64) * inv_freq[None, :]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _bitlinear(x: np.ndarray, tensor, quantise_activations: bool) -> np.ndarray:
    w = tensor.codes.astype(np.float64)
    if not quantise_activations:
        return x @ (w.T * tensor.scale)
    x32 = x.astype(np.float32)
    scale = np.float32(127.0) / np.maximum(np.abs(x32).max(axis=-1, keepdims=True), np.float32(1e-5))
    xq = np.clip(np.rint(x32 * scale), -128, 127).astype(np.float64)
    return (xq @ w.T) / scale.astype(np.float64) * tensor.scale


def numpy_forward(weights, tokens: np.ndarray, quantise_activations: bool = True) -> np.ndarray:
    """Logits [T, vocab] of one sequence from position 0, straight from a ModelWeights."""
    cfg = weights.config
    embedding = weights.float_tensors["token_embd.weight"].astype(np.float64)
    x = embedding[np.asarray(tokens)]
    for layer in range(cfg.n_layers):
        x = _layer_forward(x, weights, layer, quantise_activations)
    x = _rmsnorm(x, weights.float_tensors["output_norm.weight"].astype(np.float64), cfg.rms_eps)
    return (x @ embedding.T).astype(np.float32)


def _layer_forward(x: np.ndarray, weights, layer: int, quantise_activations: bool) -> np.ndarray:
    """One decoder layer (BITNET.md section 1, steps 1-9) over a whole causal sequence x [T, d_model]."""
    cfg = weights.config
    n = x.shape[0]
    tensors = {
        name.split(".")[2]: tensor
        for name, tensor in weights.ternary.items()
        if name.startswith(f"blk.{layer}.")
    }
    norms = {
        name.split(".")[2]: array.astype(np.float64)
        for name, array in weights.float_tensors.items()
        if name.startswith(f"blk.{layer}.")
    }

    def linear(name: str, inp: np.ndarray) -> np.ndarray:
        return _bitlinear(inp, tensors[name], quantise_activations)

    positions = np.arange(n)
    h = _rmsnorm(x, norms["attn_norm"], cfg.rms_eps)
    q = _rope(linear("attn_q", h).reshape(n, cfg.n_heads, cfg.head_dim), positions, cfg.rope_theta)
    k = _rope(linear("attn_k", h).reshape(n, cfg.n_kv_heads, cfg.head_dim), positions, cfg.rope_theta)
    v = linear("attn_v", h).reshape(n, cfg.n_kv_heads, cfg.head_dim)
    group = cfg.n_heads // cfg.n_kv_heads
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # query head j uses KV head j // group
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(cfg.head_dim) + np.triu(np.full((n, n), -np.inf), k=1)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    attn = np.einsum("hqk,khd->qhd", scores / scores.sum(axis=-1, keepdims=True), v).reshape(n, cfg.q_dim)
    x = x + linear("attn_output", _rmsnorm(attn, norms["attn_sub_norm"], cfg.rms_eps))
    h = _rmsnorm(x, norms["ffn_norm"], cfg.rms_eps)
    gate, up = linear("ffn_gate", h), linear("ffn_up", h)
    act = np.maximum(gate, 0.0) ** 2 if cfg.activation == "relu2" else gate / (1.0 + np.exp(-gate))
    return x + linear("ffn_down", _rmsnorm(act * up, norms["ffn_sub_norm"], cfg.rms_eps))
