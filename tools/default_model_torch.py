"""The default model in torch: a small BitNet b1.58 of the 2B4T family, for training and as the oracle.

Per layer (BITNET.md section 1): RMSNorm -> BitLinear q, k, v -> NeoX rotary -> causal grouped-query
attention -> SubLN norm -> BitLinear o -> residual; RMSNorm -> BitLinear gate, up -> relu(g)^2 * u ->
SubLN norm -> BitLinear down -> residual. Final RMSNorm and the output head tied to the embedding.

Two modes of every BitLinear:
- training (`exact=False`): quantisation-aware, as the BitNet papers train. The forward pass sees
  absmean-ternary weights and per-token absmax int8 activations; straight-through estimators pass the
  gradient to the float master weights and inputs unchanged.
- inference (`exact=True`): the arithmetic our engine runs (BITNET.md section 2) with the weights as the
  GGUF stores them: int8 activations (round half to even), exact integer dot product, then
  `(acc / x_scale) * w_scale` in float32, with `w_scale` rounded to float16 like a TQ2_0 block scale.
  That makes this module the oracle of the parity test.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DefaultModelConfig:
    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 4
    n_kv_heads: int = 2
    d_ff: int = 768
    context_length: int = 512
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    activation: str = "relu2"  # "relu2" (2B4T) or "silu" (1bitLLM-style twin)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)


def absmean_ternary(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes in {-1, 0, 1} as float, scale): scale = max(mean|W|, 1e-5), codes = clip(round(W/scale))."""
    scale = w.abs().mean().clamp(min=1e-5)
    codes = torch.clamp(torch.round(w / scale), -1, 1)
    return codes, scale


def absmax_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values as float, x_scale) per row: x_scale = 127 / max(max|x|, 1e-5), round half to even."""
    x_scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return torch.clamp(torch.round(x * x_scale), -128, 127), x_scale


def stored_scale(scale: torch.Tensor) -> torch.Tensor:
    """The weight scale as the file stores it: TQ2_0 block scales are float16."""
    return scale.detach().to(torch.float16).to(torch.float32)


class BitLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor, exact: bool = False) -> torch.Tensor:
        codes, scale = absmean_ternary(self.weight)
        xq, x_scale = absmax_int8(x)
        if exact:
            acc = xq @ codes.t()  # integers below 2**24: exact in float32 whatever the order
            return (acc / x_scale) * stored_scale(scale)
        w = self.weight + (codes * scale - self.weight).detach()
        xs = x + (xq / x_scale - x).detach()
        return F.linear(xs, w)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(cfg: DefaultModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    half = cfg.head_dim // 2
    inv_freq = cfg.rope_theta ** (-torch.arange(half, dtype=torch.float64) * 2.0 / cfg.head_dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return torch.cos(angles).to(torch.float32), torch.sin(angles).to(torch.float32)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX rotate-half: dimension i pairs with i + head_dim/2. x: [B, T, H, head_dim]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


class Block(nn.Module):
    def __init__(self, cfg: DefaultModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, kv = cfg.d_model, cfg.n_kv_heads * cfg.head_dim
        self.attn_norm = RMSNorm(d, cfg.rms_eps)
        self.attn_q = BitLinear(d, cfg.n_heads * cfg.head_dim)
        self.attn_k = BitLinear(d, kv)
        self.attn_v = BitLinear(d, kv)
        self.attn_sub_norm = RMSNorm(cfg.n_heads * cfg.head_dim, cfg.rms_eps)
        self.attn_output = BitLinear(cfg.n_heads * cfg.head_dim, d)
        self.ffn_norm = RMSNorm(d, cfg.rms_eps)
        self.ffn_gate = BitLinear(d, cfg.d_ff)
        self.ffn_up = BitLinear(d, cfg.d_ff)
        self.ffn_sub_norm = RMSNorm(cfg.d_ff, cfg.rms_eps)
        self.ffn_down = BitLinear(cfg.d_ff, d)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, exact: bool) -> torch.Tensor:
        cfg = self.cfg
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q = self.attn_q(h, exact).view(b, t, cfg.n_heads, cfg.head_dim)
        k = self.attn_k(h, exact).view(b, t, cfg.n_kv_heads, cfg.head_dim)
        v = self.attn_v(h, exact).view(b, t, cfg.n_kv_heads, cfg.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        group = cfg.n_heads // cfg.n_kv_heads  # query head j reads KV head j // group
        k = k.repeat_interleave(group, dim=2)
        v = v.repeat_interleave(group, dim=2)
        if exact:
            att = _attention_reference(q, k, v)
        else:
            att = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
            ).transpose(1, 2)
        a = self.attn_sub_norm(att.reshape(b, t, cfg.n_heads * cfg.head_dim))
        x = x + self.attn_output(a, exact)
        h = self.ffn_norm(x)
        g, u = self.ffn_gate(h, exact), self.ffn_up(h, exact)
        m = (torch.relu(g) ** 2 if cfg.activation == "relu2" else F.silu(g)) * u
        return x + self.ffn_down(self.ffn_sub_norm(m), exact)


def _attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain causal softmax attention in float32 (no fused kernel), [B, T, H, D] in and out."""
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    t = q.shape[1]
    mask = torch.ones(t, t, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(mask, float("-inf"))
    return torch.einsum("bhts,bshd->bthd", torch.softmax(scores, dim=-1), v)


class BitNetLM(nn.Module):
    def __init__(self, cfg: DefaultModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embd = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.token_embd.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.output_norm = RMSNorm(cfg.d_model, cfg.rms_eps)

    def forward(self, tokens: torch.Tensor, exact: bool = False) -> torch.Tensor:
        """Logits [B, T, vocab] for tokens [B, T] at positions 0..T-1."""
        t = tokens.shape[1]
        cos, sin = rope_tables(self.cfg, torch.arange(t))
        x = self.token_embd(tokens)
        for block in self.blocks:
            x = block(x, cos, sin, exact)
        return self.output_norm(x) @ self.token_embd.weight.t()  # tied output head

    @torch.no_grad()
    def greedy(self, prompt: list[int], n_tokens: int) -> list[int]:
        """Greedy continuation with inference arithmetic (the parity oracle); recomputes the whole
        prefix each step, which is slow but has no cache to get wrong."""
        ids = list(prompt)
        out: list[int] = []
        for _ in range(n_tokens):
            logits = self.forward(torch.tensor([ids]), exact=True)[0, -1]
            nxt = int(torch.argmax(logits))
            out.append(nxt)
            ids.append(nxt)
        return out

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """Weight decay on the ternary master weights only (norms and embedding excluded)."""
        decay = [p for n, p in self.named_parameters() if p.ndim == 2 and "token_embd" not in n]
        rest = [p for n, p in self.named_parameters() if not (p.ndim == 2 and "token_embd" not in n)]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
