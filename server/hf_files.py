"""A Hugging Face BitNet folder (config.json + *.safetensors + tokenizer files) -> ModelWeights.

Two storage conventions meet here (BITNET.md section 3, transformers' bitnet integration):
- `quantization_config.quantization_mode: offline`: projections are packed uint8 [out/4, in] plus a
  `weight_scale`; `linear_class: autobitlinear` multiplies the output by it, `bitlinear` divides.
- `online`, or no quantization_config at all (1bitLLM checkpoints): float master weights, ternarised
  at load with the absmean rule.
Names are mapped to the GGUF scheme of `weights.py` so the engine sees one naming.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from . import ternary_formats as tf
from .file_errors import ModelFileError
from .gguf_weights import normalize_activation
from .safetensors_file import SafetensorsFile
from .tokenizer import spec_from_hf_dir
from .weights import ModelConfig, ModelWeights, TernaryTensor

# HF per-layer names -> GGUF names. Two spellings of the sub-norms: 2B4T and the 1bitLLM checkpoints.
LAYER_NORM_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.attn_sub_norm": "attn_sub_norm",
    "self_attn.inner_attn_ln": "attn_sub_norm",
    "mlp.ffn_sub_norm": "ffn_sub_norm",
    "mlp.ffn_layernorm": "ffn_sub_norm",
}
PROJECTION_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")
SHOWN_CONFIG_KEYS = 40


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelFileError(f"{folder}: missing config.json (not a Hugging Face model folder?)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path}: cannot read JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ModelFileError(f"{path}: expected a JSON object")
    return config


class _HFModelReader:
    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.where = str(self.folder)
        self.config = _read_config(self.folder)
        self.corrections: list[str] = []
        self.ternarised: list[str] = []
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise ModelFileError(f"{self.where}: no *.safetensors files")
        self.tensors: dict[str, SafetensorsFile] = {}
        for path in files:
            st = SafetensorsFile(path)
            for name in st.tensors:
                if name in self.tensors:
                    raise ModelFileError(f"{path}: tensor {name} also in {self.tensors[name].path}")
                self.tensors[name] = st
        self._read_quantization()

    # -- config -----------------------------------------------------------------------------------

    def cfg(self, key: str, kind: type, default: Any = None) -> Any:
        value = self.config.get(key, default)
        if value is None:
            raise ModelFileError(f"{self.where}/config.json: missing {key}")
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ModelFileError(f"{self.where}/config.json: {key} is {value!r}, expected {kind.__name__}")

    def _read_quantization(self) -> None:
        q = self.config.get("quantization_config")
        self.quantized = isinstance(q, dict)
        q = q if isinstance(q, dict) else {}
        method = q.get("quant_method", "bitnet")
        if self.quantized and method != "bitnet":
            raise ModelFileError(
                f"{self.where}/config.json: quant_method {method!r} is not supported (bitnet)"
            )
        self.linear_class = q.get("linear_class", "bitlinear")  # transformers' default
        self.mode = q.get("quantization_mode", "offline")
        if self.linear_class not in ("bitlinear", "autobitlinear") or self.mode not in ("offline", "online"):
            raise ModelFileError(
                f"{self.where}/config.json: quantization_config linear_class {self.linear_class!r} / "
                f"quantization_mode {self.mode!r}: expected bitlinear|autobitlinear and offline|online"
            )
        if q.get("use_rms_norm"):
            raise ModelFileError(
                f"{self.where}/config.json: quantization_config.use_rms_norm (an extra norm inside every "
                "BitLinear) is not supported"
            )

    def _is_bitnet(self) -> bool:
        model_type = str(self.config.get("model_type", "")).lower()
        archs = [str(a).lower() for a in self.config.get("architectures") or []]
        return "bitnet" in model_type or any("bitnet" in a for a in archs)

    def _activation(self) -> str:
        if "hidden_act" in self.config:
            return normalize_activation(self.config["hidden_act"], f"{self.where}/config.json: hidden_act")
        act = "relu2" if str(self.config.get("model_type", "")).lower() == "bitnet" else "silu"
        self.corrections.append(f"activation: config.json has no hidden_act; using {act}")
        return act

    def _rope_theta(self) -> float:
        params = self.config.get("rope_parameters") or {}
        scaling = self.config.get("rope_scaling") or {}
        rope_type = scaling.get("rope_type", scaling.get("type")) or params.get("rope_type", "default")
        if rope_type not in ("default", None):
            raise ModelFileError(f"{self.where}/config.json: rope scaling {rope_type!r} is not supported")
        theta = self.config.get("rope_theta", params.get("rope_theta"))
        if theta is None:
            self.corrections.append("rope theta: config.json has none; using 10000")
            return 10000.0
        return float(theta)

    def model_config(self, vocab_size: int) -> ModelConfig:
        if not self._is_bitnet():
            raise ModelFileError(
                f"{self.where}/config.json: model_type {self.config.get('model_type')!r} / architectures "
                f"{self.config.get('architectures')} is not a BitNet model"
            )
        d_model = self.cfg("hidden_size", int)
        n_heads = self.cfg("num_attention_heads", int)
        n_kv = self.cfg("num_key_value_heads", int, n_heads)
        if d_model % n_heads and "head_dim" not in self.config:
            raise ModelFileError(
                f"{self.where}/config.json: hidden_size {d_model} not divisible by {n_heads} heads"
            )
        declared_vocab = self.cfg("vocab_size", int, vocab_size)
        if declared_vocab != vocab_size:
            raise ModelFileError(
                f"{self.where}: config.json vocab_size {declared_vocab} but model.embed_tokens.weight has "
                f"{vocab_size} rows"
            )
        if "rms_norm_eps" not in self.config:
            self.corrections.append("rms eps: config.json has no rms_norm_eps; using 1e-5")
        activation = self._activation()
        has_head = "lm_head.weight" in self.tensors
        tied = bool(self.config.get("tie_word_embeddings", False)) or not has_head
        if not has_head and not self.config.get("tie_word_embeddings", False):
            self.corrections.append("embeddings: no lm_head.weight; output tied to the token embeddings")
        try:
            return ModelConfig(
                arch="bitnet-b1.58" if activation == "relu2" else "bitnet",
                n_layers=self.cfg("num_hidden_layers", int),
                d_model=d_model,
                d_ff=self.cfg("intermediate_size", int),
                n_heads=n_heads,
                n_kv_heads=n_kv,
                head_dim=self.cfg("head_dim", int, d_model // n_heads),
                vocab_size=vocab_size,
                context_length=self.cfg("max_position_embeddings", int),
                rope_theta=self._rope_theta(),
                rms_eps=self.cfg("rms_norm_eps", float, 1e-5),
                activation=activation,
                tied_embeddings=tied,
            )
        except ValueError as exc:
            if isinstance(exc, ModelFileError):
                raise
            raise ModelFileError(f"{self.where}/config.json: {exc}") from None

    # -- tensors ----------------------------------------------------------------------------------

    def file_of(self, name: str) -> SafetensorsFile:
        if name not in self.tensors:
            raise ModelFileError(f"{self.where}: missing tensor {name}")
        return self.tensors[name]

    def floats(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        st = self.file_of(name)
        info = st.tensors[name]
        if info.shape != shape:
            raise ModelFileError(
                f"{st.path}: tensor {name}: bad shape {list(info.shape)}, expected {list(shape)}"
            )
        values = st.float32(name)
        if not np.all(np.isfinite(values)):
            raise ModelFileError(f"{st.path}: tensor {name}: contains NaN or infinite values")
        return values

    def weight_scale(self, prefix: str) -> float:
        name = f"{prefix}.weight_scale"
        st = self.file_of(name)
        values = st.float32(name).reshape(-1)
        if values.size != 1 or not np.isfinite(values[0]) or values[0] == 0:
            raise ModelFileError(f"{st.path}: tensor {name}: {values[:4]}, expected one finite nonzero value")
        # autobitlinear multiplies the output by weight_scale; bitlinear divides by it
        ws = np.float32(values[0])
        return float(ws if self.linear_class == "autobitlinear" else np.float32(1) / ws)

    def projection(self, prefix: str, shape: tuple[int, int]) -> TernaryTensor:
        name = f"{prefix}.weight"
        st = self.file_of(name)
        info = st.tensors[name]
        out_features, in_features = shape
        if info.dtype == "U8":
            if info.shape != (out_features // 4, in_features) or out_features % 4:
                raise ModelFileError(
                    f"{st.path}: tensor {name}: bad packed shape {list(info.shape)}, expected "
                    f"[{out_features}/4, {in_features}] = {[out_features // 4, in_features]}"
                )
            try:
                codes = tf.unpack_hf_rows(st.raw(name))
            except ValueError as exc:
                raise ModelFileError(f"{st.path}: tensor {name}: {exc}") from None
            return TernaryTensor(codes=codes, scale=self.weight_scale(prefix), source_type="U8-packed")
        if info.dtype not in FLOAT_DTYPES:
            raise ModelFileError(
                f"{st.path}: tensor {name}: dtype {info.dtype}, expected U8 (packed) or a float type"
            )
        w = self.floats(name, shape)
        if self.quantized and self.mode == "online":
            codes, scale = tf.ternarize_absmean(
                w
            )  # what transformers' online AutoBitLinear does each forward
        else:
            exact = tf.exact_ternary(w)
            if exact is None:
                codes, scale = tf.ternarize_absmean(w)
                self.ternarised.append(name)
            else:
                codes, scale = exact
            if self.quantized and f"{prefix}.weight_scale" in self.tensors:
                scale = float(np.float32(scale) * np.float32(self.weight_scale(prefix)))
        return TernaryTensor(codes=codes, scale=scale, source_type=info.dtype)

    def load(self) -> ModelWeights:
        embed_name = "model.embed_tokens.weight"
        embed_info = self.file_of(embed_name).tensors[embed_name]
        if len(embed_info.shape) != 2:
            raise ModelFileError(
                f"{self.where}: tensor {embed_name}: bad shape {list(embed_info.shape)}, expected 2-D"
            )
        cfg = self.model_config(vocab_size=embed_info.shape[0])
        d = cfg.d_model
        floats = {
            "token_embd.weight": self.floats(embed_name, (cfg.vocab_size, d)),
            "output_norm.weight": self.floats("model.norm.weight", (d,)),
        }
        if not cfg.tied_embeddings:
            floats["output.weight"] = self.floats("lm_head.weight", (cfg.vocab_size, d))
        norm_dims = cfg.norm_dims()
        proj_shapes = cfg.projection_shapes()
        ternary: dict[str, TernaryTensor] = {}
        for layer in range(cfg.n_layers):
            base = f"model.layers.{layer}"
            found = set()
            for hf_name, gguf_name in LAYER_NORM_NAMES.items():
                name = f"{base}.{hf_name}.weight"
                if name in self.tensors:
                    floats[f"blk.{layer}.{gguf_name}.weight"] = self.floats(name, (norm_dims[gguf_name],))
                    found.add(gguf_name)
            for gguf_name in sorted(set(norm_dims) - found):
                spellings = [f"{base}.{h}.weight" for h, g in LAYER_NORM_NAMES.items() if g == gguf_name]
                raise ModelFileError(f"{self.where}: missing tensor {' or '.join(spellings)}")
            for hf_name, gguf_name in PROJECTION_NAMES.items():
                ternary[f"blk.{layer}.{gguf_name}.weight"] = self.projection(
                    f"{base}.{hf_name}", proj_shapes[gguf_name]
                )
        if self.ternarised:
            shown = ", ".join(self.ternarised[:3]) + (", ..." if len(self.ternarised) > 3 else "")
            self.corrections.append(
                f"{len(self.ternarised)} float projection weights were not ternary: "
                f"ternarised with absmean ({shown})"
            )
        try:
            spec, tok_corrections = spec_from_hf_dir(self.folder)
        except ValueError as exc:
            if isinstance(exc, ModelFileError):
                raise
            raise ModelFileError(f"{self.where}: tokenizer: {exc}") from None
        shown_config = {
            k: v for k, v in list(self.config.items())[:SHOWN_CONFIG_KEYS] if not isinstance(v, dict)
        }
        if self.quantized:
            shown_config["quantization_config"] = json.dumps(
                self.config["quantization_config"], sort_keys=True
            )
        return ModelWeights(
            config=cfg,
            float_tensors=floats,
            ternary=ternary,
            tokenizer=spec,
            source=self.where,
            file_format="hf",
            corrections=[*self.corrections, *tok_corrections],
            metadata=shown_config,
        )


def load_hf_dir(path: str | os.PathLike[str]) -> ModelWeights:
    """Read a Hugging Face BitNet folder (packed uint8 or float master weights) into ModelWeights."""
    return _HFModelReader(str(path)).load()
