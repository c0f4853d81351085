"""GGUF: our reader on files written by the gguf package, our writer read back, and refused files."""

from __future__ import annotations

import struct
from pathlib import Path

import _formats_helpers as h
import gguf
import numpy as np
import pytest
from bitnet_grpc.server.convert import convert_main
from bitnet_grpc.server.file_errors import ModelFileError
from bitnet_grpc.server.gguf_export import GGUFContainerWriter, write_gguf
from bitnet_grpc.server.gguf_file import GGUFFile, ValueType, read_metadata
from bitnet_grpc.server.loader import load_weights
from gguf import GGMLQuantizationType as Q


def _assert_same_floats(loaded, weights, embed_dtype=np.float32) -> None:
    for name, array in weights.float_tensors.items():
        expected = array.astype(embed_dtype).astype(np.float32) if array.ndim == 2 else array
        np.testing.assert_array_equal(loaded.float_tensors[name], expected, err_msg=name)


# ---------------------------------------------------------------------------- files from the gguf package


def _stored_scale(scale: float, proj_type: str) -> float:
    """The scale a file of `proj_type` can hold: f16 block scales, bf16 or f32 values."""
    if proj_type == "F32":
        return scale
    if proj_type == "BF16":
        return float(gguf.quants.dequantize(gguf.quants.quantize(np.float32([scale]), Q.BF16), Q.BF16)[0])
    return float(np.float16(scale))


@pytest.mark.parametrize("proj_type", ["TQ2_0", "TQ1_0", "F16", "BF16", "F32"])
def test_reads_gguf_package_files_exactly(tmp_path: Path, proj_type: str) -> None:
    weights = h.random_weights(seed=1)
    path = h.write_gguf_with_package(tmp_path / "m.gguf", h.GGUFRecipe(weights, proj_type=proj_type))
    loaded = load_weights(path)
    assert loaded.file_format == "gguf" and loaded.weight_format == proj_type
    assert loaded.config == weights.config
    for name, t in weights.ternary.items():
        got = loaded.ternary[name]
        np.testing.assert_array_equal(got.codes, t.codes, err_msg=name)
        assert got.scale == _stored_scale(t.scale, proj_type), name
    _assert_same_floats(loaded, weights)
    assert loaded.tokenizer.tokens == weights.tokenizer.tokens
    assert h.EOT in loaded.tokenizer.stop_ids and loaded.tokenizer.bos_id == h.BOS
    assert not any("absmean" in c or "activation" in c for c in loaded.corrections)


def test_float_tensors_in_other_ggml_types_are_dequantised(tmp_path: Path) -> None:
    weights = h.random_weights(seed=16)
    embd = gguf.quants.quantize(weights.float_tensors["token_embd.weight"], Q.Q8_0)
    recipe = h.GGUFRecipe(weights, replace={"token_embd.weight": (embd, Q.Q8_0)})
    loaded = load_weights(h.write_gguf_with_package(tmp_path / "m.gguf", recipe))
    np.testing.assert_array_equal(
        loaded.float_tensors["token_embd.weight"], gguf.quants.dequantize(embd, Q.Q8_0)
    )


def test_tq_decoding_in_a_file_equals_gguf_dequantize(tmp_path: Path) -> None:
    weights = h.random_weights(seed=2)
    path = h.write_gguf_with_package(tmp_path / "m.gguf", h.GGUFRecipe(weights, proj_type="TQ1_0"))
    loaded = load_weights(path)
    reader = gguf.GGUFReader(path)
    t = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    reference = gguf.quants.dequantize(np.asarray(t.data), Q.TQ1_0)
    got = loaded.ternary["blk.1.ffn_down.weight"]
    np.testing.assert_array_equal(got.codes.astype(np.float32) * np.float32(got.scale), reference)


def test_llama_cpp_style_bitnet_file(tmp_path: Path) -> None:
    """Arch `bitnet` without an activation key, `.scale` tensors, one non-ternary F32 projection,
    one TQ2_0 tensor with mixed block scales: each is handled and reported."""
    weights = h.random_weights(seed=3, arch="bitnet", activation="silu")
    rng = np.random.default_rng(0)
    master = rng.normal(size=h.PROJ_SHAPES["attn_k"]).astype(np.float32)
    mixed = weights.ternary["blk.1.ffn_up.weight"].codes.astype(np.float32)
    mixed[: h.D_FF // 2] *= 0.5
    mixed[h.D_FF // 2 :] *= 0.25
    recipe = h.GGUFRecipe(
        weights,
        proj_type="TQ2_0",
        arch="bitnet",
        activation_key=None,
        replace={
            "blk.0.attn_k.weight": (master, None),
            "blk.1.ffn_up.weight": (gguf.quants.quantize(mixed, Q.TQ2_0), Q.TQ2_0),
        },
        extra={"blk.0.attn_q.scale": np.array([2.0], np.float32)},
    )
    loaded = load_weights(h.write_gguf_with_package(tmp_path / "m.gguf", recipe))
    assert loaded.config.activation == "silu"
    assert any("activation" in c and "silu" in c for c in loaded.corrections)
    q = weights.ternary["blk.0.attn_q.weight"]
    assert loaded.ternary["blk.0.attn_q.weight"].scale == float(np.float16(q.scale)) * 2.0
    k = loaded.ternary["blk.0.attn_k.weight"]
    assert k.source_type == "F32" and k.scale == pytest.approx(np.abs(master).mean(), rel=1e-6)
    assert any("ternarised with absmean" in c and "blk.0.attn_k.weight" in c for c in loaded.corrections)
    assert any(c.startswith("blk.1.ffn_up.weight: TQ2_0 block scales differ") for c in loaded.corrections)


def test_explicit_activation_key_wins(tmp_path: Path) -> None:
    weights = h.random_weights(seed=4, arch="bitnet", activation="relu2")
    recipe = h.GGUFRecipe(weights, arch="bitnet", activation_key="relu2")
    loaded = load_weights(h.write_gguf_with_package(tmp_path / "m.gguf", recipe))
    assert loaded.config.activation == "relu2"
    assert not any(c.startswith("activation") for c in loaded.corrections)


def test_untied_output(tmp_path: Path) -> None:
    weights = h.random_weights(seed=5, tied=False)
    loaded = load_weights(h.write_gguf_with_package(tmp_path / "m.gguf", h.GGUFRecipe(weights)))
    assert not loaded.config.tied_embeddings
    np.testing.assert_array_equal(
        loaded.float_tensors["output.weight"], weights.float_tensors["output.weight"]
    )


def test_read_metadata_gives_plain_values(tmp_path: Path) -> None:
    path = h.write_gguf_with_package(tmp_path / "m.gguf", h.GGUFRecipe(h.random_weights()))
    meta = read_metadata(path)
    assert meta["general.architecture"] == "bitnet-b1.58"
    assert meta["bitnet-b1.58.block_count"] == h.N_LAYERS and type(meta["bitnet-b1.58.block_count"]) is int
    assert (
        meta["tokenizer.ggml.tokens"][-1] == "<|eot_id|>" and type(meta["tokenizer.ggml.token_type"]) is list
    )
    assert meta["bitnet-b1.58.rope.freq_base"] == 500000.0


# ---------------------------------------------------------------------------- our writer


@pytest.mark.parametrize("weight_type", ["i2_s", "tq2_0", "tq1_0", "f16", "f32"])
def test_writer_round_trip_is_exact(tmp_path: Path, weight_type: str) -> None:
    weights = h.random_weights(seed=6)
    path = tmp_path / f"m-{weight_type}.gguf"
    write_gguf(weights, path, weight_type)
    loaded = load_weights(path)
    assert loaded.config == weights.config
    assert loaded.weight_format == weight_type.upper()
    for name, t in weights.ternary.items():
        got = loaded.ternary[name]
        np.testing.assert_array_equal(got.codes, t.codes, err_msg=name)
        exact = t.scale if weight_type in ("i2_s", "f32") else float(np.float16(t.scale))
        assert got.scale == exact, name
    _assert_same_floats(loaded, weights, np.float32 if weight_type == "f32" else np.float16)
    tok, ref = loaded.tokenizer, weights.tokenizer
    assert (tok.tokens, tok.merges, tok.pre, tok.bos_id, tok.eos_id) == (
        ref.tokens,
        ref.merges,
        ref.pre,
        ref.bos_id,
        ref.eos_id,
    )
    assert tok.stop_ids == ref.stop_ids and tok.chat_template == ref.chat_template
    assert not loaded.corrections


def test_writer_output_reads_in_the_gguf_package(tmp_path: Path) -> None:
    weights = h.random_weights(seed=7)
    path = tmp_path / "m.gguf"
    write_gguf(weights, path, "tq2_0")
    reader = gguf.GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    assert len(by_name) == 2 + h.N_LAYERS * 11
    t = weights.ternary["blk.0.ffn_gate.weight"]
    stored = by_name["blk.0.ffn_gate.weight"]
    assert stored.tensor_type == Q.TQ2_0 and list(stored.shape) == [h.D_MODEL, h.D_FF]
    np.testing.assert_array_equal(
        gguf.quants.dequantize(np.asarray(stored.data), Q.TQ2_0),
        t.codes.astype(np.float32) * np.float32(np.float16(t.scale)),
    )
    field = reader.get_field("bitnet-b1.58.hidden_activation")
    assert field.contents() == "relu2"
    assert reader.get_field("tokenizer.ggml.eot_token_id").contents() == h.EOT


def test_i2s_and_tq2_0_files_of_the_same_weights_give_identical_codes(tmp_path: Path) -> None:
    weights = h.random_weights(seed=8)
    write_gguf(weights, tmp_path / "a.gguf", "i2_s")
    write_gguf(weights, tmp_path / "b.gguf", "tq2_0")
    a, b = load_weights(tmp_path / "a.gguf"), load_weights(tmp_path / "b.gguf")
    for name in weights.ternary:
        np.testing.assert_array_equal(a.ternary[name].codes, b.ternary[name].codes)
    assert GGUFFile(tmp_path / "a.gguf").tensors["blk.0.attn_q.weight"].type_name == "I2_S"


def test_writer_refuses_rows_tq_cannot_hold(tmp_path: Path) -> None:
    weights = h.random_weights(seed=9)
    t = weights.ternary["blk.0.attn_q.weight"]
    t.codes = t.codes[:, :128]
    with pytest.raises(ValueError, match=r"blk\.0\.attn_q\.weight \[256, 128\]: TQ2_0 needs rows"):
        write_gguf(weights, tmp_path / "x.gguf", "tq2_0")
    assert not (tmp_path / "x.gguf").exists()


# ---------------------------------------------------------------------------- refused files


@pytest.fixture
def good_file(tmp_path: Path) -> Path:
    return h.write_gguf_with_package(tmp_path / "good.gguf", h.GGUFRecipe(h.random_weights(seed=10)))


def test_refuses_tl2_type(tmp_path: Path) -> None:
    weights = h.random_weights(seed=11)
    # bitnet.cpp's TL2 is id 39, which the gguf package knows as MXFP4 (same id, reused upstream)
    bogus = np.zeros((h.D_FF, h.D_MODEL // 32 * 17), np.uint8)
    recipe = h.GGUFRecipe(weights, replace={"blk.0.ffn_up.weight": (bogus, Q.MXFP4)})
    path = h.write_gguf_with_package(tmp_path / "tl2.gguf", recipe)
    with pytest.raises(
        ModelFileError, match=r"tl2\.gguf: tensor blk\.0\.ffn_up\.weight .*TL2 .*not supported"
    ):
        load_weights(path)


def test_refuses_truncated_file(tmp_path: Path, good_file: Path) -> None:
    data = good_file.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(
        ModelFileError, match=r"cut\.gguf: tensor blk\.1\.ffn_\w+\.weight: data ends at .*past the end"
    ):
        load_weights(cut)
    for size in (200, 1500):  # inside the arch keys, inside the token list
        cut.write_bytes(data[:size])
        with pytest.raises(
            ModelFileError, match=rf"cut\.gguf: truncated GGUF file: .* file has {size} bytes"
        ):
            load_weights(cut)
    cut.write_bytes(data[:10])
    with pytest.raises(ModelFileError, match="truncated GGUF file: 10 bytes"):
        load_weights(cut)


def test_refuses_wrong_magic_and_version(tmp_path: Path, good_file: Path) -> None:
    data = bytearray(good_file.read_bytes())
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + data[4:])
    with pytest.raises(ModelFileError, match=r"bad\.gguf: not a GGUF file: magic b'GGML', expected b'GGUF'"):
        GGUFFile(bad)
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        load_weights(bad)
    bad.write_bytes(data[:4] + struct.pack("<I", 7) + data[8:])
    with pytest.raises(ModelFileError, match=r"bad\.gguf: GGUF version 7, expected one of \(2, 3\)"):
        load_weights(bad)


def test_refuses_missing_tensor(tmp_path: Path) -> None:
    recipe = h.GGUFRecipe(h.random_weights(seed=12), skip={"blk.1.ffn_down.weight"})
    path = h.write_gguf_with_package(tmp_path / "m.gguf", recipe)
    with pytest.raises(ModelFileError, match=r"m\.gguf: missing tensor blk\.1\.ffn_down\.weight"):
        load_weights(path)


def test_refuses_bad_shape(tmp_path: Path) -> None:
    weights = h.random_weights(seed=13)
    wrong = np.ones((h.D_FF, 2 * h.D_MODEL), np.float32)
    recipe = h.GGUFRecipe(weights, replace={"blk.0.ffn_gate.weight": (wrong, None)})
    path = h.write_gguf_with_package(tmp_path / "m.gguf", recipe)
    with pytest.raises(
        ModelFileError,
        match=r"tensor blk\.0\.ffn_gate\.weight: bad shape \[512, 512\], expected \[512, 256\]",
    ):
        load_weights(path)


def test_refuses_unknown_architecture(tmp_path: Path) -> None:
    recipe = h.GGUFRecipe(h.random_weights(seed=14), arch="llama")
    path = h.write_gguf_with_package(tmp_path / "m.gguf", recipe)
    with pytest.raises(ModelFileError, match="architecture 'llama' is not supported"):
        load_weights(path)


def test_last_i2s_tensor_may_lack_its_padding_but_not_its_scale(tmp_path: Path) -> None:
    weights = h.random_weights(seed=15)
    path = tmp_path / "m.gguf"
    write_gguf(weights, path, "i2_s")  # blk.1.ffn_down.weight is last: codes, f32 scale, 28 bytes of padding
    data = path.read_bytes()
    path.write_bytes(data[:-28])
    loaded = load_weights(path)
    assert loaded.ternary["blk.1.ffn_down.weight"].scale == weights.ternary["blk.1.ffn_down.weight"].scale
    path.write_bytes(data[:-29])
    with pytest.raises(
        ModelFileError, match=r"tensor blk\.1\.ffn_down\.weight: data ends at .* past the end"
    ):
        load_weights(path)


def _rewrite_without(src: Path, dst: Path, drop: set[str], replace: dict | None = None) -> Path:
    """Copy a GGUF file key by key and tensor by tensor, leaving keys out (files made like the official
    2B4T one, which lacks several keys)."""
    f = GGUFFile(src)
    out = GGUFContainerWriter()
    for key, value in f.metadata.items():
        if key in drop:
            continue
        value = (replace or {}).get(key, value)
        vtype = ValueType(f.value_types[key])
        out.add(key, value, None if vtype == ValueType.ARRAY else vtype)
    for name, info in f.tensors.items():
        out.add_tensor(name, info.shape, info.type_id, lambda name=name: np.array(f.tensor_bytes(name)))
    out.write(dst)
    return dst


def test_official_style_file_gets_its_corrections_and_convert_writes_them(tmp_path: Path, capsys) -> None:
    weights = h.random_weights(seed=17)
    write_gguf(weights, tmp_path / "full.gguf", "i2_s")
    drop = {"bitnet-b1.58.hidden_activation", "tokenizer.ggml.pre", "tokenizer.ggml.eot_token_id"}
    official = _rewrite_without(
        tmp_path / "full.gguf",
        tmp_path / "official.gguf",
        drop,
        {"tokenizer.chat_template": "{{ messages }}"},
    )
    loaded = load_weights(official)
    assert loaded.config.activation == "relu2"
    assert loaded.tokenizer.pre == "llama-bpe" and h.EOT in loaded.tokenizer.stop_ids
    text = "\n".join(loaded.corrections)
    assert "activation: no bitnet-b1.58.hidden_activation key; using relu2" in text
    assert "tokenizer.ggml.pre is missing" in text and "<|eot_id|>" in text
    for name, t in weights.ternary.items():
        np.testing.assert_array_equal(loaded.ternary[name].codes, t.codes)

    assert convert_main([str(official), str(tmp_path / "fixed.gguf"), "--type", "tq2_0"]) == 0
    assert "loader: activation" in capsys.readouterr().out
    meta = read_metadata(tmp_path / "fixed.gguf")
    assert meta["bitnet-b1.58.hidden_activation"] == "relu2" and meta["tokenizer.ggml.pre"] == "llama-bpe"
    assert meta["tokenizer.ggml.eot_token_id"] == h.EOT
    assert meta["tokenizer.chat_template"] == loaded.tokenizer.chat_template
    fixed = load_weights(tmp_path / "fixed.gguf")
    assert not fixed.corrections
