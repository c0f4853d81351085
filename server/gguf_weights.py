"""A BitNet GGUF file -> ModelWeights.

Dispatch is on each tensor's ggml type id, never on `general.file_type` (BITNET.md section 3). Ternary
projections become int8 codes plus one scale; float tensors become float32. Whatever had to be decided
or repaired on the way (activation, block scales, float weights ternarised) goes into `corrections`.
"""

from __future__ import annotations

import os
from typing import Any

import gguf
import numpy as np

from . import ternary_formats as tf
from .file_errors import ModelFileError
from .gguf_file import (
    REFUSED_TYPE_NAMES,
    TYPE_BF16,
    TYPE_F16,
    TYPE_F32,
    TYPE_I2_S,
    TYPE_TQ1_0,
    TYPE_TQ2_0,
    GGUFFile,
    GGUFTensorInfo,
)
from .tokenizer import spec_from_gguf_metadata
from .weights import LAYER_NORMS, TERNARY_PROJECTIONS, ModelConfig, ModelWeights, TernaryTensor

SUPPORTED_ARCHS = ("bitnet", "bitnet-b1.58", "bitnet-25")
# The 2B4T family squares a ReLU; the 1bitLLM checkpoints converted by llama.cpp as `bitnet` use SiLU.
DEFAULT_ACTIVATION = {"bitnet": "silu", "bitnet-b1.58": "relu2", "bitnet-25": "relu2"}
ACTIVATION_ALIASES = {
    "relu2": "relu2",
    "relu_squared": "relu2",
    "squared_relu": "relu2",
    "relu²": "relu2",
    "silu": "silu",
    "swish": "silu",
    "swiglu": "silu",
}
ACTIVATION_KEYS = ("hidden_activation", "hidden_act", "activation")
FLOAT_TYPES = (TYPE_F32, TYPE_F16, TYPE_BF16)
TERNARY_TYPES = (TYPE_I2_S, TYPE_TQ2_0, TYPE_TQ1_0)
SHORT_LIST = 16  # metadata lists longer than this are summarised, not copied into ModelWeights.metadata


def normalize_activation(value: Any, where: str) -> str:
    name = str(value).strip().lower()
    if name not in ACTIVATION_ALIASES:
        raise ModelFileError(f"{where}: activation {value!r} is not supported (expected relu2 or silu)")
    return ACTIVATION_ALIASES[name]


class _GGUFModelReader:
    def __init__(self, path: str) -> None:
        self.file = GGUFFile(path)
        self.path = self.file.path
        self.meta = self.file.metadata
        self.corrections: list[str] = []
        self.ternarised: list[str] = []
        arch = self.file.architecture
        if arch not in SUPPORTED_ARCHS:
            raise ModelFileError(
                f"{self.path}: architecture {arch!r} is not supported "
                f"(expected one of {', '.join(SUPPORTED_ARCHS)})"
            )
        self.arch = arch

    # -- metadata ---------------------------------------------------------------------------------

    def key(self, name: str, kind: type, default: Any = None, required: bool = True) -> Any:
        full = f"{self.arch}.{name}"
        if full not in self.meta:
            if required:
                raise ModelFileError(f"{self.path}: missing metadata key {full}")
            return default
        value = self.meta[full]
        if isinstance(value, list):  # per-layer arrays (e.g. head_count_kv): must be uniform here
            if not value or any(v != value[0] for v in value):
                raise ModelFileError(f"{self.path}: {full} varies per layer ({value[:8]}...), not supported")
            value = value[0]
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ModelFileError(f"{self.path}: {full} is {value!r}, expected {kind.__name__}")

    def activation(self) -> str:
        for suffix in ACTIVATION_KEYS:
            full = f"{self.arch}.{suffix}"
            if full in self.meta:
                return normalize_activation(self.meta[full], f"{self.path}: {full}")
        act = DEFAULT_ACTIVATION[self.arch]
        why = "squared ReLU of the 2B4T family" if act == "relu2" else "SiLU of the 1bitLLM checkpoints"
        self.corrections.append(
            f"activation: no {self.arch}.hidden_activation key; using {act} (the {why}, by architecture)"
        )
        return act

    def config(self, vocab_size: int) -> ModelConfig:
        d_model = self.key("embedding_length", int)
        n_heads = self.key("attention.head_count", int)
        n_kv_heads = self.key("attention.head_count_kv", int, n_heads, required=False)
        if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads:
            raise ModelFileError(
                f"{self.path}: {n_heads} attention heads cannot share {n_kv_heads} KV heads evenly"
            )
        if f"{self.arch}.attention.key_length" in self.meta:
            head_dim = self.key("attention.key_length", int)
        elif d_model % n_heads:
            raise ModelFileError(
                f"{self.path}: embedding_length {d_model} is not divisible by {n_heads} heads"
            )
        else:
            head_dim = d_model // n_heads
        value_dim = self.key("attention.value_length", int, head_dim, required=False)
        rope_dims = self.key("rope.dimension_count", int, head_dim, required=False)
        if value_dim != head_dim or rope_dims != head_dim:
            raise ModelFileError(
                f"{self.path}: key length {head_dim}, value length {value_dim}, rope dimensions {rope_dims}: "
                "expected all equal (rotary over the whole head)"
            )
        scaling = self.meta.get(f"{self.arch}.rope.scaling.type", "none")
        factor = self.meta.get(f"{self.arch}.rope.scaling.factor", 1.0)
        if scaling not in ("none", None) and factor != 1.0:
            raise ModelFileError(f"{self.path}: rope scaling {scaling!r} (factor {factor}) is not supported")
        eps = self.key("attention.layer_norm_rms_epsilon", float, None, required=False)
        if eps is None:
            eps = 1e-5
            self.corrections.append(f"rms eps: no {self.arch}.attention.layer_norm_rms_epsilon; using 1e-5")
        theta = self.key("rope.freq_base", float, None, required=False)
        if theta is None:
            theta = 10000.0
            self.corrections.append(f"rope theta: no {self.arch}.rope.freq_base; using llama.cpp's 10000")
        declared_vocab = self.key("vocab_size", int, vocab_size, required=False)
        if declared_vocab != vocab_size:
            raise ModelFileError(
                f"{self.path}: {self.arch}.vocab_size is {declared_vocab} but token_embd.weight has "
                f"{vocab_size} rows"
            )
        return ModelConfig(
            arch=self.arch,
            n_layers=self.key("block_count", int),
            d_model=d_model,
            d_ff=self.key("feed_forward_length", int),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            vocab_size=vocab_size,
            context_length=self.key("context_length", int),
            rope_theta=theta,
            rms_eps=eps,
            activation=self.activation(),
            tied_embeddings="output.weight" not in self.file.tensors,
        )

    # -- tensors ----------------------------------------------------------------------------------

    def info(self, name: str, shape: tuple[int, ...]) -> GGUFTensorInfo:
        info = self.file.tensor_info(name)
        if info.shape != shape:
            raise ModelFileError(
                f"{self.path}: tensor {name}: bad shape {list(info.shape)}, expected {list(shape)} "
                "(numpy order: [out, in])"
            )
        return info

    def _fail(self, info: GGUFTensorInfo, reason: str) -> ModelFileError:
        return ModelFileError(
            f"{self.path}: tensor {info.name} ({info.type_name}, shape {list(info.shape)}): {reason}"
        )

    def _refuse_type(self, info: GGUFTensorInfo, supported: str) -> ModelFileError:
        if info.type_id in REFUSED_TYPE_NAMES:
            why = "its layout is tied to bitnet.cpp's shape-specific kernels; convert to I2_S or TQ2_0"
        else:
            why = f"supported here: {supported}"
        return self._fail(info, f"type {info.type_name} (id {info.type_id}) is not supported: {why}")

    def float_tensor(self, info: GGUFTensorInfo) -> np.ndarray:
        """Any float-like tensor as float32 (norms, embeddings, an untied output, `.scale` values)."""
        raw = self.file.tensor_bytes(info.name) if info.nbytes is not None else None
        if raw is None or info.type_id in REFUSED_TYPE_NAMES:
            raise self._refuse_type(info, "F32, F16, BF16 and the ggml types the gguf package dequantises")
        try:
            if info.type_id == TYPE_F32:
                values = raw.view("<f4")
            elif info.type_id == TYPE_F16:
                values = raw.view("<f2")
            elif info.type_id == TYPE_BF16:
                values = tf.bf16_to_f32(raw)
            elif info.type_id == TYPE_I2_S:
                codes, scale = tf.decode_i2s(raw, info.shape)
                values = codes.astype(np.float32) * np.float32(scale)
            else:
                qtype = gguf.GGMLQuantizationType(info.type_id)
                values = gguf.quants.dequantize(np.asarray(raw).reshape(info.shape[:-1] + (-1,)), qtype)
        except (ValueError, NotImplementedError) as exc:
            raise self._fail(info, str(exc)) from None
        out = np.array(values, dtype=np.float32).reshape(info.shape)
        if not np.all(np.isfinite(out)):
            raise self._fail(info, "contains NaN or infinite values")
        return out

    def ternary_tensor(self, info: GGUFTensorInfo) -> TernaryTensor:
        shape = info.shape
        try:
            if info.type_id == TYPE_I2_S:
                codes, scale = tf.decode_i2s(self.file.tensor_bytes(info.name), shape)
            elif info.type_id in (TYPE_TQ2_0, TYPE_TQ1_0):
                decode = tf.decode_tq2_0 if info.type_id == TYPE_TQ2_0 else tf.decode_tq1_0
                merged = tf.merge_block_scales(*decode(self.file.tensor_bytes(info.name), shape))
                codes, scale = merged.codes, merged.scale
                if merged.note:
                    self.corrections.append(f"{info.name}: {info.type_name} {merged.note}")
            elif info.type_id in FLOAT_TYPES:
                values = self.float_tensor(info)
                exact = tf.exact_ternary(values)
                if exact is None:
                    codes, scale = tf.ternarize_absmean(values)
                    self.ternarised.append(info.name)
                else:
                    codes, scale = exact
            else:
                raise self._refuse_type(info, "I2_S, TQ2_0, TQ1_0, F32, F16, BF16")
        except ValueError as exc:
            if isinstance(exc, ModelFileError):
                raise
            raise self._fail(info, str(exc)) from None
        scale_name = info.name.removesuffix(".weight") + ".scale"
        if scale_name in self.file.tensors:
            factor = self.float_tensor(self.file.tensors[scale_name])
            if factor.size != 1:
                raise ModelFileError(
                    f"{self.path}: tensor {scale_name}: bad shape {list(factor.shape)}, expected one value"
                )
            scale = float(np.float32(scale) * np.float32(factor.reshape(-1)[0]))
        return TernaryTensor(codes=codes, scale=scale, source_type=info.type_name)

    def load(self) -> ModelWeights:
        embd = self.file.tensor_info("token_embd.weight")
        if len(embd.shape) != 2:
            raise ModelFileError(
                f"{self.path}: tensor token_embd.weight: bad shape {list(embd.shape)}, expected 2-D"
            )
        cfg = self.config(vocab_size=embd.shape[0])
        d = cfg.d_model
        floats: dict[str, np.ndarray] = {}
        floats["token_embd.weight"] = self.float_tensor(self.info("token_embd.weight", (cfg.vocab_size, d)))
        floats["output_norm.weight"] = self.float_tensor(self.info("output_norm.weight", (d,)))
        if not cfg.tied_embeddings:
            floats["output.weight"] = self.float_tensor(self.info("output.weight", (cfg.vocab_size, d)))
        norm_dims = cfg.norm_dims()
        proj_shapes = cfg.projection_shapes()
        ternary: dict[str, TernaryTensor] = {}
        expected = set(floats)
        for layer in range(cfg.n_layers):
            for norm in LAYER_NORMS:
                name = f"blk.{layer}.{norm}.weight"
                floats[name] = self.float_tensor(self.info(name, (norm_dims[norm],)))
                expected.add(name)
            for proj in TERNARY_PROJECTIONS:
                name = f"blk.{layer}.{proj}.weight"
                ternary[name] = self.ternary_tensor(self.info(name, proj_shapes[proj]))
                expected.update((name, f"blk.{layer}.{proj}.scale"))
        if self.ternarised:
            shown = ", ".join(self.ternarised[:3]) + (", ..." if len(self.ternarised) > 3 else "")
            self.corrections.append(
                f"{len(self.ternarised)} float projection tensors were not ternary: "
                f"ternarised with absmean ({shown})"
            )
        unused = [n for n in self.file.tensors if n not in expected]
        if "rope_freqs.weight" in unused:
            raise ModelFileError(
                f"{self.path}: tensor rope_freqs.weight (rotary frequency factors) is not supported"
            )
        if unused:
            self.corrections.append(f"ignored {len(unused)} unused tensors: {', '.join(unused[:5])}")
        try:
            spec, tok_corrections = spec_from_gguf_metadata(self.meta)
        except ValueError as exc:
            raise ModelFileError(f"{self.path}: tokenizer metadata: {exc}") from None
        return ModelWeights(
            config=cfg,
            float_tensors=floats,
            ternary=ternary,
            tokenizer=spec,
            source=self.path,
            file_format="gguf",
            corrections=[*self.corrections, *tok_corrections],
            metadata=shown_metadata(self.meta),
        )


def shown_metadata(meta: dict[str, Any]) -> dict[str, object]:
    """Metadata worth keeping beside the weights: scalars and short lists (vocabularies are summarised)."""
    out: dict[str, object] = {}
    for key, value in meta.items():
        if isinstance(value, list) and len(value) > SHORT_LIST:
            out[key] = f"[{len(value)} items]"
        else:
            out[key] = value
    return out


def load_gguf(path: str | os.PathLike[str]) -> ModelWeights:
    """Read a BitNet GGUF file (I2_S, TQ2_0, TQ1_0 or float projections) into ModelWeights."""
    return _GGUFModelReader(str(path)).load()
