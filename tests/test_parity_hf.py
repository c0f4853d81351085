"""Our engine on Hugging Face checkpoints against transformers' BitNetForCausalLM (goldens in
tests/fixtures/parity, made by tools/make_fixtures.py; transformers is not needed here).

Thresholds: >= 96% of positions agree on the argmax, every disagreement is a near-tie (our token within
0.25 std of the reference's best, by the reference's logits), and the median |logit diff| at the
reference's top-16 ids is below 1e-3 std. The last tests show these thresholds have teeth: a real forward
that skips only the activation quantisation fails them.
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

MIN_AGREE = 0.96
MAX_MEDIAN = 1e-3
CHECKPOINTS = {"a_packed": "hf_a_packed", "b_online": "hf_b_online"}


@pytest.fixture(scope="module")
def loaded():
    return {folder: load_weights(FIXTURES / folder) for folder in CHECKPOINTS}


def _model(weights, n_slots: int = 1) -> Model:
    return Model(weights, n_slots=n_slots, ctx_size=64)


def test_checkpoints_load_as_generated(loaded):
    a, b = loaded["a_packed"], loaded["b_online"]
    assert (a.config.n_layers, a.config.d_model, a.config.d_ff) == (4, 256, 768)
    assert (a.config.n_heads, a.config.n_kv_heads, a.config.head_dim) == (4, 2, 64)
    assert a.config.activation == b.config.activation == "relu2"
    assert a.config.rope_theta == 500000.0 and a.config.tied_embeddings
    assert (b.config.n_layers, b.config.d_ff, b.config.n_kv_heads) == (1, 512, 4)
    assert {t.source_type for t in a.ternary.values()} == {"U8-packed"}
    for weights in (a, b):
        for name, t in weights.ternary.items():
            assert t.codes.dtype == np.int8 and set(np.unique(t.codes)) <= {-1, 0, 1}, name
            assert 0.05 < t.scale < 0.12, (name, t.scale)  # mean|W| of N(0, 0.1) weights, multiplied


@pytest.mark.parametrize("folder", sorted(CHECKPOINTS))
def test_teacher_forced_matches_transformers(loaded, folder):
    golden = load_golden(CHECKPOINTS[folder])
    cmp = compare_teacher_forced(engine_teacher_forced(_model(loaded[folder]), golden["tokens"]), golden)
    assert not cmp.failures(MIN_AGREE, MAX_MEDIAN), cmp.summary() + "\n" + "\n".join(cmp.failures(MIN_AGREE))


@pytest.mark.parametrize("folder", sorted(CHECKPOINTS))
def test_decode_loop_matches_transformers_greedy(loaded, folder):
    """The KV-cache decode path, one token per call, on the reference's greedy continuation."""
    golden = load_golden(CHECKPOINTS[folder])
    model = _model(loaded[folder], n_slots=2)
    logits = engine_decode_loop(model, golden["greedy_prompts"], golden["greedy_tokens"])
    cmp = compare_greedy(logits, golden)
    assert not cmp.failures(MIN_AGREE, MAX_MEDIAN), cmp.summary() + "\n" + "\n".join(cmp.misses)
    ours = np.array([row.argmax(-1) for row in logits])
    reference_chose = golden["greedy_tokens"]
    assert (ours == reference_chose).mean() >= MIN_AGREE


def test_numpy_forward_is_a_faithful_forward(loaded):
    """The plain numpy forward used below reproduces transformers both with and without activation
    quantisation, so the teeth test compares a correct forward that differs only in that one step."""
    weights = loaded["a_packed"]
    for golden_name, quantise in (("hf_a_packed", True), ("hf_a_unquantised", False)):
        golden = load_golden(golden_name)
        logits = [numpy_forward(weights, seq, quantise_activations=quantise) for seq in golden["tokens"]]
        cmp = compare_teacher_forced(logits, golden)
        assert not cmp.failures(MIN_AGREE, MAX_MEDIAN), f"{golden_name}: {cmp.summary()}"


def test_thresholds_have_teeth(loaded):
    """Skipping only the per-token int8 activation quantisation must fail the comparison."""
    weights = loaded["a_packed"]
    golden = load_golden("hf_a_packed")
    logits = [numpy_forward(weights, seq, quantise_activations=False) for seq in golden["tokens"]]
    cmp = compare_teacher_forced(logits, golden)
    assert cmp.failures(MIN_AGREE, MAX_MEDIAN), cmp.summary()
    assert cmp.median_rel_diff > 10 * MAX_MEDIAN, cmp.summary()


def test_engine_differs_from_unquantised_reference(loaded):
    """The same teeth from the other side: our engine must not match transformers without quantisation."""
    golden = load_golden("hf_a_unquantised")
    cmp = compare_teacher_forced(engine_teacher_forced(_model(loaded["a_packed"]), golden["tokens"]), golden)
    assert cmp.failures(MIN_AGREE, MAX_MEDIAN), cmp.summary()
