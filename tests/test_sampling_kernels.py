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


@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 120, 128, 136, 300, 4099])
def test_row_weights_match_reference_bits(path, vocab):
    """The passes before the pick, on this path: maximum, every weight and every block sum, bit for bit."""
    rng = np.random.default_rng(vocab + 1)
    for trial in range(6):
        x = (rng.standard_normal(vocab) * rng.uniform(0.1, 30)).astype(np.float32)
        if trial % 2:
            x[rng.integers(0, vocab, size=vocab // 3)] = -np.inf
            x[rng.integers(0, vocab, size=vocab // 5)] = np.nan
            x[0] = 0.0
        t = float(rng.uniform(0.05, 3.0))
        weights = np.empty(vocab, np.float32)
        sums = np.empty(-(-vocab // sampling.BLOCK), np.float64)
        m = sampling.row_weights(x, t, weights, sums)
        want_m, want_w, want_sums = reference.row_weights(x, t)
        assert m == want_m
        assert np.array_equal(weights.view(np.uint32), want_w.view(np.uint32))
        assert np.array_equal(sums.view(np.uint64), want_sums.view(np.uint64))


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


@pytest.mark.parametrize("temperature", [1e-30, 1e-45])
def test_temperatures_near_zero_take_the_maximum(path, temperature):
    """1 / T beyond float32 (1e-45) or huge (1e-30): every weight but the maximum's is 0, so the draw is
    the arg-max, as it is at T = 0, never token 0 by accident."""
    logits = np.array([[0.5, -3.0, 2.5, 2.0, 2.5, -np.inf]], np.float32)
    assert draw(logits, [0], [temperature], [0.3]) == [2]
    assert reference.draw_row(logits[0], temperature, 0.3) == 2


def test_rows_must_follow_one_another():
    """A reversed or overlapping row stride would send the kernel outside the array: refused."""
    logits = np.arange(16, dtype=np.float32).reshape(2, 8)
    overlapping = np.lib.stride_tricks.as_strided(logits, shape=(2, 8), strides=(4, 4))
    rows, ones, out = np.array([0, 1], np.int64), np.ones(2), np.empty(2, np.int64)
    for bad in (logits[::-1], overlapping):
        with pytest.raises(ValueError, match="row stride"):
            sampling.draw_rows(bad, rows, ones, ones / 2, out)
    sampling.draw_rows(logits, rows, ones, ones / 2, out)  # the same rows in order are fine


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
