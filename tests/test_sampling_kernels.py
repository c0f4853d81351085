"""The compiled token draw (bitnet_grpc.cyext.sampling) against its numpy reference, on every path."""

from __future__ import annotations

import numpy as np
import pytest
from bitnet_grpc.cyext import reference, sampling


@pytest.fixture(params=sampling.kernel_paths())
def path(request):
    before = sampling.get_kernel_path()
    sampling.set_kernel_path(request.param)
    yield request.param
    sampling.set_kernel_path(before)


def draw(logits, rows, temperatures, uniforms, threads=0):
    out = np.empty(len(rows), np.int64)
    sampling.draw_rows(
        np.ascontiguousarray(logits, np.float32),
        np.asarray(rows, np.int64),
        np.asarray(temperatures, np.float64),
        np.asarray(uniforms, np.float64),
        out,
        threads,
    )
    return out.tolist()


def test_exp_neg_matches_reference_bits_and_is_accurate(path):
    rng = np.random.default_rng(1)
    z = -rng.uniform(0, 90, 20000).astype(np.float32)
    z[:8] = [0.0, -0.0, -87.0, np.nextafter(np.float32(-87), np.float32(-88)), -np.inf, np.nan, -1e-30, -200]
    out = np.empty_like(z)
    sampling.exp_neg(z, out)
    assert np.array_equal(out.view(np.uint32), reference.exp_neg(z).view(np.uint32))
    assert out[0] == 1.0 and out[1] == 1.0 and out[4] == 0.0 and out[5] == 0.0 and out[7] == 0.0
    live = z >= -87
    exact = np.exp(z[live].astype(np.float64))
    assert np.max(np.abs(out[live] / exact - 1)) < 3e-7


@pytest.mark.parametrize("vocab", [1, 5, 16, 17, 127, 128, 129, 300, 4096, 4099])
def test_draw_matches_reference(path, vocab):
    rng = np.random.default_rng(vocab)
    for trial in range(12):
        logits = (rng.standard_normal((4, vocab)) * rng.uniform(0.1, 10)).astype(np.float32)
        if trial % 3 == 0:  # masked tokens, as the engine masks padding rows of the vocabulary
            logits[:, rng.integers(0, vocab, size=vocab // 2)] = -np.inf
            logits[:, 0] = 0.0
        temperatures = rng.uniform(0.05, 3.0, 4)
        uniforms = rng.random(4)
        uniforms[0] = 1 - 2**-53  # the largest double below 1
        rows = [3, 1, 0, 2]
        expected = [reference.draw_row(logits[r], temperatures[i], uniforms[i]) for i, r in enumerate(rows)]
        assert draw(logits, rows, temperatures, uniforms) == expected


def test_row_never_depends_on_batch_threads_or_path():
    rng = np.random.default_rng(7)
    logits = (rng.standard_normal((24, 4096)) * 4).astype(np.float32)
    temperatures = rng.uniform(0.3, 2.0, 24)
    uniforms = rng.random(24)
    rows = list(range(24))
    results = []
    before = sampling.get_kernel_path()
    try:
        for p in sampling.kernel_paths():
            sampling.set_kernel_path(p)
            for threads in (1, 2, 3):
                results.append(draw(logits, rows, temperatures, uniforms, threads))
            alone = [draw(logits, [r], temperatures[r : r + 1], uniforms[r : r + 1])[0] for r in rows]
            results.append(alone)
    finally:
        sampling.set_kernel_path(before)
    assert all(r == results[0] for r in results)


def test_picks_follow_the_softmax():
    """4000 draws over 6 tokens land in proportion to softmax(x / T) (a loose 5-sigma band)."""
    logits = np.array([[2.0, 1.0, 0.0, -1.0, 0.5, -np.inf]], np.float32)
    t = 0.7
    p = np.exp(logits[0, :5].astype(np.float64) / t)
    p /= p.sum()
    rng = np.random.default_rng(3)
    uniforms = rng.random(4000)
    counts = np.zeros(6)
    for u in uniforms:
        counts[draw(logits, [0], [t], [u])[0]] += 1
    assert counts[5] == 0
    sigma = np.sqrt(4000 * p * (1 - p))
    assert np.all(np.abs(counts[:5] - 4000 * p) < 5 * sigma)


def test_uniform_extremes_pick_first_and_last_live_tokens():
    logits = np.array([[-np.inf, 1.0, 1.0, -np.inf, 1.0, -np.inf]], np.float32)
    assert draw(logits, [0], [1.0], [0.0]) == [1]
    assert draw(logits, [0], [1.0], [1 - 2**-53]) == [4]


def test_rows_without_a_distribution():
    """All -inf: the first token; +inf: the first +inf. NaN logits are never drawn."""
    logits = np.zeros((4, 40), np.float32)
    logits[0] = -np.inf
    logits[1, 23] = logits[1, 30] = np.inf
    logits[2, 33] = np.nan
    logits[3, :39] = np.nan
    rows = [0, 1, 2, 3]
    expected = [reference.draw_row(logits[r], 1.0, 0.5) for r in rows]
    assert expected[:2] == [0, 23] and expected[2] != 33 and expected[3] == 39
    assert draw(logits, rows, [1.0] * 4, [0.5] * 4) == expected


@pytest.mark.parametrize(
    "rows, temperatures, uniforms, message",
    [
        ([0, 2], [1.0, 1.0], [0.1, 0.2], "outside the 2 logits rows"),
        ([0], [0.0], [0.1], "temperatures"),
        ([0], [float("nan")], [0.1], "temperatures"),
        ([0], [1.0], [1.0], "uniforms"),
        ([0, 1], [1.0], [0.1, 0.2], "same length"),
    ],
)
def test_bad_arguments_are_named(rows, temperatures, uniforms, message):
    logits = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match=message):
        draw(logits, rows, temperatures, uniforms)
