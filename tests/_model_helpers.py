"""Random small BitNet models for the engine tests, and a plain numpy forward pass to check them against.

The numpy forward follows BITNET.md section 1 step by step over a whole sequence, with BitLinear written
out from section 2 (absmax int8 activations, exact integer products) and the float kernels' numpy
references from `bitnet_grpc.cyext.reference`. It shares no code with `server/model.py`.
"""

from __future__ import annotations

import numpy as np
from _formats_helpers import tokenizer_spec
from bitnet_grpc.cyext import reference as ref
from bitnet_grpc.server.weights import LAYER_NORMS, ModelConfig, ModelWeights, TernaryTensor

SPEC_VOCAB = len(tokenizer_spec().tokens)


def random_weights(
    seed: int = 0,
    *,
    n_layers: int = 2,
    d_model: int = 128,
    d_ff: int = 320,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    vocab_size: int = SPEC_VOCAB,
    context_length: int = 256,
    activation: str = "relu2",
    tied: bool = True,
    embedding_dtype: str = "f32",
) -> ModelWeights:
    """Weights scaled as BITNET.md section 5 advises (so every layer and norm visibly matters)."""
    rng = np.random.default_rng(seed)
    head_dim = d_model // n_heads
    cfg = ModelConfig(
        arch="bitnet-b1.58",
        n_layers=n_layers,
        d_model=d_model,
        d_ff=d_ff,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        vocab_size=vocab_size,
        context_length=context_length,
        rope_theta=10000.0,
        rms_eps=1e-5,
        activation=activation,
        tied_embeddings=tied,
    )
    embedding = rng.normal(0, 0.5, (vocab_size, d_model)).astype(np.float32)
    if embedding_dtype == "f16":  # values a float16 file could hold
        embedding = embedding.astype(np.float16).astype(np.float32)
    elif embedding_dtype == "bf16":  # values a bfloat16 file could hold, some not exact in float16
        embedding[0, :3] = [1e-7, -2.5e-6, 1.0]  # float16 would flush these tiny values
        embedding = (embedding.view(np.uint32) & 0xFFFF0000).view(np.float32)
    floats = {
        "token_embd.weight": embedding,
        "output_norm.weight": (1 + 0.1 * rng.standard_normal(d_model)).astype(np.float32),
    }
    if not tied:
        floats["output.weight"] = rng.normal(0, 0.5, (vocab_size, d_model)).astype(np.float32)
    widths = {"attn_norm": d_model, "attn_sub_norm": cfg.q_dim, "ffn_norm": d_model, "ffn_sub_norm": d_ff}
    shapes = {
        "attn_q": (cfg.q_dim, d_model),
        "attn_k": (cfg.kv_dim, d_model),
        "attn_v": (cfg.kv_dim, d_model),
        "attn_output": (d_model, cfg.q_dim),
        "ffn_gate": (d_ff, d_model),
        "ffn_up": (d_ff, d_model),
        "ffn_down": (d_model, d_ff),
    }
    ternary = {}
    for layer in range(n_layers):
        for norm in LAYER_NORMS:
            floats[f"blk.{layer}.{norm}.weight"] = (1 + 0.1 * rng.standard_normal(widths[norm])).astype(
                np.float32
            )
        for proj, shape in shapes.items():
            codes = rng.choice(np.array([-1, 0, 1], np.int8), size=shape, p=[0.35, 0.3, 0.35])
            scale = float(np.float32(rng.uniform(0.02, 0.2)))
            ternary[f"blk.{layer}.{proj}.weight"] = TernaryTensor(codes, scale, "F32")
    return ModelWeights(
        config=cfg,
        float_tensors=floats,
        ternary=ternary,
        tokenizer=tokenizer_spec(),
        source="random",
        file_format="test",
    )


def bitlinear(x: np.ndarray, tensor: TernaryTensor) -> np.ndarray:
    """BITNET.md section 2: y = (x_q . W_t) * s_w / s_x, integer dot exact; float steps in float32."""
    x = np.asarray(x, np.float32)
    x_scale = np.float32(127) / np.maximum(np.abs(x).max(axis=1), np.float32(1e-5))
    xq = np.clip(np.rint(x * x_scale[:, None]), -128, 127).astype(np.int64)
    acc = xq @ tensor.codes.astype(np.int64).T
    return (acc.astype(np.float32) / x_scale[:, None]) * np.float32(tensor.scale)


def numpy_forward(weights: ModelWeights, tokens: list[int]) -> np.ndarray:
    """Logits [T, vocab] for every position of one sequence starting at position 0."""
    cfg = weights.config
    f = weights.float_tensors
    n = len(tokens)
    positions = np.arange(n, dtype=np.int32)
    cos, sin = ref.rope_tables(n, cfg.head_dim, cfg.rope_theta)
    x = f["token_embd.weight"][np.asarray(tokens)].astype(np.float32)
    for i in range(cfg.n_layers):
        w = {name.split(".")[2]: t for name, t in weights.ternary.items() if name.startswith(f"blk.{i}.")}

        def norm(name, v, i=i):
            return ref.rmsnorm(v, f[f"blk.{i}.{name}.weight"], cfg.rms_eps)

        h = norm("attn_norm", x)
        q = ref.rope(bitlinear(h, w["attn_q"]), positions, cos, sin, cfg.n_heads)
        k = ref.rope(bitlinear(h, w["attn_k"]), positions, cos, sin, cfg.n_kv_heads)
        v = bitlinear(h, w["attn_v"])
        keys = k.reshape(n, cfg.n_kv_heads, cfg.head_dim).transpose(1, 0, 2)[None]  # [1, n_kv, n, hd]
        values = v.reshape(n, cfg.n_kv_heads, cfg.head_dim).transpose(1, 0, 2)[None]
        attn = ref.attention(q, keys, values, np.zeros(n, np.int32), positions)
        x = x + bitlinear(norm("attn_sub_norm", attn), w["attn_output"])
        h = norm("ffn_norm", x)
        gate_up = np.concatenate([bitlinear(h, w["ffn_gate"]), bitlinear(h, w["ffn_up"])], axis=1)
        m = ref.relu2_gate(gate_up) if cfg.activation == "relu2" else ref.silu_gate(gate_up)
        x = x + bitlinear(norm("ffn_sub_norm", m), w["ffn_down"])
    x = ref.rmsnorm(x, f["output_norm.weight"], cfg.rms_eps)
    head = f.get("output.weight", f["token_embd.weight"])
    return ref.matmul_rows(x, head)
