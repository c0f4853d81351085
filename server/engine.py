"""In-process text generation: a loaded model, its tokenizer, and the per-sequence state machine.

Two ways in:
- `Engine.generate(prompt, params)` runs one sequence on the calling thread (prefill in chunks, then one
  forward call per token) and yields a `GenerationEvent` per token;
- the gRPC scheduler runs many sequences through shared `Model.forward` calls; it reuses the same
  per-sequence piece, `SequenceState.step(logits_row)`, which samples, detokenises, matches stop strings
  and decides when the sequence is finished.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from bitnet_grpc.server.model import Model
from bitnet_grpc.server.sampling import Sampler, SamplingParams, choose_batch
from bitnet_grpc.server.tokenizer import IncrementalDecoder, Tokenizer
from bitnet_grpc.server.weights import ModelWeights

DEFAULT_MODEL = Path(__file__).resolve().parent / "data" / "default-model.gguf"
PREFILL_CHUNK = 64  # prompt rows per forward call


@dataclass(slots=True)
class GenerationEvent:
    """One generated token. `text` is the new complete text (never half a UTF-8 character, never part of
    a stop string); `finish_reason` is set on the last event only: "length" (max_tokens), "stop" (a stop
    token), "stop_sequence" (a stop string) or "context_full" (no room left in the context)."""

    token_id: int
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None


class StopMatcher:
    """Finds stop strings in streamed text, across token boundaries.

    Text that could be the beginning of a stop string is held back until the following text rules it
    in or out, so a stop string is never partly emitted.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string was found).

        On a match, the text before the earliest stop string is returned and the rest is dropped.
        """
        if not self.stops:
            return text, False
        buffer = self._held + text
        hits = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            return buffer[: min(hits)], True
        keep = max(self._longest_prefix_suffix(buffer, s) for s in self.stops)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    @staticmethod
    def _longest_prefix_suffix(buffer: str, stop: str) -> int:
        """Length of the longest end of `buffer` that is a proper beginning of `stop`."""
        last = buffer[-1:] if buffer else ""
        for length in range(min(len(stop) - 1, len(buffer)), 0, -1):
            if stop[length - 1] == last and buffer.endswith(stop[:length]):
                return length
        return 0

    def flush(self) -> str:
        """The held-back text, once no more text will come (it did not turn into a stop string)."""
        text, self._held = self._held, ""
        return text


class SequenceState:
    """Everything one sequence carries between steps: ids, sampler, decoder, stop strings, KV slot.

    `step(logits_row)` consumes the logits predicting the next token and returns its event. The caller
    feeds `last_token` at `next_position` into the next forward call until `finish_reason` is set.
    """

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        tokenizer: Tokenizer,
        *,
        ctx_size: int,
        vocab_size: int,
        stop_ids: list[int],
        slot: int | None = None,
    ) -> None:
        """vocab_size is the model's; ids from the tokenizer's size up (padding rows some files carry)
        have no text and are never sampled."""
        params.validate()
        if not prompt_ids:
            raise ValueError("prompt is empty: at least one token is needed")
        if len(prompt_ids) > ctx_size:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens, more than the context size {ctx_size}")
        bad = next((t for t in prompt_ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary (0..{vocab_size - 1})")
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.params = params
        self.ctx_size = ctx_size
        self.slot = slot
        self.generated: list[int] = []
        self.sampler = Sampler(params, vocab_size, self.prompt_ids)
        # Control tokens (end of turn, ...) are markup, not text: they never show in the output.
        self.decoder: IncrementalDecoder = tokenizer.incremental_decoder(skip_special=True)
        self.stops = StopMatcher(list(params.stop))
        self.stop_ids = frozenset() if params.ignore_eos else frozenset(stop_ids)
        self.text_vocab = min(tokenizer.vocab_size, vocab_size)
        self.finish_reason: str | None = None

    @property
    def last_token(self) -> int:
        """The token to feed next (the last generated one)."""
        return self.generated[-1]

    @property
    def next_position(self) -> int:
        """Where `last_token` goes in the KV cache."""
        return len(self.prompt_ids) + len(self.generated) - 1

    def mask_padding(self, logits: np.ndarray) -> None:
        """Ids without text are never sampled (the row is this sequence's own: masked in place)."""
        if self.text_vocab < logits.shape[-1]:
            logits[..., self.text_vocab :] = -np.inf

    def step(self, logits: np.ndarray, token: int | None = None) -> GenerationEvent:
        """Sample one token from this sequence's logits row and turn it into an event.

        The row belongs to this sequence for the call (it may be modified in place). `token`: already
        chosen from this row by `choose_tokens`."""
        if self.finish_reason is not None:
            raise RuntimeError("the sequence has already finished")
        self.mask_padding(logits)
        sample = self.sampler.sample(logits, token)
        token = sample.token_id
        self.generated.append(token)
        finish = None
        if token in self.stop_ids:
            text, finish = "", "stop"
        else:
            text, hit = self.stops.push(self.decoder.push(token))
            if hit:
                finish = "stop_sequence"
            elif len(self.generated) >= self.params.max_tokens:
                finish = "length"
            elif self.next_position >= self.ctx_size:
                finish = "context_full"
        if finish is not None and finish != "stop_sequence":
            tail, hit = self._final_text()
            text += tail
            if hit:  # the flushed text completed a stop string: that is what ended the sequence
                finish = "stop_sequence"
        self.finish_reason = finish
        return GenerationEvent(token, text, sample.logprob, sample.top_logprobs, finish)

    def _final_text(self) -> tuple[str, bool]:
        """Everything still held back when the sequence ends: unfinished UTF-8 (as U+FFFD) and text
        that was waiting to see whether it starts a stop string; True when that completed one."""
        tail, hit = self.stops.push(self.decoder.flush())
        return (tail, True) if hit else (tail + self.stops.flush(), False)


def choose_tokens(states: list[SequenceState], logits: np.ndarray) -> list[int | None]:
    """The next tokens of a batch (row i of `logits` is states[i]'s), chosen together where the
    sampling allows (`sampling.choose_batch`); None for a state to sample on its own in `step`."""
    if any(state.text_vocab < logits.shape[1] for state in states):
        for state, row in zip(states, logits, strict=True):
            state.mask_padding(row)
    return choose_batch([state.sampler for state in states], logits)


class Engine:
    """A model ready to generate: packed weights, KV cache slots and the tokenizer.

    `generate` runs on the calling thread and uses the model's shared scratch buffers: one call at a
    time per Engine. Concurrent requests go through the scheduler, which batches them into one
    `Model.forward` per step.
    """

    def __init__(self, model: Model, tokenizer: Tokenizer, *, source: str = "") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.source = source
        self.config = model.config
        self.ctx_size = model.ctx_size
        stop_ids = tokenizer.stop_ids or ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
        self.stop_ids = [int(t) for t in stop_ids]
        self._logits = np.empty((1, model.config.vocab_size), np.float32)

    @classmethod
    def load(
        cls,
        path: str | None = None,
        *,
        ctx_size: int | None = None,
        n_slots: int = 1,
        threads: int | None = None,
    ) -> Engine:
        """Load a GGUF file or Hugging Face folder (default: the model shipped with the package)."""
        from bitnet_grpc.server.loader import load_weights

        if path is None:
            if not DEFAULT_MODEL.exists():
                raise FileNotFoundError(
                    f"no model path given and the built-in default model is missing ({DEFAULT_MODEL}); "
                    "pass the path of a GGUF file or Hugging Face folder"
                )
            path = str(DEFAULT_MODEL)
        weights = load_weights(path)
        return cls.from_weights(weights, ctx_size=ctx_size, n_slots=n_slots, threads=threads)

    @classmethod
    def from_weights(
        cls,
        weights: ModelWeights,
        *,
        ctx_size: int | None = None,
        n_slots: int = 1,
        threads: int | None = None,
    ) -> Engine:
        """Build from an already loaded ModelWeights (ctx_size defaults to the model's context length)."""
        ctx = int(ctx_size or weights.config.context_length)
        if ctx < 1:
            raise ValueError(f"ctx_size must be >= 1, got {ctx}")
        tokenizer = Tokenizer.from_spec(weights.tokenizer)
        if tokenizer.vocab_size > weights.config.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} tokens but the model only {weights.config.vocab_size}"
            )
        model = Model(weights, n_slots=n_slots, ctx_size=ctx, threads=threads)
        return cls(model, tokenizer, source=weights.source)

    # ---- per-sequence state -------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt: text is tokenised the model's way (BOS as the model wants it, special
        tokens written in the text stay plain text); a list of ids is taken as is."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def new_sequence(
        self, prompt: str | list[int], params: SamplingParams, slot: int | None = None
    ) -> SequenceState:
        """The state of a new sequence (raises ValueError for bad parameters or a prompt that does not
        fit the context)."""
        return SequenceState(
            self.encode_prompt(prompt),
            params,
            self.tokenizer,
            ctx_size=self.ctx_size,
            vocab_size=self.config.vocab_size,
            stop_ids=self.stop_ids,
            slot=slot,
        )

    # ---- one sequence on the calling thread ---------------------------------------------------------

    def prefill(self, seq: SequenceState, out: np.ndarray | None = None) -> np.ndarray:
        """Run the prompt through the model in chunks; return the logits of its last token [1, vocab]."""
        ids = np.asarray(seq.prompt_ids, np.int32)
        n = ids.shape[0]
        slots = np.full(min(n, PREFILL_CHUNK), seq.slot, np.int32)
        logits = None
        for start in range(0, n, PREFILL_CHUNK):
            end = min(start + PREFILL_CHUNK, n)
            last = end == n
            logits = self.model.forward(
                slots[: end - start],
                ids[start:end],
                np.arange(start, end, dtype=np.int32),
                np.array([end - start - 1] if last else [], np.int32),
                out=out if last else None,
            )
        return logits

    def generate(
        self, prompt: str | list[int], params: SamplingParams | None = None
    ) -> Iterator[GenerationEvent]:
        """Generate from one prompt; one event per token, the last with its finish reason.

        Validation (parameters, prompt length) happens before the first event. The KV slot is taken
        when generation starts and returned when the iterator finishes or is closed.
        """
        seq = self.new_sequence(prompt, params if params is not None else SamplingParams())
        return self._run(seq)

    def _run(self, seq: SequenceState) -> Iterator[GenerationEvent]:
        seq.slot = self.model.kv.alloc()
        try:
            logits = self.prefill(seq, out=self._logits)
            slot = np.array([seq.slot], np.int32)
            token = np.zeros(1, np.int32)
            position = np.zeros(1, np.int32)
            row = np.zeros(1, np.int32)
            while True:
                event = seq.step(logits[0])
                yield event
                if event.finish_reason is not None:
                    return
                token[0] = seq.last_token
                position[0] = seq.next_position
                logits = self.model.forward(slot, token, position, row, out=self._logits)
        finally:
            self.model.kv.free(seq.slot)
            seq.slot = None
