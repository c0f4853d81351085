"""Hugging Face folders: packed uint8 and float master weights, both linear_class conventions, both
naming schemes, conversion to GGUF, `inspect`, and refused folders."""

from __future__ import annotations

import json
from pathlib import Path

import _formats_helpers as h
import numpy as np
import pytest
from bitnet_grpc.server import ternary_formats as tf
from bitnet_grpc.server.convert import convert_main
from bitnet_grpc.server.file_errors import ModelFileError
from bitnet_grpc.server.inspect_model import inspect_main
from bitnet_grpc.server.loader import load_weights


def _bf16(x: np.ndarray) -> np.ndarray:
    """The value a float32 array takes once stored as bfloat16 by the test writer (truncation)."""
    return (np.asarray(x, np.float32).view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)


def _masters_and_ternary(seed: int, dtype: str = "bf16"):
    """Float master weights and the ternary weights the absmean rule makes of them (as stored)."""
    weights = h.random_weights(seed=seed)
    rng = np.random.default_rng(seed + 100)
    masters = {}
    for name in weights.ternary:
        master = rng.normal(0, 0.1, h.PROJ_SHAPES[name.split(".")[2]]).astype(np.float32)
        stored = _bf16(master) if dtype == "bf16" else master.astype(np.float16).astype(np.float32)
        masters[name] = master
        codes, scale = tf.ternarize_absmean(stored)
        weights.ternary[name].codes, weights.ternary[name].scale = codes, scale
    return weights, masters


def test_packed_and_float_master_give_identical_codes_and_scales(tmp_path: Path) -> None:
    weights, masters = _masters_and_ternary(seed=1)
    packed = h.write_hf_folder(tmp_path / "packed", weights, storage="packed", linear_class="autobitlinear")
    online = h.write_hf_folder(
        tmp_path / "online",
        weights,
        storage="master",
        masters=masters,
        linear_class="autobitlinear",
        mode="online",
    )
    a, b = load_weights(packed), load_weights(online)
    assert a.file_format == b.file_format == "hf"
    assert a.weight_format == "U8-packed" and b.weight_format == "BF16"
    assert a.config == b.config and a.config.arch == "bitnet-b1.58" and a.config.activation == "relu2"
    for name, t in weights.ternary.items():
        np.testing.assert_array_equal(a.ternary[name].codes, t.codes, err_msg=name)
        np.testing.assert_array_equal(b.ternary[name].codes, t.codes, err_msg=name)
        assert a.ternary[name].scale == b.ternary[name].scale == t.scale, name
    for name, array in weights.float_tensors.items():
        np.testing.assert_array_equal(a.float_tensors[name], _bf16(array), err_msg=name)
        np.testing.assert_array_equal(b.float_tensors[name], _bf16(array), err_msg=name)
    assert not a.corrections and not b.corrections


def test_bitlinear_divides_by_weight_scale(tmp_path: Path) -> None:
    weights, _ = _masters_and_ternary(seed=2)
    folder = h.write_hf_folder(tmp_path / "m", weights, storage="packed", linear_class="bitlinear")
    stored = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert stored["linear_class"] == "bitlinear"
    loaded = load_weights(folder)
    for name, t in weights.ternary.items():
        np.testing.assert_array_equal(loaded.ternary[name].codes, t.codes)
        # the file holds float32(1 / s); loading divides by it
        assert loaded.ternary[name].scale == pytest.approx(t.scale, rel=1e-6)
        assert loaded.ternary[name].scale == float(np.float32(1) / (np.float32(1) / np.float32(t.scale)))


def test_1bitllm_names_silu_and_float16_masters_without_qconfig(tmp_path: Path) -> None:
    weights, masters = _masters_and_ternary(seed=3, dtype="f16")
    folder = h.write_hf_folder(
        tmp_path / "m",
        weights,
        storage="master",
        masters=masters,
        linear_class=None,
        old_names=True,
        hidden_act="silu",
        float_dtype="f16",
    )
    loaded = load_weights(folder)
    assert loaded.config.arch == "bitnet" and loaded.config.activation == "silu"
    assert loaded.weight_format == "F16"
    for name, t in weights.ternary.items():
        np.testing.assert_array_equal(loaded.ternary[name].codes, t.codes)
        assert loaded.ternary[name].scale == t.scale
    np.testing.assert_array_equal(
        loaded.float_tensors["blk.1.attn_sub_norm.weight"],
        weights.float_tensors["blk.1.attn_sub_norm.weight"].astype(np.float16).astype(np.float32),
    )
    assert any("14 float projection weights were not ternary" in c for c in loaded.corrections)


def test_already_ternary_floats_without_qconfig_stay_exact(tmp_path: Path) -> None:
    weights = h.random_weights(seed=4)
    dense = {n: t.codes.astype(np.float32) * np.float32(t.scale) for n, t in weights.ternary.items()}
    folder = h.write_hf_folder(
        tmp_path / "m", weights, storage="master", masters=dense, linear_class=None, float_dtype="f32"
    )
    loaded = load_weights(folder)
    for name, t in weights.ternary.items():
        np.testing.assert_array_equal(loaded.ternary[name].codes, t.codes)
        assert loaded.ternary[name].scale == t.scale
    assert not loaded.corrections


def test_untied_lm_head(tmp_path: Path) -> None:
    weights = h.random_weights(seed=5, tied=False)
    loaded = load_weights(h.write_hf_folder(tmp_path / "m", weights))
    assert not loaded.config.tied_embeddings
    np.testing.assert_array_equal(
        loaded.float_tensors["output.weight"], _bf16(weights.float_tensors["output.weight"])
    )


@pytest.mark.parametrize("weight_type", ["i2_s", "tq2_0"])
def test_convert_then_load_gives_the_same_model(tmp_path: Path, weight_type: str, capsys) -> None:
    weights, _ = _masters_and_ternary(seed=6)
    folder = h.write_hf_folder(tmp_path / "hf", weights)
    out = tmp_path / "out.gguf"
    assert convert_main([str(folder), str(out), "--type", weight_type]) == 0
    assert "wrote" in capsys.readouterr().out
    hf, gg = load_weights(folder), load_weights(out)
    assert gg.config == hf.config
    for name, t in hf.ternary.items():
        np.testing.assert_array_equal(gg.ternary[name].codes, t.codes)
        expected = t.scale if weight_type == "i2_s" else float(np.float16(t.scale))
        assert gg.ternary[name].scale == expected
    np.testing.assert_array_equal(
        gg.float_tensors["blk.0.ffn_sub_norm.weight"], hf.float_tensors["blk.0.ffn_sub_norm.weight"]
    )
    assert gg.tokenizer.tokens == hf.tokenizer.tokens and gg.tokenizer.merges == hf.tokenizer.merges
    assert (
        gg.tokenizer.stop_ids == hf.tokenizer.stop_ids
        and gg.tokenizer.chat_template == hf.tokenizer.chat_template
    )
    assert convert_main([str(folder), str(out)]) == 2  # exists, no --force
    assert "exists" in capsys.readouterr().err


def test_inspect_describes_gguf_and_hf(tmp_path: Path, capsys) -> None:
    weights, _ = _masters_and_ternary(seed=7)
    folder = h.write_hf_folder(tmp_path / "hf", weights)
    assert convert_main([str(folder), str(tmp_path / "m.gguf"), "--type", "tq1_0"]) == 0
    capsys.readouterr()
    assert inspect_main([str(tmp_path / "m.gguf"), "--tensors"]) == 0
    text = capsys.readouterr().out
    assert "tensors: 24 (" in text and all(part in text for part in ("F32 9", "TQ1_0 14", "F16 1"))
    assert "architecture: bitnet-b1.58" in text and "activation: relu2" in text
    assert "blk.1.ffn_down.weight" in text and "chat template (1 lines):" in text
    assert inspect_main([str(folder)]) == 0
    text = capsys.readouterr().out
    assert "Hugging Face folder" in text and "U8 14" in text and "ternary storage: U8-packed" in text
    (tmp_path / "junk.bin").write_bytes(b"0123456789")
    assert inspect_main([str(tmp_path / "junk.bin")]) == 1
    assert "not a GGUF file" in capsys.readouterr().err


# ---------------------------------------------------------------------------- refused folders


def test_refuses_missing_weight_scale(tmp_path: Path) -> None:
    folder = h.write_hf_folder(
        tmp_path / "m", h.random_weights(seed=8), drop=("model.layers.1.mlp.up_proj.weight_scale",)
    )
    with pytest.raises(ModelFileError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight_scale"):
        load_weights(folder)


def test_refuses_bad_packed_shape(tmp_path: Path) -> None:
    bad = {"model.layers.0.self_attn.k_proj.weight": np.zeros((64, h.D_MODEL), np.uint8)}
    folder = h.write_hf_folder(tmp_path / "m", h.random_weights(seed=9), override=bad)
    with pytest.raises(
        ModelFileError, match=r"k_proj\.weight: bad packed shape \[64, 256\], expected \[128/4, 256\]"
    ):
        load_weights(folder)


def test_refuses_missing_sub_norm_naming_both_spellings(tmp_path: Path) -> None:
    folder = h.write_hf_folder(
        tmp_path / "m", h.random_weights(seed=10), drop=("model.layers.0.mlp.ffn_sub_norm.weight",)
    )
    with pytest.raises(
        ModelFileError, match=r"missing tensor .*mlp\.ffn_sub_norm\.weight or .*mlp\.ffn_layernorm"
    ):
        load_weights(folder)


def test_refuses_corrupt_packed_codes(tmp_path: Path) -> None:
    bad = {"model.layers.0.mlp.down_proj.weight": np.full((h.D_MODEL // 4, h.D_FF), 0xFF, np.uint8)}
    folder = h.write_hf_folder(tmp_path / "m", h.random_weights(seed=11), override=bad)
    with pytest.raises(ModelFileError, match=r"down_proj\.weight: packed uint8 code 3 found"):
        load_weights(folder)


def test_refuses_folder_without_config_and_truncated_safetensors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="without config.json"):
        load_weights(tmp_path / "empty")
    folder = h.write_hf_folder(tmp_path / "m", h.random_weights(seed=12))
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(
        ModelFileError, match=r"model-00002-of-00002\.safetensors: tensor .* past the end of the file"
    ):
        load_weights(folder)
