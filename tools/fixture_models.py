"""Small random BitNet b1.58 models for the parity fixtures, and their files.

The random init follows BITNET.md section 5 (weight std 0.1, embedding std 0.5, norm weights
1 + 0.1·N(0,1)) so every layer and every norm visibly matters. Values are chosen so that every file format
holds them exactly: floats are bf16 values that f16 also represents, ternary scales likewise, and master
weights keep clear of the absmean rounding boundaries (|w| = 0.5·mean|W|), so any correct reader of any
file recovers the very same codes and scales.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass, field

import numpy as np
from fixture_tokenizer import gguf_tokenizer_fields

PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
NORMS = ("attn_norm", "attn_sub_norm", "ffn_norm", "ffn_sub_norm")
# GGUF name -> Hugging Face name (per layer, under model.layers.N.)
HF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "attn_sub_norm": "self_attn.attn_sub_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_sub_norm": "mlp.ffn_sub_norm",
}


@dataclass(frozen=True)
class Shape:
    """Hyper-parameters of one fixture model."""

    n_layers: int
    d_model: int
    d_ff: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    activation: str  # "relu2" or "silu"
    rope_theta: float
    rms_eps: float = 1e-5
    context_length: int = 2048

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """[out, in] of each per-layer projection."""
        kv = self.n_kv_heads * self.head_dim
        d, f = self.d_model, self.d_ff
        return {
            "attn_q": (d, d),
            "attn_k": (kv, d),
            "attn_v": (kv, d),
            "attn_output": (d, d),
            "ffn_gate": (f, d),
            "ffn_up": (f, d),
            "ffn_down": (d, f),
        }

    def norm_sizes(self) -> dict[str, int]:
        return {"attn_norm": self.d_model, "attn_sub_norm": self.d_model, "ffn_norm": self.d_model,
                "ffn_sub_norm": self.d_ff}  # fmt: skip


@dataclass
class RandomModel:
    """All tensors of a fixture model under GGUF names, as float32 arrays (exact in bf16 and f16)."""

    shape: Shape
    floats: dict[str, np.ndarray] = field(default_factory=dict)  # token_embd, norms
    master: dict[str, np.ndarray] = field(default_factory=dict)  # float master weights [out, in]
    codes: dict[str, np.ndarray] = field(default_factory=dict)  # int8 ternary codes [out, in]
    scales: dict[str, float] = field(default_factory=dict)  # per-tensor scale, bf16- and f16-exact

    def ternary_weight(self, name: str) -> np.ndarray:
        """The dequantised ternary matrix codes·scale, float32 [out, in]."""
        return self.codes[name].astype(np.float32) * np.float32(self.scales[name])

    def with_shape(self, shape: Shape) -> RandomModel:
        """The same tensors under other non-tensor hyper-parameters (the SiLU twin)."""
        return RandomModel(shape, self.floats, self.master, self.codes, self.scales)


def bf16_round(x: np.ndarray) -> np.ndarray:
    """Round float32 values to the nearest bfloat16 (ties to even), returned as float32."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32)


def exact_in_f16_and_bf16(x: np.ndarray) -> np.ndarray:
    """bf16-rounded values, with the rare ones f16 cannot hold (tiny magnitudes) set to zero."""
    y = bf16_round(x)
    y[y.astype(np.float16).astype(np.float32) != y] = 0.0
    return y


def _master_weight(rng: np.random.Generator, out_f: int, in_f: int, std: float) -> np.ndarray:
    """bf16 master weights none of which sits within 0.2% of the absmean rounding boundary."""
    w = bf16_round(rng.normal(0.0, std, (out_f, in_f)).astype(np.float32))
    for _ in range(20):
        mean_abs = float(np.abs(w.astype(np.float64)).mean())
        ratio = np.abs(w) / mean_abs
        near = np.abs(ratio - 0.5) < 2e-3
        if not near.any():
            return w
        w[near] = bf16_round(w[near] * np.where(ratio[near] >= 0.5, 1.01, 0.99).astype(np.float32))
    raise RuntimeError("could not move master weights off the rounding boundary")


def random_model(shape: Shape, seed: int) -> RandomModel:
    """Draw a model; ternary codes are the absmean ternarisation of the master weights."""
    rng = np.random.default_rng(seed)
    model = RandomModel(shape)
    model.floats["token_embd.weight"] = exact_in_f16_and_bf16(
        rng.normal(0.0, 0.5, (shape.vocab_size, shape.d_model)).astype(np.float32)
    )
    model.floats["output_norm.weight"] = bf16_round(
        (1.0 + 0.1 * rng.normal(size=shape.d_model)).astype(np.float32)
    )
    for layer in range(shape.n_layers):
        for norm, size in shape.norm_sizes().items():
            weight = (1.0 + 0.1 * rng.normal(size=size)).astype(np.float32)
            model.floats[f"blk.{layer}.{norm}.weight"] = bf16_round(weight)
        for proj, (out_f, in_f) in shape.projection_shapes().items():
            name = f"blk.{layer}.{proj}.weight"
            w = _master_weight(rng, out_f, in_f, 0.1)
            mean_abs = np.float32(np.abs(w).mean(dtype=np.float64))
            model.master[name] = w
            model.codes[name] = np.clip(np.rint(w / mean_abs), -1, 1).astype(np.int8)
            scale = bf16_round(np.array([mean_abs], dtype=np.float32))
            if scale.astype(np.float16).astype(np.float32)[0] != scale[0]:
                raise RuntimeError(f"scale {scale[0]} of {name} is not exact in f16")
            model.scales[name] = float(scale[0])
    return model


# ----------------------------------------------------------------------------------------------------------
# Hugging Face folders


def pack_hf_rows(codes: np.ndarray) -> np.ndarray:
    """The 2B4T packed layout: uint8 [out/4, in]; packed row r holds rows r + k·out/4 in bits 2k..2k+1."""
    out_f = codes.shape[0]
    if out_f % 4:
        raise ValueError(f"out_features {out_f} is not a multiple of 4")
    quarter = out_f // 4
    shifted = (codes.astype(np.int16) + 1).astype(np.uint8)
    packed = np.zeros((quarter, codes.shape[1]), dtype=np.uint8)
    for k in range(4):
        packed |= shifted[k * quarter : (k + 1) * quarter] << np.uint8(2 * k)
    return packed


def hf_config(shape: Shape, tok: dict[str, object], quantization_mode: str) -> dict[str, object]:
    """config.json of a BitNetForCausalLM checkpoint shaped like microsoft/bitnet-b1.58-2B-4T's."""
    return {
        "architectures": ["BitNetForCausalLM"],
        "model_type": "bitnet",
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.d_model,
        "intermediate_size": shape.d_ff,
        "num_hidden_layers": shape.n_layers,
        "num_attention_heads": shape.n_heads,
        "num_key_value_heads": shape.n_kv_heads,
        "hidden_act": shape.activation,
        "max_position_embeddings": shape.context_length,
        "rms_norm_eps": shape.rms_eps,
        "rope_theta": shape.rope_theta,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "bos_token_id": tok["bos_id"],
        "eos_token_id": [tok["eos_id"], tok["eot_id"]],
        "torch_dtype": "bfloat16",
        "quantization_config": {
            "quant_method": "bitnet",
            "linear_class": "autobitlinear",
            "quantization_mode": quantization_mode,
        },
    }


def hf_state_dict(model: RandomModel, packed: bool) -> dict[str, tuple[np.ndarray, str]]:
    """HF tensor name -> (array, storage dtype): packed uint8 + weight_scale, or bf16 master weights."""
    tensors: dict[str, tuple[np.ndarray, str]] = {
        "model.embed_tokens.weight": (model.floats["token_embd.weight"], "bf16"),
        "model.norm.weight": (model.floats["output_norm.weight"], "bf16"),
    }
    for layer in range(model.shape.n_layers):
        for norm in NORMS:
            hf = f"model.layers.{layer}.{HF_LAYER_NAMES[norm]}.weight"
            tensors[hf] = (model.floats[f"blk.{layer}.{norm}.weight"], "bf16")
        for proj in PROJECTIONS:
            name = f"blk.{layer}.{proj}.weight"
            hf = f"model.layers.{layer}.{HF_LAYER_NAMES[proj]}"
            if packed:
                tensors[f"{hf}.weight"] = (pack_hf_rows(model.codes[name]), "u8")
                tensors[f"{hf}.weight_scale"] = (np.array([model.scales[name]], dtype=np.float32), "bf16")
            else:
                tensors[f"{hf}.weight"] = (model.master[name], "bf16")
    return tensors


def write_hf_folder(model: RandomModel, folder: pathlib.Path, tokenizer, packed: bool) -> None:
    """config.json, model.safetensors and the tokenizer files (safetensors written through torch for bf16)."""
    import torch
    from fixture_tokenizer import write_hf_tokenizer
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tok = gguf_tokenizer_fields(tokenizer)
    config = hf_config(model.shape, tok, "offline" if packed else "online")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {}
    for name, (array, kind) in hf_state_dict(model, packed).items():
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        tensors[name] = tensor.to(torch.bfloat16) if kind == "bf16" else tensor
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    write_hf_tokenizer(tokenizer, folder)


# ----------------------------------------------------------------------------------------------------------
# GGUF files


def write_gguf(model: RandomModel, path: pathlib.Path, arch: str, weight_type: str, tokenizer) -> None:
    """A GGUF file written with the `gguf` package: weight_type is "F32", "F16", "TQ1_0" or "TQ2_0"."""
    import gguf

    shape = model.shape
    writer = gguf.GGUFWriter(str(path), arch)
    add_gguf_metadata(writer, shape, f"bitnet-grpc parity fixture ({weight_type})")
    add_gguf_tokenizer(writer, gguf_tokenizer_fields(tokenizer))
    qtype = gguf.GGMLQuantizationType[weight_type]
    writer.add_tensor("token_embd.weight", model.floats["token_embd.weight"].astype(np.float16))
    writer.add_tensor("output_norm.weight", model.floats["output_norm.weight"])
    for layer in range(shape.n_layers):
        for norm in NORMS:
            name = f"blk.{layer}.{norm}.weight"
            writer.add_tensor(name, model.floats[name])
        for proj in PROJECTIONS:
            name = f"blk.{layer}.{proj}.weight"
            data = gguf.quants.quantize(model.ternary_weight(name), qtype)
            writer.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def add_gguf_metadata(writer, shape: Shape, name: str) -> None:
    """The `<arch>.*` hyper-parameter keys llama.cpp and our reader look at."""
    writer.add_name(name)
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(shape.d_model)
    writer.add_block_count(shape.n_layers)
    writer.add_feed_forward_length(shape.d_ff)
    writer.add_head_count(shape.n_heads)
    writer.add_head_count_kv(shape.n_kv_heads)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_vocab_size(shape.vocab_size)


def add_gguf_tokenizer(writer, tok: dict[str, object]) -> None:
    """`tokenizer.ggml.*` keys for a byte-level BPE vocabulary with the LLaMA-3 split."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tok["tokens"])
    writer.add_token_merges(tok["merges"])
    writer.add_token_types(tok["token_types"])
    writer.add_bos_token_id(tok["bos_id"])
    writer.add_eos_token_id(tok["eos_id"])
    writer.add_eot_token_id(tok["eot_id"])
    writer.add_add_bos_token(True)
    writer.add_chat_template(tok["chat_template"])
