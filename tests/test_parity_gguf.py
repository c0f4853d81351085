"""Our engine on GGUF files against llama.cpp and transformers (goldens in tests/fixtures/parity, made by
tools/make_fixtures.py; neither oracle is needed here).

The twin GGUFs hold model A's ternary values as a 1bitLLM-like SiLU model (arch `bitnet`), which is what
llama.cpp's bitnet graph runs. llama.cpp quantises activations per 256-element block (Q8_K) where BitNet
(and we) quantise per token, so against llama.cpp the bar is lower: >= 85% argmax agreement and every
disagreement a near-tie. Against transformers on the same twin the math is ours exactly, so the HF bar
applies. Loads of the same weights from different files must give identical ternary values.
"""

from __future__ import annotations

import numpy as np
import pytest
from _parity_helpers import (
    FIXTURES,
    compare_greedy,
    compare_teacher_forced,
    engine_decode_loop,
    engine_teacher_forced,
    load_golden,
    numpy_forward,
)
from bitnet_grpc.server.loader import load_weights
from bitnet_grpc.server.model import Model

TWINS = {"TQ2_0": "twin_tq2_0.gguf", "TQ1_0": "twin_tq1_0.gguf"}
LLAMA_MIN_AGREE = 0.85
HF_MIN_AGREE, HF_MAX_MEDIAN = 0.96, 1e-3


@pytest.fixture(scope="module")
def loaded():
    files = {**TWINS, "I2_S": "a_i2_s.gguf"}
    weights = {kind: load_weights(FIXTURES / name) for kind, name in files.items()}
    weights["hf"] = load_weights(FIXTURES / "a_packed")
    return weights


def _model(weights, n_slots: int = 1) -> Model:
    return Model(weights, n_slots=n_slots, ctx_size=64)


def test_twins_load_as_silu_bitnet(loaded):
    for kind in TWINS:
        cfg = loaded[kind].config
        assert cfg.arch == "bitnet" and cfg.activation == "silu", kind
        assert (cfg.n_layers, cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads) == (4, 256, 768, 4, 2)
        assert cfg.rope_theta == 10000.0
        assert {t.source_type for t in loaded[kind].ternary.values()} == {kind}
    cfg = loaded["I2_S"].config
    assert cfg.arch == "bitnet-b1.58" and cfg.activation == "relu2" and cfg.rope_theta == 500000.0
    assert {t.source_type for t in loaded["I2_S"].ternary.values()} == {"I2_S"}


@pytest.mark.parametrize("kind", ["TQ2_0", "TQ1_0", "I2_S"])
def test_same_ternary_values_as_hf_packed(loaded, kind):
    """TQ1_0/TQ2_0 (gguf package's quantisers, f16 block scales), I2_S (our exporter) and the HF packed
    layout of the same model load to identical codes, scales and float tensors."""
    ours, hf = loaded[kind], loaded["hf"]
    assert ours.ternary.keys() == hf.ternary.keys()
    for name, t in hf.ternary.items():
        np.testing.assert_array_equal(ours.ternary[name].codes, t.codes, err_msg=name)
        assert ours.ternary[name].scale == t.scale, name
    assert ours.float_tensors.keys() == hf.float_tensors.keys()
    for name, array in hf.float_tensors.items():
        np.testing.assert_array_equal(ours.float_tensors[name], array, err_msg=name)


def test_i2s_same_ternary_values_as_tq2_0(loaded):
    """Our I2_S (one f32 scale per tensor) and the gguf package's TQ2_0 (f16 scale per 256-block)."""
    i2s, tq2 = loaded["I2_S"].ternary, loaded["TQ2_0"].ternary
    assert i2s.keys() == tq2.keys()
    for name, t in tq2.items():
        np.testing.assert_array_equal(i2s[name].codes, t.codes, err_msg=name)
        assert i2s[name].scale == t.scale, name


@pytest.mark.parametrize("kind", sorted(TWINS))
def test_twin_matches_llama_cpp(loaded, kind):
    golden = load_golden(f"llama_twin_{kind.lower()}")
    model = _model(loaded[kind], n_slots=2)
    cmp = compare_teacher_forced(engine_teacher_forced(model, golden["tokens"]), golden)
    assert not cmp.failures(LLAMA_MIN_AGREE), cmp.summary() + "\n" + "\n".join(cmp.misses)
    greedy = compare_greedy(
        engine_decode_loop(model, golden["greedy_prompts"], golden["greedy_tokens"]), golden
    )
    assert not greedy.failures(LLAMA_MIN_AGREE), greedy.summary() + "\n" + "\n".join(greedy.misses)


@pytest.mark.parametrize("kind", sorted(TWINS))
def test_twin_matches_transformers(loaded, kind):
    golden = load_golden("hf_twin")
    cmp = compare_teacher_forced(engine_teacher_forced(_model(loaded[kind]), golden["tokens"]), golden)
    assert not cmp.failures(HF_MIN_AGREE, HF_MAX_MEDIAN), cmp.summary() + "\n" + "\n".join(cmp.misses)


def test_i2s_relu2_matches_transformers(loaded):
    """A through the official file's format and arch (relu² for `bitnet-b1.58`) against transformers."""
    golden = load_golden("hf_a_packed")
    cmp = compare_teacher_forced(engine_teacher_forced(_model(loaded["I2_S"]), golden["tokens"]), golden)
    assert not cmp.failures(HF_MIN_AGREE, HF_MAX_MEDIAN), cmp.summary() + "\n" + "\n".join(cmp.misses)


def test_llama_cpp_f32_agrees_with_numpy_forward_unquantised(loaded):
    """llama.cpp runs F32 weights with unquantised activations; our plain numpy forward without activation
    quantisation must match it closely: an independent check of the GGUF metadata the twins carry (rope
    pairing and theta, GQA, norms, SiLU) and of the forward used by the HF teeth test."""
    golden = load_golden("llama_twin_f32")
    logits = [numpy_forward(loaded["TQ2_0"], seq, quantise_activations=False) for seq in golden["tokens"]]
    cmp = compare_teacher_forced(logits, golden)
    assert not cmp.failures(0.99, 1e-3), cmp.summary()
