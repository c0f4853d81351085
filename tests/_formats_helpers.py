"""Small BitNet models written by the tests themselves, with writers independent of our own.

GGUF files come from the `gguf` package's GGUFWriter (and its TQ quantisers), Hugging Face folders from
the `safetensors` and `tokenizers` libraries, so a bug in our writer cannot hide the same bug in our
reader. Shapes are tiny but keep the real constraints (rows a multiple of 256, GQA).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from bitnet_grpc.server.weights import (
    LAYER_NORMS,
    TERNARY_PROJECTIONS,
    ModelConfig,
    ModelWeights,
    TernaryTensor,
    TokenizerSpec,
)
from safetensors import TensorSpec, serialize_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

N_LAYERS, D_MODEL, D_FF, N_HEADS, N_KV = 2, 256, 512, 4, 2
HEAD_DIM = D_MODEL // N_HEADS
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
MERGED = ["th", "he", "in", "er", "an", "re", "on", "at", "en", "nd", "ti", "es", "or", "te", "of", "ed"]
VOCAB = 256 + len(MERGED) + len(SPECIALS)
BOS, EOS, EOT = VOCAB - 3, VOCAB - 2, VOCAB - 1
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}"
)

PROJ_SHAPES = {
    "attn_q": (N_HEADS * HEAD_DIM, D_MODEL),
    "attn_k": (N_KV * HEAD_DIM, D_MODEL),
    "attn_v": (N_KV * HEAD_DIM, D_MODEL),
    "attn_output": (D_MODEL, N_HEADS * HEAD_DIM),
    "ffn_gate": (D_FF, D_MODEL),
    "ffn_up": (D_FF, D_MODEL),
    "ffn_down": (D_MODEL, D_FF),
}
NORM_DIMS = {"attn_norm": D_MODEL, "attn_sub_norm": D_MODEL, "ffn_norm": D_MODEL, "ffn_sub_norm": D_FF}
HF_PROJ = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def byte_chars() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (byte-level BPE alphabet)."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    extra = [b for b in range(256) if b not in keep]
    mapping = {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(extra)}
    return [mapping[b] for b in range(256)]


def vocabulary() -> tuple[list[str], list[str]]:
    tokens = byte_chars() + MERGED + SPECIALS
    return tokens, [f"{m[0]} {m[1]}" for m in MERGED]


def tokenizer_spec() -> TokenizerSpec:
    tokens, merges = vocabulary()
    types = [1] * (VOCAB - len(SPECIALS)) + [3] * len(SPECIALS)
    return TokenizerSpec(
        kind="gpt2",
        tokens=tokens,
        merges=merges,
        token_types=types,
        pre="llama-bpe",
        bos_id=BOS,
        eos_id=EOS,
        add_bos=True,
        stop_ids=[EOS, EOT],
        chat_template=CHAT_TEMPLATE,
    )


def config(arch: str = "bitnet-b1.58", activation: str = "relu2", tied: bool = True) -> ModelConfig:
    return ModelConfig(
        arch=arch,
        n_layers=N_LAYERS,
        d_model=D_MODEL,
        d_ff=D_FF,
        n_heads=N_HEADS,
        n_kv_heads=N_KV,
        head_dim=HEAD_DIM,
        vocab_size=VOCAB,
        context_length=512,
        rope_theta=500000.0,
        rms_eps=1e-5,
        activation=activation,
        tied_embeddings=tied,
    )


def random_weights(seed: int = 0, tied: bool = True, **cfg_kwargs) -> ModelWeights:
    """Random ternary codes (about 1/3 zeros) with distinct per-tensor scales, random float tensors."""
    rng = np.random.default_rng(seed)
    floats = {
        "token_embd.weight": rng.normal(0, 0.5, (VOCAB, D_MODEL)).astype(np.float32),
        "output_norm.weight": (1 + 0.1 * rng.normal(size=D_MODEL)).astype(np.float32),
    }
    if not tied:
        floats["output.weight"] = rng.normal(0, 0.5, (VOCAB, D_MODEL)).astype(np.float32)
    ternary = {}
    for layer in range(N_LAYERS):
        for norm in LAYER_NORMS:
            floats[f"blk.{layer}.{norm}.weight"] = (1 + 0.1 * rng.normal(size=NORM_DIMS[norm])).astype(
                np.float32
            )
        for proj in TERNARY_PROJECTIONS:
            codes = rng.integers(-1, 2, size=PROJ_SHAPES[proj]).astype(np.int8)
            scale = float(np.float32(rng.uniform(0.5, 2.0)))
            ternary[f"blk.{layer}.{proj}.weight"] = TernaryTensor(codes, scale, "F32")
    return ModelWeights(
        config=config(tied=tied, **cfg_kwargs),
        float_tensors=floats,
        ternary=ternary,
        tokenizer=tokenizer_spec(),
        source="random",
        file_format="test",
    )


# ------------------------------------------------------------------------------------------ GGUF


@dataclass
class GGUFRecipe:
    """What `write_gguf_with_package` writes; tests tweak fields to make broken or unusual files."""

    weights: ModelWeights
    proj_type: str = "TQ2_0"  # TQ2_0, TQ1_0, F16, F32 (the types the gguf package can write)
    arch: str = "bitnet-b1.58"
    activation_key: str | None = "relu2"
    skip: set[str] = field(default_factory=set)
    replace: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType | None]] = field(default_factory=dict)
    extra: dict[str, np.ndarray] = field(default_factory=dict)


def write_gguf_with_package(path: Path, recipe: GGUFRecipe) -> Path:
    w = recipe.weights
    c = w.config
    writer = gguf.GGUFWriter(str(path), recipe.arch)
    a = recipe.arch
    writer.add_uint32(f"{a}.context_length", c.context_length)
    writer.add_uint32(f"{a}.embedding_length", c.d_model)
    writer.add_uint32(f"{a}.block_count", c.n_layers)
    writer.add_uint32(f"{a}.feed_forward_length", c.d_ff)
    writer.add_uint32(f"{a}.attention.head_count", c.n_heads)
    writer.add_uint32(f"{a}.attention.head_count_kv", c.n_kv_heads)
    writer.add_float32(f"{a}.attention.layer_norm_rms_epsilon", c.rms_eps)
    writer.add_float32(f"{a}.rope.freq_base", c.rope_theta)
    writer.add_uint32(f"{a}.rope.dimension_count", c.head_dim)
    if recipe.activation_key:
        writer.add_string(f"{a}.hidden_activation", recipe.activation_key)
    t = w.tokenizer
    writer.add_tokenizer_model(t.kind)
    writer.add_tokenizer_pre(t.pre)
    writer.add_token_list(t.tokens)
    writer.add_token_merges(t.merges)
    writer.add_token_types(t.token_types)
    writer.add_bos_token_id(t.bos_id)
    writer.add_eos_token_id(t.eos_id)
    writer.add_eot_token_id(EOT)
    writer.add_chat_template(t.chat_template)

    qtype = gguf.GGMLQuantizationType[recipe.proj_type]
    tensors: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType | None]] = {}
    for name, array in w.float_tensors.items():
        tensors[name] = (array, None)
    for name, tt in w.ternary.items():
        dense = tt.codes.astype(np.float32) * np.float32(tt.scale)
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            tensors[name] = (gguf.quants.quantize(dense, qtype), None)
        else:
            tensors[name] = (gguf.quants.quantize(dense, qtype), qtype)
    tensors.update(recipe.replace)
    tensors.update({k: (v, None) for k, v in recipe.extra.items()})
    for name, (array, raw) in tensors.items():
        if name not in recipe.skip:
            writer.add_tensor(name, array, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ------------------------------------------------------------------------------------------ HF


def _save_safetensors(path: Path, tensors: dict[str, np.ndarray], bf16: set[str] = frozenset()) -> None:
    """Write with the safetensors library; names in `bf16` are float32 arrays stored as bfloat16."""
    keep = []
    specs = {}
    for name, array in tensors.items():
        if name in bf16:
            array = np.ascontiguousarray(
                (np.asarray(array, np.float32).view(np.uint32) >> 16).astype(np.uint16)
            )
            dtype = "bfloat16"
        else:
            array = np.ascontiguousarray(array)
            dtype = array.dtype.name
        keep.append(array)
        specs[name] = TensorSpec(
            dtype=dtype, shape=array.shape, data_ptr=array.ctypes.data, data_len=array.nbytes
        )
    serialize_file(specs, str(path), metadata={"format": "pt"})


def hf_tokenizer_files(folder: Path) -> None:
    tokens, merges = vocabulary()
    bpe = models.BPE(
        vocab={t: i for i, t in enumerate(tokens[: VOCAB - len(SPECIALS)])},
        merges=[tuple(m.split(" ")) for m in merges],
    )
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS, EOT]}))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": SPECIALS[0],
                "eos_token": SPECIALS[1],
                "add_bos_token": True,
                "chat_template": CHAT_TEMPLATE,
            }
        )
    )


def write_hf_folder(
    folder: Path,
    weights: ModelWeights,
    *,
    storage: str = "packed",  # "packed" (uint8 + weight_scale) or "master" (float [out, in])
    masters: dict[str, np.ndarray] | None = None,  # float master weights by GGUF name (storage="master")
    linear_class: str | None = "autobitlinear",  # None: no quantization_config at all
    mode: str = "offline",
    old_names: bool = False,  # 1bitLLM: inner_attn_ln / ffn_layernorm
    hidden_act: str = "relu2",
    float_dtype: str = "bf16",  # bf16, f16 or f32 for norms, embeddings and masters
    drop: tuple[str, ...] = (),
    override: dict[str, np.ndarray] | None = None,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    c = weights.config
    tensors: dict[str, np.ndarray] = {}
    floats: set[str] = set()

    def put_float(name: str, array: np.ndarray) -> None:
        if float_dtype == "f16":
            tensors[name] = np.asarray(array, np.float16)
        else:
            tensors[name] = np.asarray(array, np.float32)
            if float_dtype == "bf16":
                floats.add(name)

    put_float("model.embed_tokens.weight", weights.float_tensors["token_embd.weight"])
    put_float("model.norm.weight", weights.float_tensors["output_norm.weight"])
    if not c.tied_embeddings:
        put_float("lm_head.weight", weights.float_tensors["output.weight"])
    norm_names = {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_sub_norm": "self_attn.inner_attn_ln" if old_names else "self_attn.attn_sub_norm",
        "ffn_sub_norm": "mlp.ffn_layernorm" if old_names else "mlp.ffn_sub_norm",
    }
    for layer in range(c.n_layers):
        base = f"model.layers.{layer}"
        for norm, hf in norm_names.items():
            put_float(f"{base}.{hf}.weight", weights.float_tensors[f"blk.{layer}.{norm}.weight"])
        for proj, hf in HF_PROJ.items():
            gname = f"blk.{layer}.{proj}.weight"
            if storage == "packed":
                from bitnet_grpc.server.ternary_formats import pack_hf_rows

                t = weights.ternary[gname]
                tensors[f"{base}.{hf}.weight"] = pack_hf_rows(t.codes)
                scale = (
                    np.float32(t.scale)
                    if linear_class == "autobitlinear"
                    else np.float32(1) / np.float32(t.scale)
                )
                tensors[f"{base}.{hf}.weight_scale"] = np.array([scale], np.float32)
            else:
                put_float(f"{base}.{hf}.weight", masters[gname])
    for name in drop:
        tensors.pop(name)
    tensors.update(override or {})
    half = len(tensors) // 2  # two shards, like real checkpoints
    names = list(tensors)
    _save_safetensors(
        folder / "model-00001-of-00002.safetensors", {n: tensors[n] for n in names[:half]}, floats
    )
    _save_safetensors(
        folder / "model-00002-of-00002.safetensors", {n: tensors[n] for n in names[half:]}, floats
    )

    cfg = {
        "architectures": ["BitNetForCausalLM" if not old_names else "BitnetForCausalLM"],
        "model_type": "bitnet" if not old_names else "llama",
        "hidden_size": c.d_model,
        "intermediate_size": c.d_ff,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.context_length,
        "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_eps,
        "hidden_act": hidden_act,
        "tie_word_embeddings": c.tied_embeddings,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
    }
    if linear_class is not None:
        cfg["quantization_config"] = {
            "quant_method": "bitnet",
            "linear_class": linear_class,
            "quantization_mode": mode,
        }
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    hf_tokenizer_files(folder)
    return folder
