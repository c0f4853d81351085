"""Choosing the next token from a logits row: sampling parameters and a per-sequence sampler.

Each sequence owns a `Sampler` with its own numpy Generator, so its tokens depend only on its seed and
its own logits (never on what else shares the batch). The pipeline, in this order:

1. penalties on a copy of the logits:
   - repetition (HF / llama.cpp): for every token already in the prompt or the output, a positive logit
     is divided by the penalty and a negative one multiplied;
   - presence and frequency (OpenAI): over generated tokens only, subtract `presence` once and
     `frequency * count`;
2. temperature 0: the arg-max (lowest id on ties), no randomness;
3. otherwise scale by the temperature (plain rows, batched in the compiled draw: times float32(1/T);
   the others: divided by T in float64), then top-k, top-p (smallest most-probable set whose mass
   reaches top_p), min-p (drop tokens below min_p * the top probability), renormalise, draw.

The scheduler chooses the tokens of a whole batch at once (`choose_batch`): greedy rows take one
arg-max over the batch, plain temperature rows (no penalties, top-k, top-p or min-p) one call of the
compiled draw (`bitnet_grpc.cyext.sampling`: softmax weights in float32, sums in float64, a fixed order
per row, no GIL). A row's token never depends on the other rows, and the one-row path runs the same
kernel on a batch of one, so a sequence draws the same tokens alone or batched.

Logprobs are the log-softmax of the raw model logits (before penalties and temperature): they describe
the model, not the sampling settings, which matches what OpenAI-style APIs return.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from bitnet_grpc.cyext import sampling as _kernels

MAX_STOP_STRINGS = 16
MAX_STOP_BYTES = 256
MAX_LOGPROBS = 20
# Block length for the cheap pre-selections below (top-k bounds, cumulative sums).
_BLOCK = 128
# Binning of weights for top-p: 16 bins per halving of probability, everything below 2^-64 in one bin.
_NUCLEUS_BINS_PER_OCTAVE = 16
_NUCLEUS_LAST_BIN = 64 * _NUCLEUS_BINS_PER_OCTAVE


class InvalidParameter(ValueError):
    """A sampling parameter out of range; `field` names it."""

    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(f"{field_name}: {reason}")
        self.field = field_name
        self.reason = reason


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. Defaults: plain sampling at temperature 1, 128 tokens."""

    max_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # None = a random seed
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int = 0  # top alternatives to report; 0 = no logprobs at all

    def validate(self) -> SamplingParams:
        """Raise InvalidParameter (a ValueError) naming the first bad field; return self when fine."""
        _int(self, "max_tokens", low=1)
        _float(self, "temperature", low=0.0)
        _int(self, "top_k", low=0)
        top_p = _float(self, "top_p")
        if not 0.0 < top_p <= 1.0:
            raise InvalidParameter("top_p", f"must be in (0, 1], got {top_p}")
        min_p = _float(self, "min_p")
        if not 0.0 <= min_p <= 1.0:
            raise InvalidParameter("min_p", f"must be in [0, 1], got {min_p}")
        if _float(self, "repetition_penalty") <= 0.0:
            raise InvalidParameter("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = _float(self, name)
            if not -2.0 <= value <= 2.0:
                raise InvalidParameter(name, f"must be in [-2, 2], got {value}")
        if self.seed is not None:
            _int(self, "seed", low=0, high=2**64 - 1)
        if isinstance(self.stop, str) or not isinstance(self.stop, (list, tuple)):
            raise InvalidParameter("stop", f"must be a list of strings, got {type(self.stop).__name__}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidParameter("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for i, stop in enumerate(self.stop):
            if not isinstance(stop, str):
                raise InvalidParameter(f"stop[{i}]", f"must be a string, got {type(stop).__name__}")
            size = len(stop.encode("utf-8", errors="surrogatepass"))
            if not 1 <= size <= MAX_STOP_BYTES:
                raise InvalidParameter(f"stop[{i}]", f"must be 1..{MAX_STOP_BYTES} bytes, got {size}")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidParameter("ignore_eos", f"must be a bool, got {type(self.ignore_eos).__name__}")
        _int(self, "logprobs", low=0, high=MAX_LOGPROBS)
        return self


def _int(params: SamplingParams, name: str, low: int, high: int | None = None) -> int:
    value = getattr(params, name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidParameter(name, f"must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in {low}..{high}"
        raise InvalidParameter(name, f"must be {bounds}, got {value}")
    return int(value)


def _float(params: SamplingParams, name: str, low: float | None = None) -> float:
    value = getattr(params, name)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidParameter(name, f"must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidParameter(name, f"must be a finite number, got {value}")
    if low is not None and value < low:
        raise InvalidParameter(name, f"must be >= {low}, got {value}")
    return value


@dataclass(slots=True)
class Sample:
    """One chosen token; logprob and top_logprobs ((id, logprob) best first) only when requested."""

    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


class Sampler:
    """Picks the tokens of one sequence. Same seed, same prompt, same logits -> same tokens."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids: list[int] | None = None) -> None:
        params.validate()
        self.params = params
        self.vocab_size = vocab_size
        seed = params.seed if params.seed is not None else int(np.random.SeedSequence().entropy % 2**64)
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self._penalised = np.empty(vocab_size, np.float32)  # scratch: the row after penalties
        self._scaled = np.empty(vocab_size, np.float64)  # scratch: the row over the temperature
        # Repetition penalty: tokens of the prompt and the output. Presence/frequency: output only.
        self._seen: dict[int, None] = {}
        if params.repetition_penalty != 1.0:
            self._seen = dict.fromkeys(int(t) for t in (prompt_ids or []))
        self._counts: dict[int, int] = {}
        # No penalties and no truncation: the token depends on the raw row and the temperature only,
        # so `choose_batch` can choose it together with other sequences' tokens. (Fixed by the params.)
        self.plain = self._is_plain()

    @property
    def _has_penalties(self) -> bool:
        p = self.params
        return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0

    def _is_plain(self) -> bool:
        p = self.params
        no_top_k = p.top_k == 0 or p.top_k >= self.vocab_size
        return not self._has_penalties and no_top_k and p.top_p >= 1.0 and p.min_p <= 0.0

    def sample(self, logits: np.ndarray, token: int | None = None) -> Sample:
        """Choose the next token from a logits row (not modified) and remember it for penalties.

        `token`: already chosen from this row by `choose_batch` (which drew this sampler's random
        number); then only the logprobs and the bookkeeping are left."""
        if logits.shape != (self.vocab_size,):
            raise ValueError(f"logits row has shape {logits.shape}, expected ({self.vocab_size},)")
        if token is None:
            scores = self.apply_penalties(logits)
            if self.params.temperature == 0.0:
                token = int(np.argmax(scores))
            elif self.plain:
                token = int(draw_rows(scores[None], np.array([self.params.temperature]), self._uniform())[0])
            else:
                token = self._draw(scores)
        result = self._with_logprobs(logits, token)
        self.record(token)
        return result

    def record(self, token: int) -> None:
        """Count a generated token for the penalties (sample() calls this)."""
        self._counts[token] = self._counts.get(token, 0) + 1
        if self.params.repetition_penalty != 1.0:
            self._seen[token] = None

    def apply_penalties(self, logits: np.ndarray) -> np.ndarray:
        """The logits after repetition, presence and frequency penalties (a copy, or `logits` if none)."""
        if not self._has_penalties:
            return logits
        p = self.params
        out = self._penalised
        np.copyto(out, logits)
        if p.repetition_penalty != 1.0 and self._seen:
            ids = np.fromiter(self._seen, np.int64, len(self._seen))
            vals = out[ids]
            penalty = np.float32(p.repetition_penalty)
            out[ids] = np.where(vals > 0, vals / penalty, vals * penalty)
        if (p.presence_penalty or p.frequency_penalty) and self._counts:
            ids = np.fromiter(self._counts, np.int64, len(self._counts))
            counts = np.fromiter(self._counts.values(), np.float32, len(self._counts))
            out[ids] -= np.float32(p.presence_penalty) + np.float32(p.frequency_penalty) * counts
        return out

    def _uniform(self) -> np.ndarray:
        """This sequence's next random number, as a batch of one."""
        return np.array([self._rng.random()])

    def _draw(self, scores: np.ndarray) -> int:
        p = self.params
        z = self._scaled  # scratch, so the whole-vocabulary case allocates nothing below
        np.divide(scores, p.temperature, out=z, dtype=np.float64)
        candidates = None  # token ids still in play; None = the whole vocabulary
        if 0 < p.top_k < z.shape[0]:
            candidates = top_indices(z, p.top_k)
            z = z[candidates]
        z -= z.max()
        weights = np.exp(z, out=z)  # relative probabilities; the best token has weight exactly 1
        if p.top_p < 1.0:
            order = _nucleus(weights, p.top_p)
            candidates = order if candidates is None else candidates[order]
            weights = weights[order]
        if p.min_p > 0.0:
            keep = np.flatnonzero(weights >= p.min_p)
            candidates = keep if candidates is None else candidates[keep]
            weights = weights[keep]
        index = _pick(weights, self._rng.random())
        return int(index if candidates is None else candidates[index])

    def _with_logprobs(self, logits: np.ndarray, token: int) -> Sample:
        n_top = self.params.logprobs
        if n_top == 0:
            return Sample(token)
        peak = float(logits.max())
        shifted = self._scaled  # scratch (sampling is done with it)
        np.subtract(logits, peak, out=shifted, dtype=np.float64)
        log_total = peak + math.log(np.exp(shifted, out=shifted).sum())
        top = top_indices(logits, n_top)
        top = top[np.lexsort((top, -logits[top]))]  # best first, lower id on ties
        return Sample(
            token,
            float(logits[token]) - log_total,
            [(int(t), float(logits[t]) - log_total) for t in top],
        )


def choose_batch(samplers: list[Sampler], logits: np.ndarray) -> list[int | None]:
    """Tokens for rows of plain samplers (row i of `logits` is samplers[i]'s), None for the others.

    One arg-max for the greedy rows and one call of the compiled draw for the temperature rows,
    instead of a dozen small numpy calls per sequence. Each sampler's random number is drawn here, in
    the same order as `Sampler.sample` would, so pass the result to `sample(row, token)`.
    """
    logits = np.ascontiguousarray(logits, np.float32)
    chosen: list[int | None] = [None] * len(samplers)
    greedy = [i for i, s in enumerate(samplers) if s.plain and s.params.temperature == 0.0]
    drawn = [i for i, s in enumerate(samplers) if s.plain and s.params.temperature != 0.0]
    if greedy:
        for i, token in zip(greedy, np.argmax(logits[greedy], axis=1).tolist(), strict=True):
            chosen[i] = token
    if drawn:
        temperatures = np.array([samplers[i].params.temperature for i in drawn], np.float64)
        uniforms = np.array([samplers[i]._rng.random() for i in drawn], np.float64)
        tokens = np.empty(len(drawn), np.int64)
        _kernels.draw_rows(logits, np.array(drawn, np.int64), temperatures, uniforms, tokens)
        for i, token in zip(drawn, tokens.tolist(), strict=True):
            chosen[i] = token
    return chosen


def draw_rows(scores: np.ndarray, temperatures: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """One token per row from softmax(scores[i] / temperatures[i]), using uniforms[i] in [0, 1).

    The compiled kernel (`bitnet_grpc.cyext.sampling`): fixed float32/float64 order, no GIL."""
    scores = np.ascontiguousarray(scores, np.float32)
    out = np.empty(scores.shape[0], np.int64)
    rows = np.arange(scores.shape[0], dtype=np.int64)
    temperatures = np.asarray(temperatures, np.float64)
    _kernels.draw_rows(scores, rows, temperatures, np.asarray(uniforms, np.float64), out)
    return out


def pick_rows(weights: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Column i of each row with probability weights[row, i] / sum(row), for u uniform in [0, 1).

    No full sequential pass: one sum per block of _BLOCK columns, a cumulative sum over the block
    totals, then one inside the block where u lands; a few numpy calls for the whole batch. Each
    (row, block) sum is one reduction over that block's contiguous values, and cumulative sums are
    sequential, so a row's result never depends on the other rows.
    """
    n, width = weights.shape
    n_blocks = -(-width // _BLOCK)
    if width != n_blocks * _BLOCK:  # zero weights at the end are never picked
        weights = np.concatenate([weights, np.zeros((n, n_blocks * _BLOCK - width))], axis=1)
    block_cum = np.cumsum(np.add.reduceat(weights, np.arange(0, width, _BLOCK), axis=1), axis=1)
    rows = np.arange(n)
    target = uniforms * block_cum[:, -1]
    block = np.minimum((block_cum <= target[:, None]).sum(axis=1), n_blocks - 1)
    before = np.where(block > 0, block_cum[rows, block - 1], 0.0)
    inner = np.cumsum(weights.reshape(n, n_blocks, _BLOCK)[rows, block], axis=1)
    index = np.minimum((inner <= (target - before)[:, None]).sum(axis=1), _BLOCK - 1)
    picks = block * _BLOCK + index
    for r in np.flatnonzero(weights[rows, picks] == 0.0):  # only rounding can land on a zero weight
        while weights[r, picks[r]] == 0.0 and picks[r] > 0:
            picks[r] -= 1
    return picks


def top_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values (unordered; ties at the cut broken deterministically).

    Cheap for a large vocabulary and small k: the k-th largest of the per-block maxima bounds the k-th
    largest value from below (k blocks each hold a value at least that large), so only values above
    that bound go to argpartition.
    """
    n = values.shape[0]
    if k >= n:
        return np.arange(n)
    n_blocks = n // _BLOCK
    if n_blocks > k:
        block_max = values[: n_blocks * _BLOCK].reshape(n_blocks, _BLOCK).max(axis=1)
        bound = np.partition(block_max, n_blocks - k)[n_blocks - k]
        pool = np.flatnonzero(values >= bound)
    else:
        pool = np.arange(n)
    return pool[np.argpartition(-values[pool], k - 1)[:k]]


def _nucleus(weights: np.ndarray, top_p: float) -> np.ndarray:
    """Indices of the smallest set of most probable tokens holding top_p of the mass.

    `weights` are relative probabilities (maximum 1). Sorting a whole vocabulary costs milliseconds, and
    only the set matters, so tokens are binned by log2(weight) in 1/16 steps: bins entirely above the
    crossing point are in, bins below are out, and only the crossing bin is sorted (best first, lower id
    on ties). Returns the sure members in id order, then the crossing bin's members.
    """
    target = top_p * weights.sum()
    with np.errstate(divide="ignore"):
        bins = np.minimum(-np.log2(weights) * _NUCLEUS_BINS_PER_OCTAVE, _NUCLEUS_LAST_BIN).astype(np.int64)
    mass = np.cumsum(np.bincount(bins, weights=weights, minlength=_NUCLEUS_LAST_BIN + 1))
    edge_bin = min(int(np.searchsorted(mass, target)), _NUCLEUS_LAST_BIN)
    before = mass[edge_bin - 1] if edge_bin else 0.0
    sure = np.flatnonzero(bins < edge_bin)
    edge = np.flatnonzero(bins == edge_bin)
    edge = edge[np.lexsort((edge, -weights[edge]))]
    cut = int(np.searchsorted(np.cumsum(weights[edge]), target - before)) + 1
    return np.concatenate([sure, edge[:cut]])


def _pick(weights: np.ndarray, u: float) -> int:
    """Index i with probability weights[i] / sum, for u uniform in [0, 1) (`pick_rows` on one row)."""
    return int(pick_rows(weights[None], np.array([u]))[0])
