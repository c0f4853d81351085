"""Write the trained default model as a GGUF file laid out like the official BitNet b1.58 2B4T file.

Projections are stored as TQ2_0 (a ternary type llama.cpp reads). The `gguf` package's quantiser takes
each block's scale d as the block's max |w|; it is fed the already-ternary values `codes * scale` with
`scale` already a float16 value, so every block's d is exactly the tensor's absmean scale and
dequantising gives back `codes * scale` bit for bit (checked after writing).
Norms and the (tied) embedding are F32, so nothing else is rounded on the way to the file.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from default_model_tokenizer import BOS, EOS, GGUF_PRE, gguf_vocab
from default_model_torch import BitNetLM, absmean_ternary, stored_scale
from tokenizers import Tokenizer

TERNARY_TYPE = gguf.GGMLQuantizationType.TQ2_0
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
NORMS = ("attn_norm", "attn_sub_norm", "ffn_norm", "ffn_sub_norm")


def ternary_values(layer: torch.nn.Module) -> tuple[np.ndarray, float]:
    """(codes int8 [out, in], float16-exact scale) of one BitLinear, as the inference path uses them."""
    with torch.no_grad():
        codes, scale = absmean_ternary(layer.weight)
        return codes.to(torch.int8).numpy(), float(stored_scale(scale))


def write_gguf(
    model: BitNetLM,
    tok: Tokenizer,
    path: Path,
    *,
    arch: str,
    name: str,
    description: str,
    write_activation_key: bool = True,
) -> None:
    cfg = model.cfg
    tokens, types, merges = gguf_vocab(tok)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_description(description)
    w.add_license("MIT")
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    if write_activation_key:
        w.add_string(f"{arch}.hidden_activation", cfg.activation)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_TQ2_0)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(GGUF_PRE)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index(BOS))
    w.add_eos_token_id(tokens.index(EOS))
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    sd = {k: v.detach().to(torch.float32).numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["token_embd.weight"])
    w.add_tensor("output_norm.weight", sd["output_norm.weight"])
    for i, block in enumerate(model.blocks):
        for norm in NORMS:
            w.add_tensor(f"blk.{i}.{norm}.weight", sd[f"blocks.{i}.{norm}.weight"])
        for proj in PROJECTIONS:
            codes, scale = ternary_values(getattr(block, proj))
            values = codes.astype(np.float32) * np.float32(scale)
            packed = gguf.quants.quantize(values, TERNARY_TYPE)
            w.add_tensor(f"blk.{i}.{proj}.weight", packed, raw_dtype=TERNARY_TYPE)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    verify_ternary_tensors(model, path)


def verify_ternary_tensors(model: BitNetLM, path: Path) -> None:
    """Read the file back: each ternary tensor must dequantise to exactly codes * scale."""
    reader = gguf.GGUFReader(str(path))
    stored = {t.name: t for t in reader.tensors}
    for i, block in enumerate(model.blocks):
        for proj in PROJECTIONS:
            t = stored[f"blk.{i}.{proj}.weight"]
            codes, scale = ternary_values(getattr(block, proj))
            got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(codes.shape)
            want = codes.astype(np.float32) * np.float32(scale)
            if not np.array_equal(got, want):
                raise RuntimeError(f"{t.name}: stored values differ from the ternary weights")
