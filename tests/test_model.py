"""Model.forward against a plain numpy forward pass, and the batch-invariance and KV-cache promises."""

import numpy as np
import pytest
from _model_helpers import numpy_forward, random_weights
from bitnet_grpc.cyext import floatops, ternary
from bitnet_grpc.server.model import Model

TOKENS = [5, 17, 200, 3, 99, 42, 42, 7, 150, 260, 11, 64, 1, 0, 88, 123, 77, 31, 250, 9]


def prefill(model, slot, tokens, start=0, logits_for_all=True):
    n = len(tokens)
    rows = np.arange(n, dtype=np.int32) if logits_for_all else np.array([n - 1], np.int32)
    return model.forward(
        np.full(n, slot, np.int32),
        np.asarray(tokens, np.int32),
        np.arange(start, start + n, dtype=np.int32),
        rows,
    )


def assert_close_rel(actual, expected, rel):
    err = np.abs(actual.astype(np.float64) - expected).max() / np.abs(expected).max()
    assert err < rel, f"max error {err:.2e} of the logit range"


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"activation": "silu", "tied": False},
        {"embedding_dtype": "f16", "n_heads": 8, "n_kv_heads": 2, "d_model": 256},
        {"embedding_dtype": "bf16", "n_kv_heads": 4},  # plain multi-head attention
    ],
    ids=["relu2-gqa", "silu-untied", "f16-head-gqa4", "bf16-head-mha"],
)
def test_forward_matches_numpy_reference(variant):
    weights = random_weights(1, **variant)
    model = Model(weights, n_slots=2, ctx_size=64)
    assert model.embedding.dtype == variant.get("embedding_dtype", "f32")
    logits = prefill(model, 1, TOKENS)
    expected = numpy_forward(weights, TOKENS)
    assert logits.shape == (len(TOKENS), weights.config.vocab_size)
    assert_close_rel(logits, expected, 1e-4)
    np.testing.assert_array_equal(logits.argmax(axis=1), expected.argmax(axis=1))
    # the layers matter: logits are not just a function of the input token
    assert np.abs(logits[5] - logits[6]).max() > 0.1  # token 42 twice, different contexts


@pytest.mark.parametrize(
    "name",
    ["blk.0.attn_norm", "blk.1.attn_sub_norm", "blk.0.ffn_norm", "blk.1.ffn_sub_norm", "output_norm"],
)
def test_every_norm_is_applied(name):
    weights = random_weights(2)
    base = prefill(Model(weights, n_slots=1, ctx_size=32), 0, TOKENS[:8])
    weights.float_tensors[f"{name}.weight"][:7] = 2.5
    changed = prefill(Model(weights, n_slots=1, ctx_size=32), 0, TOKENS[:8])
    assert np.abs(changed - base).max() > 1e-2
    assert_close_rel(changed, numpy_forward(weights, TOKENS[:8]), 1e-4)


def test_token_by_token_equals_one_prefill_chunk():
    weights = random_weights(3)
    whole = prefill(Model(weights, n_slots=1, ctx_size=32), 0, TOKENS)
    model = Model(weights, n_slots=1, ctx_size=32)
    steps = [model.forward([0], [t], [p], [0])[0] for p, t in enumerate(TOKENS)]
    np.testing.assert_allclose(np.stack(steps), whole, rtol=1e-5, atol=1e-6)
    # every row is computed from its own data in a fixed order, so the bits agree too
    np.testing.assert_array_equal(np.stack(steps), whole)
    # uneven chunks give the same bits as well
    model = Model(weights, n_slots=1, ctx_size=32)
    parts = [prefill(model, 0, TOKENS[a:b], start=a) for a, b in [(0, 3), (3, 4), (4, 13), (13, 20)]]
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def run_alone(weights, prompt, continuation):
    """Prefill then decode `continuation` alone in slot 0 of a fresh model: logits per step."""
    model = Model(weights, n_slots=1, ctx_size=64)
    rows = [prefill(model, 0, prompt, logits_for_all=False)[0]]
    for i, token in enumerate(continuation):
        rows.append(model.forward([0], [token], [len(prompt) + i], [0])[0].copy())
    return np.stack(rows)


def test_batch_invariance_bit_for_bit():
    """A sequence's logits do not depend on the other sequences in its forward calls, on its slot, or
    on the thread count."""
    weights = random_weights(4)
    a_prompt, a_cont = TOKENS[:9], [3, 14, 15, 92, 65]
    alone = run_alone(weights, a_prompt, a_cont)

    model = Model(weights, n_slots=4, ctx_size=64)
    b_prompt = TOKENS[9:20]
    # call 1: B's prompt chunk, then A's whole prompt (A in slot 2); logits for A's last row only
    out = model.forward(
        np.array([0] * len(b_prompt) + [2] * len(a_prompt), np.int32),
        np.array(b_prompt + a_prompt, np.int32),
        np.array(list(range(len(b_prompt))) + list(range(len(a_prompt))), np.int32),
        np.array([len(b_prompt) + len(a_prompt) - 1], np.int32),
    )
    mixed = [out[0].copy()]
    threads = floatops.get_num_threads(), ternary.get_num_threads()
    try:
        for i, token in enumerate(a_cont):
            # later calls: B decodes, C prefills a few rows, A decodes in the middle
            n_threads = 1 + i % 2
            floatops.set_num_threads(n_threads)
            ternary.set_num_threads(n_threads)
            c_tokens = [60 + i, 61 + i, 62 + i]
            out = model.forward(
                np.array([0, 3, 3, 2, 3], np.int32),
                np.array(
                    [b_prompt[i % len(b_prompt)], c_tokens[0], c_tokens[1], token, c_tokens[2]], np.int32
                ),
                np.array([len(b_prompt) + i, 3 * i, 3 * i + 1, len(a_prompt) + i, 3 * i + 2], np.int32),
                np.array([0, 3, 4], np.int32),
            )
            mixed.append(out[1].copy())
    finally:
        floatops.set_num_threads(threads[0])
        ternary.set_num_threads(threads[1])
    np.testing.assert_array_equal(np.stack(mixed), alone)


def test_kv_slot_reuse_after_free():
    weights = random_weights(5)
    model = Model(weights, n_slots=2, ctx_size=64)
    slot = model.kv.alloc()
    prefill(model, slot, TOKENS, logits_for_all=False)  # a long sequence fills the slot
    model.kv.free(slot)
    again = model.kv.alloc()
    assert again == slot
    short = [9, 8, 7, 6]
    reused = prefill(model, again, short)
    fresh = prefill(Model(weights, n_slots=2, ctx_size=64), 0, short)
    np.testing.assert_array_equal(reused, fresh)
    with pytest.raises(ValueError):
        model.kv.free(1)  # never allocated
    model.kv.alloc()
    with pytest.raises(RuntimeError):
        model.kv.alloc()


def test_logit_rows_select_and_out_buffer():
    weights = random_weights(6)
    model = Model(weights, n_slots=1, ctx_size=32)
    full = prefill(model, 0, TOKENS[:6])
    out = np.empty((3, weights.config.vocab_size), np.float32)
    model = Model(weights, n_slots=1, ctx_size=32)
    got = model.forward([0] * 6, TOKENS[:6], list(range(6)), [5, 0, 5], out=out)
    assert got is out
    np.testing.assert_array_equal(out, full[[5, 0, 5]])
    assert model.forward([0], [1], [6], []).shape == (0, weights.config.vocab_size)
    with pytest.raises(ValueError, match="out"):
        model.forward([0], [1], [7], [0], out=np.empty((2, 3), np.float32))


def test_weight_layouts_give_identical_logits(monkeypatch):
    """LUT layout (the default on AVX-512BW CPUs) and 2-bit layout: the same logits bit for bit."""
    weights = random_weights(7)
    logits = {}
    for layout in ("lut", "2bit"):
        monkeypatch.setenv("BITNET_GRPC_LAYOUT", layout)
        model = Model(weights, n_slots=1, ctx_size=32)
        assert model.layers[0].qkv.packed.dtype == (np.uint16 if layout == "lut" else np.uint8)
        logits[layout] = prefill(model, 0, TOKENS)
    np.testing.assert_array_equal(logits["lut"].view(np.uint32), logits["2bit"].view(np.uint32))


def test_bad_rows_are_refused():
    weights = random_weights(7)
    model = Model(weights, n_slots=2, ctx_size=16)
    vocab = weights.config.vocab_size
    with pytest.raises(ValueError, match="ctx_size"):
        model.forward([0], [1], [16], [0])
    with pytest.raises(ValueError, match="positions"):
        model.forward([0], [1], [-1], [0])
    with pytest.raises(ValueError, match="slots"):
        model.forward([2], [1], [0], [0])
    with pytest.raises(ValueError, match="token"):
        model.forward([0], [vocab], [0], [0])
    with pytest.raises(ValueError, match="logit_rows"):
        model.forward([0, 0], [1, 2], [0, 1], [2])
    with pytest.raises(ValueError):
        model.forward([0, 0], [1], [0, 1], [0])


def test_scratch_grows_for_large_batches():
    weights = random_weights(8)
    tokens = (np.arange(100) * 7 % weights.config.vocab_size).tolist()
    model = Model(weights, n_slots=1, ctx_size=128)
    big = prefill(model, 0, tokens)  # more rows than the initial scratch
    small = Model(weights, n_slots=1, ctx_size=128)
    parts = [prefill(small, 0, tokens[i : i + 50], start=i) for i in (0, 50)]
    np.testing.assert_array_equal(big, np.concatenate(parts))


def test_wrong_shapes_are_named():
    weights = random_weights(9)
    weights.ternary["blk.1.attn_k.weight"].codes = weights.ternary["blk.1.attn_k.weight"].codes[:-1]
    with pytest.raises(ValueError, match="blk.1.attn_k"):
        Model(weights, n_slots=1, ctx_size=8)
