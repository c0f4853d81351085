"""What a model file becomes once loaded: the contract between the file readers and the engine.

Readers (GGUF, Hugging Face) fill these plain dataclasses; the engine packs the ternary codes into the
kernels' layout. Tensor names follow GGUF (`token_embd.weight`, `blk.N.attn_q.weight`, ...) whatever the
file format, so the engine has one naming scheme.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

# Per-layer ternary projections, by their GGUF names.
TERNARY_PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# Per-layer float vectors (RMSNorm weights).
LAYER_NORMS = ("attn_norm", "attn_sub_norm", "ffn_norm", "ffn_sub_norm")


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a BitNet b1.58 model (BITNET.md section 1)."""

    arch: str  # GGUF arch string: "bitnet", "bitnet-b1.58" or "bitnet-25"
    n_layers: int
    d_model: int
    d_ff: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    rope_theta: float
    rms_eps: float
    activation: str  # "relu2" (2B4T family) or "silu" (1bitLLM checkpoints)
    tied_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.activation not in ("relu2", "silu"):
            raise ValueError(f"activation must be 'relu2' or 'silu', got {self.activation!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """[out, in] of each ternary projection of a layer, by GGUF name."""
        d, q, kv, ff = self.d_model, self.q_dim, self.kv_dim, self.d_ff
        return {
            "attn_q": (q, d),
            "attn_k": (kv, d),
            "attn_v": (kv, d),
            "attn_output": (d, q),
            "ffn_gate": (ff, d),
            "ffn_up": (ff, d),
            "ffn_down": (d, ff),
        }

    def norm_dims(self) -> dict[str, int]:
        """Width of each RMSNorm weight of a layer, by GGUF name (the sub-norms sit inside the block)."""
        return {"attn_norm": self.d_model, "attn_sub_norm": self.q_dim, "ffn_norm": self.d_model,
                "ffn_sub_norm": self.d_ff}  # fmt: skip


@dataclass
class TernaryTensor:
    """A ternary weight matrix: int8 codes in {-1, 0, +1} of shape [out, in] and one float scale.

    `scale` multiplies the integer product: it already folds in the file's convention (HF
    `weight_scale` multiplied or divided by `linear_class`, GGUF `.scale` tensors, block scales).
    """

    codes: np.ndarray  # int8 [out_features, in_features]
    scale: float
    source_type: str  # how it was stored: "I2_S", "TQ2_0", "TQ1_0", "F32", "F16", "BF16", "U8-packed"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]


@dataclass
class TokenizerSpec:
    """Everything needed to rebuild the model's tokenizer, from GGUF metadata or a Hugging Face folder."""

    kind: str  # "gpt2" (byte-level BPE), "llama" (SentencePiece) or "hf-json" (tokenizer.json)
    tokens: list[str] = field(default_factory=list)
    merges: list[str] = field(default_factory=list)
    token_types: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    pre: str | None = None  # GGUF `tokenizer.ggml.pre` (pre-tokenizer split), after corrections
    tokenizer_json: str | None = None  # the text of tokenizer.json for "hf-json"
    bos_id: int | None = None
    eos_id: int | None = None
    add_bos: bool = True
    stop_ids: list[int] = field(default_factory=list)  # eos plus end-of-turn ids: any ends generation
    chat_template: str | None = None


@dataclass
class ModelWeights:
    """A loaded model before packing: float tensors, ternary tensors, tokenizer and provenance."""

    config: ModelConfig
    float_tensors: dict[str, np.ndarray]  # float32; token_embd.weight [vocab, d_model], norms [dim]
    ternary: dict[str, TernaryTensor]  # blk.N.<projection>.weight
    tokenizer: TokenizerSpec
    source: str  # the path it came from
    file_format: str  # "gguf" or "hf"
    corrections: list[str] = field(default_factory=list)  # what the loader fixed, for `inspect` and logs
    metadata: dict[str, object] = field(default_factory=dict)  # raw file metadata worth showing

    @property
    def weight_format(self) -> str:
        """The dominant ternary storage type, e.g. "I2_S" ("none" for a model without projections)."""
        formats = Counter(t.source_type for t in self.ternary.values())
        return formats.most_common(1)[0][0] if formats else "none"

    def param_count(self) -> int:
        floats = sum(int(t.size) for t in self.float_tensors.values())
        return floats + sum(int(t.codes.size) for t in self.ternary.values())
