"""Sampling: parameter checks, each truncation rule, penalties, logprobs and seeded determinism."""

import math

import numpy as np
import pytest
from bitnet_grpc.server.sampling import (
    InvalidParameter,
    Sampler,
    SamplingParams,
    _nucleus,
    _pick,
    choose_batch,
    draw_rows,
    pick_rows,
    top_indices,
)


@pytest.mark.parametrize(
    "field_name, value",
    [
        ("max_tokens", 0),
        ("max_tokens", 1.5),
        ("max_tokens", True),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("top_k", -1),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", float("nan")),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.01),
        ("seed", -1),
        ("seed", 2**64),
        ("stop", "a string, not a list"),
        ("stop", ["x"] * 17),
        ("stop", [""]),
        ("stop", ["é" * 129]),
        ("logprobs", 21),
        ("logprobs", -1),
        ("ignore_eos", 1),
    ],
)
def test_validate_names_the_bad_field(field_name, value):
    params = SamplingParams(**{field_name: value})
    with pytest.raises(InvalidParameter) as info:
        params.validate()
    assert info.value.field.startswith(field_name)
    assert isinstance(info.value, ValueError)


def test_validate_accepts_edges():
    SamplingParams(
        max_tokens=1, temperature=0.0, top_k=0, top_p=1.0, min_p=1.0, repetition_penalty=0.01,
        presence_penalty=-2.0, frequency_penalty=2.0, seed=2**64 - 1, stop=["x"] * 16, logprobs=20,
    ).validate()  # fmt: skip


def probs_logits(probs):
    return np.log(np.asarray(probs, np.float64)).astype(np.float32)


def draw(params, logits, n):
    sampler = Sampler(params, logits.shape[0])
    return np.array([sampler.sample(logits).token_id for _ in range(n)])


def test_greedy_takes_argmax_lowest_id_on_ties():
    logits = np.array([0.0, 3.0, 1.0, 3.0], np.float32)
    assert set(draw(SamplingParams(temperature=0.0), logits, 5)) == {1}


def test_same_seed_same_tokens_different_seed_differs():
    logits = np.zeros(1000, np.float32)
    a = draw(SamplingParams(seed=7), logits, 50)
    b = draw(SamplingParams(seed=7), logits, 50)
    c = draw(SamplingParams(seed=8), logits, 50)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # unset seed: a fresh random one each time, recorded on the sampler
    assert Sampler(SamplingParams(), 4).seed != Sampler(SamplingParams(), 4).seed


def test_temperature_one_follows_the_softmax():
    tokens = draw(SamplingParams(seed=1), probs_logits([0.5, 0.3, 0.2]), 20000)
    freq = np.bincount(tokens, minlength=3) / tokens.size
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.2], atol=0.015)


def test_low_temperature_sharpens():
    tokens = draw(SamplingParams(seed=2, temperature=0.25), probs_logits([0.5, 0.3, 0.2]), 5000)
    expected = np.array([0.5, 0.3, 0.2]) ** 4
    np.testing.assert_allclose(
        np.bincount(tokens, minlength=3) / tokens.size, expected / expected.sum(), atol=0.02
    )


def test_top_k():
    logits = probs_logits([0.1, 0.4, 0.05, 0.3, 0.15])
    assert set(draw(SamplingParams(seed=3, top_k=1, temperature=5.0), logits, 200)) == {1}
    assert set(draw(SamplingParams(seed=3, top_k=2, temperature=5.0), logits, 500)) == {1, 3}


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = probs_logits([0.05, 0.5, 0.15, 0.3])
    assert set(draw(SamplingParams(seed=4, top_p=0.75), logits, 500)) == {1, 3}
    assert set(draw(SamplingParams(seed=4, top_p=0.5), logits, 200)) == {1}
    assert set(draw(SamplingParams(seed=4, top_p=0.9), logits, 500)) == {1, 2, 3}


def test_top_p_large_vocab_matches_brute_force():
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal(20000) * 3).astype(np.float32)
    probs = np.exp(logits.astype(np.float64) - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    for top_p in (0.3, 0.9, 0.999):
        nucleus = set(order[: int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1].tolist())
        got = set(draw(SamplingParams(seed=6, top_p=top_p), logits, 300).tolist())
        assert got <= nucleus
        assert len(got) > 1


def test_min_p_is_relative_to_the_top_probability():
    logits = probs_logits([0.5, 0.3, 0.15, 0.05])
    assert set(draw(SamplingParams(seed=7, min_p=0.5), logits, 500)) == {0, 1}
    assert set(draw(SamplingParams(seed=7, min_p=0.2), logits, 1000)) == {0, 1, 2}


def test_repetition_penalty_covers_prompt_and_output():
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    sampler = Sampler(params, 4, prompt_ids=[0])
    logits = np.array([2.0, -2.0, 1.0, 0.5], np.float32)
    np.testing.assert_array_equal(sampler.apply_penalties(logits), [1.0, -2.0, 1.0, 0.5])
    sampler.record(1)
    np.testing.assert_array_equal(sampler.apply_penalties(logits), [1.0, -4.0, 1.0, 0.5])
    np.testing.assert_array_equal(logits, [2.0, -2.0, 1.0, 0.5])  # the caller's row is untouched
    # greedy now picks token 0 first (2 -> 1 ties with token 2: lowest id)
    assert sampler.sample(logits).token_id == 0


def test_presence_and_frequency_cover_output_only():
    params = SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25)
    sampler = Sampler(params, 3, prompt_ids=[2, 2, 2])
    logits = np.array([1.0, 1.0, 1.0], np.float32)
    np.testing.assert_array_equal(sampler.apply_penalties(logits), logits)
    for token in (0, 0, 1):
        sampler.record(token)
    np.testing.assert_allclose(sampler.apply_penalties(logits), [1 - 0.5 - 0.5, 1 - 0.5 - 0.25, 1.0])
    assert sampler.sample(logits).token_id == 2


def test_greedy_stops_repeating_under_penalty():
    logits = np.array([5.0, 4.0, 3.0, 2.0], np.float32)
    sampler = Sampler(SamplingParams(temperature=0.0, frequency_penalty=2.0), 4)
    tokens = [sampler.sample(logits).token_id for _ in range(4)]
    assert tokens == [0, 1, 0, 2]  # 5 -> 3 after one use ties with 3 (lowest id 0), then 1 (4 -> 2)...


def test_logprobs_are_raw_log_softmax_with_sorted_alternatives():
    rng = np.random.default_rng(8)
    logits = rng.standard_normal(50).astype(np.float32)
    logits[7] = logits[9] = 5.0  # a tie at the top
    sampler = Sampler(SamplingParams(seed=1, logprobs=3, temperature=0.7, repetition_penalty=3.0), 50)
    sample = sampler.sample(logits)
    expected = logits.astype(np.float64) - math.log(np.exp(logits.astype(np.float64)).sum())
    assert sample.logprob == pytest.approx(expected[sample.token_id], abs=1e-9)
    assert [t for t, _ in sample.top_logprobs][:2] == [7, 9]
    top_ids = np.argsort(-expected, kind="stable")[:3]
    assert [t for t, _ in sample.top_logprobs] == top_ids.tolist()
    for token, lp in sample.top_logprobs:
        assert lp == pytest.approx(expected[token], abs=1e-9)
    assert Sampler(SamplingParams(), 50).sample(logits).logprob is None


def test_sampler_rejects_wrong_row_shape():
    with pytest.raises(ValueError):
        Sampler(SamplingParams(), 5).sample(np.zeros(4, np.float32))


@pytest.mark.parametrize("n, k", [(10, 3), (5000, 1), (5000, 40), (130000, 20), (300, 299)])
def test_top_indices_finds_the_k_largest(n, k):
    rng = np.random.default_rng(n + k)
    values = rng.standard_normal(n)
    values[rng.integers(0, n, 50)] = values.max()  # ties at the top
    got = top_indices(values, k)
    assert len(set(got.tolist())) == k
    assert np.sort(values[got])[::-1].tolist() == np.sort(values)[::-1][:k].tolist()


def test_batch_draws_equal_one_row_draws():
    """A row's token never depends on the other rows of the batch (the scheduler's invariance)."""
    rng = np.random.default_rng(3)
    scores = (rng.standard_normal((16, 1000)) * 4).astype(np.float32)  # 1000: not whole blocks
    scores[5, 900:] = -np.inf  # masked padding ids
    temperatures = rng.uniform(0.2, 2.0, 16)
    uniforms = rng.random(16)
    uniforms[0] = 0.0
    together = draw_rows(scores, temperatures, uniforms)
    alone = [draw_rows(scores[i : i + 1], temperatures[i : i + 1], uniforms[i : i + 1])[0] for i in range(16)]
    assert together.tolist() == [int(t) for t in alone]
    assert together[5] < 900
    weights = rng.random((4, 300))
    assert pick_rows(weights, np.array([0.0, 0.3, 0.6, 1 - 1e-16])).tolist()[::3] == [0, 299]


def test_choose_batch_draws_what_each_sampler_would_alone():
    vocab = 500
    rng = np.random.default_rng(4)
    rows = (rng.standard_normal((6, vocab)) * 3).astype(np.float32)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, seed=1),
        SamplingParams(temperature=1.0, seed=2, top_k=20),  # not plain: left to the sampler
        SamplingParams(temperature=1.3, seed=3, logprobs=2),
        SamplingParams(temperature=0.0, repetition_penalty=1.2),  # not plain
        SamplingParams(temperature=1.0, seed=4, top_k=vocab),  # top-k over everything is plain
    ]
    alone = [Sampler(p, vocab, [1, 2]) for p in params]
    batched = [Sampler(p, vocab, [1, 2]) for p in params]
    for _ in range(20):
        expected = [s.sample(row) for s, row in zip(alone, rows, strict=True)]
        chosen = choose_batch(batched, rows)
        assert [c is None for c in chosen] == [False, False, True, False, True, False]
        got = [s.sample(row, c) for s, row, c in zip(batched, rows, chosen, strict=True)]
        assert got == expected
        rows = np.roll(rows, 7, axis=1)


def test_pick_follows_weights_and_skips_zeros():
    weights = np.zeros(1000)
    weights[[3, 500, 999]] = [1.0, 2.0, 1.0]
    rng = np.random.default_rng(9)
    picks = np.array([_pick(weights, rng.random()) for _ in range(4000)])
    assert set(picks.tolist()) == {3, 500, 999}
    np.testing.assert_allclose(
        np.bincount(picks, minlength=1000)[[3, 500, 999]] / 4000, [0.25, 0.5, 0.25], atol=0.03
    )
    assert _pick(weights, 0.0) == 3
    assert _pick(weights, 1.0 - 1e-16) == 999


@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0])
def test_nucleus_is_exactly_the_sorted_prefix(scale):
    rng = np.random.default_rng(int(scale * 10))
    z = rng.standard_normal(50000) * scale
    z[:10] = z.max()  # ties at the top
    weights = np.exp(z - z.max())
    order = np.lexsort((np.arange(z.size), -weights))
    for top_p in (0.01, 0.5, 0.9, 0.999):
        cut = int(np.searchsorted(np.cumsum(weights[order]), top_p * weights.sum())) + 1
        expected = order[:cut]
        got = _nucleus(weights, top_p)
        assert len(got) == len(expected)
        # ties at the cut may swap members of equal weight; the weights kept are the same
        np.testing.assert_array_equal(np.sort(weights[got]), np.sort(weights[expected]))
