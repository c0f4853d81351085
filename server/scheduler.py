"""Continuous batching: one engine thread runs every sequence in flight through shared forward passes.

Each step the engine thread drops cancelled and expired sequences, admits waiting ones into free KV
slots (FIFO), builds one batch of decode rows (one per running sequence) plus prefill chunks of new
arrivals within a token budget, calls `Model.forward` once, and hands each sampled token to that
sequence's own state (its sampler, its detokeniser, its stop strings). Prefill is chunked so that a long
prompt never stalls running streams for more than one step.

Nothing here knows gRPC. Results leave through per-sequence channels (`queue.SimpleQueue`, unbounded: at most
max_tokens events each), so a slow reader never blocks the engine thread or the other sequences.
Batch invariance holds because the model's rows are independent and each sequence samples with its own
seeded state from its own logits row, whatever else is in the batch.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_STEP_TOKENS = 256


class Abort(enum.Enum):
    """Why a sequence ended without finishing; the names match gRPC status codes."""

    CANCELLED = "cancelled"
    DEADLINE_EXCEEDED = "deadline exceeded"
    UNAVAILABLE = "server is shutting down"
    INTERNAL = "internal error"


class QueueFull(Exception):
    """The queue has no room; `retry_after` estimates seconds until a slot frees up."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SequenceDecoder(Protocol):
    """The engine's per-sequence state (`engine.SequenceState`): sampler, detokeniser, stop strings."""

    @property
    def last_token(self) -> int: ...
    @property
    def next_position(self) -> int: ...
    def step(self, logits: np.ndarray, token: int | None = None) -> Any:
        """Sample from this sequence's logits row (or take `token`, chosen from it by the batch
        chooser); returns the client's event (`finish_reason` set on the last one)."""


# Chooses the tokens of a whole batch at once where it can (engine.choose_tokens): row i is the
# i-th decoder's; None leaves that decoder to sample its row itself.
BatchChooser = Callable[[list[Any], np.ndarray], list[int | None]]


class BatchModel(Protocol):
    """What the scheduler needs of `model.Model`: the forward pass and its KV cache slots."""

    kv: Any  # kv_cache.KVCache: alloc() -> slot, free(slot), n_slots

    def forward(
        self, slots: list[int], tokens: list[int], positions: list[int], logit_rows: list[int]
    ) -> np.ndarray: ...


@dataclass(frozen=True)
class Failed:
    """The last event of a sequence that did not finish normally."""

    reason: Abort
    detail: str = ""


@dataclass(slots=True)
class Update:
    """One item of a channel: `event` is the engine's token event or a `Failed`; `time` is monotonic."""

    tag: int
    event: Any
    time: float


@dataclass
class StepTimes:
    """Where the engine thread's time went (seconds, summed over steps): the forward pass, choosing
    and emitting tokens, and the rest of a step (admission, batch building). Read by benchmarks."""

    steps: int = 0
    rows: int = 0  # forward rows (decode tokens and prefill tokens)
    forward: float = 0.0
    sampling: float = 0.0
    scheduling: float = 0.0


@dataclass(eq=False)
class Sequence:
    """One request inside the scheduler. Other threads may only read it, or call `cancel()`."""

    prompt_ids: list[int]
    decoder: SequenceDecoder
    channel: queue.SimpleQueue
    tag: int = 0
    deadline: float | None = None  # time.monotonic() value
    request_id: str = ""
    arrival: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    generated: int = 0
    slot: int | None = None
    prefilled: int = 0
    done: bool = False
    # Set (by the engine thread) after this sequence's last update is in its channel: a reader that
    # sleeps between messages wakes at once for the end instead of sitting out its interval.
    ended: threading.Event | None = None
    _cancelled: bool = False
    _wake: Callable[[], None] | None = None

    def cancel(self) -> None:
        """Ask the engine thread to drop this sequence at its next step (and free its slot)."""
        self._cancelled = True
        if self._wake is not None:
            self._wake()

    @property
    def cancelled(self) -> bool:
        return self._cancelled


class Scheduler:
    """Admission queue plus the engine thread. `submit` is thread-safe; everything else runs inside."""

    def __init__(
        self,
        model: BatchModel,
        *,
        max_batch: int,
        max_queue: int,
        step_tokens: int = DEFAULT_STEP_TOKENS,
        choose: BatchChooser | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"need max_batch >= 1 and max_queue >= 0, got {max_batch}, {max_queue}")
        if step_tokens < max_batch:
            raise ValueError(f"step_tokens ({step_tokens}) must cover one decode row per slot ({max_batch})")
        if max_batch > model.kv.n_slots:
            raise ValueError(f"max_batch {max_batch} exceeds the model's {model.kv.n_slots} KV cache slots")
        self._model = model
        self._choose = choose
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.step_tokens = step_tokens
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._waiting: deque[Sequence] = deque()
        self._active: list[Sequence] = []
        self._running = False
        self._thread: threading.Thread | None = None
        self._step_seconds = 0.05  # moving average, for retry hints
        self.steps = 0
        self.times = StepTimes()

    # ---- called from other threads -------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._running:
                return
            self._running = True
        self._thread = threading.Thread(target=self._run, name="bitnet-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the engine thread; sequences still in flight end with UNAVAILABLE (sent by the thread
        itself when `timeout` runs out before its step does)."""
        with self._work:
            self._running = False
            self._work.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                # Still inside a step: cleaning up here would race it (a slot freed twice, tokens
                # after the last event). The thread fails the leftovers itself when the step ends.
                return
        self._fail_leftovers()

    def _fail_leftovers(self) -> None:
        with self._lock:
            leftovers = list(self._waiting) + self._active
            self._waiting.clear()
            self._active = []
        for seq in leftovers:
            self._release(seq)
            self._finish(seq, Failed(Abort.UNAVAILABLE), time.monotonic())

    def submit(self, sequences: Iterable[Sequence]) -> None:
        """Queue sequences all together, or none: raises QueueFull when they do not all fit."""
        batch = list(sequences)
        with self._work:
            if not self._running:
                raise RuntimeError("scheduler is not running")
            room = self.max_batch + self.max_queue - len(self._active) - len(self._waiting)
            if len(batch) > room:
                raise QueueFull(
                    f"{len(self._active)} sequences running and {len(self._waiting)} waiting "
                    f"(limits: --max-batch {self.max_batch}, --max-queue {self.max_queue})",
                    retry_after=self.retry_after(),
                )
            for seq in batch:
                seq._wake = self._wake
                self._waiting.append(seq)
            self._work.notify_all()

    def queue_depth(self) -> int:
        return len(self._waiting)

    def active_count(self) -> int:
        return len(self._active)

    def idle(self) -> bool:
        with self._lock:
            return not self._waiting and not self._active

    def _wake(self) -> None:
        with self._work:
            self._work.notify_all()

    def retry_after(self) -> float:
        """Rough seconds until a slot frees: a quarter of a typical generation, bounded to [0.1, 10]."""
        return min(10.0, max(0.1, self._step_seconds * 32))

    # ---- the engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._work:
                while self._running and not self._waiting and not self._active:
                    self._work.wait()
                running = self._running
            if not running:
                self._fail_leftovers()
                return
            try:
                self._step()
            except Exception:  # a bug must not kill the engine thread or leave clients hanging
                log.exception("engine step failed; failing the sequences in flight")
                now = time.monotonic()
                with self._lock:
                    failed, self._active = self._active, []
                for seq in failed:
                    try:
                        self._release(seq)
                        self._finish(seq, Failed(Abort.INTERNAL, "engine step failed"), now)
                    except Exception:
                        log.exception("could not fail request %s", seq.request_id)

    def _step(self) -> None:
        begun = now = time.monotonic()
        self._drop_ended(now)
        self._admit(now)
        batch = self._build_batch()
        if batch is None:
            return
        slots, tokens, positions, logit_rows, samplers = batch
        started = time.monotonic()
        logits = self._model.forward(slots, tokens, positions, logit_rows)
        now = time.monotonic()
        self._step_seconds = 0.9 * self._step_seconds + 0.1 * (now - started)
        self.steps += 1
        self._emit(samplers, logits, now)
        times = self.times
        times.steps += 1
        times.rows += len(tokens)
        times.forward += now - started
        times.sampling += time.monotonic() - now
        times.scheduling += started - begun

    def _emit(self, samplers: list[Sequence], logits: np.ndarray, now: float) -> None:
        """Choose each sequence's token from its logits row and hand the event to its channel."""
        chosen: list[int | None] = [None] * len(samplers)
        if self._choose is not None:
            chosen = self._choose([seq.decoder for seq in samplers], logits)
        for row, seq in enumerate(samplers):
            if seq.cancelled:  # cancelled during the forward pass: its token would go nowhere
                continue
            try:
                event = seq.decoder.step(logits[row], chosen[row])
            except Exception:  # one sequence's failure (say, its stop-string code) is its own
                log.exception("sampling failed for request %s", seq.request_id)
                self._retire(seq)
                self._finish(seq, Failed(Abort.INTERNAL, "sampling failed"), now)
                continue
            seq.generated += 1
            if seq.first_token_at is None:
                seq.first_token_at = now
            seq.last_token_at = now
            if getattr(event, "finish_reason", None) is not None:
                self._retire(seq)
                self._finish(seq, event, now)
            else:
                seq.channel.put(Update(seq.tag, event, now))

    def _retire(self, seq: Sequence) -> None:
        """Take a running sequence out of the batch and free its KV slot."""
        with self._lock:
            if seq in self._active:
                self._active.remove(seq)
        self._release(seq)

    def _drop_ended(self, now: float) -> None:
        """Cancelled or expired sequences leave, queued or running; their slots free at once."""

        def ended(seq: Sequence) -> Failed | None:
            if seq.cancelled:
                return Failed(Abort.CANCELLED)
            if seq.deadline is not None and now >= seq.deadline:
                where = "running" if seq.slot is not None else "queued"
                return Failed(Abort.DEADLINE_EXCEEDED, f"deadline passed while {where}")
            return None

        with self._lock:
            dropped = [(s, f) for s in list(self._waiting) + self._active if (f := ended(s)) is not None]
            for seq, _ in dropped:
                if seq.slot is None:
                    self._waiting.remove(seq)
                else:
                    self._active.remove(seq)
        for seq, failure in dropped:
            self._release(seq)
            self._finish(seq, failure, now)

    def _admit(self, now: float) -> None:
        """Move waiting sequences into free slots. A sequence whose slot cannot be had fails here:
        once off the queue it is in no list that a later failure path would reach."""
        refused: list[Sequence] = []
        with self._lock:
            while self._waiting and len(self._active) < self.max_batch:
                seq = self._waiting.popleft()
                try:
                    seq.slot = self._model.kv.alloc()
                except Exception:
                    log.exception("no KV cache slot for request %s", seq.request_id)
                    refused.append(seq)
                    continue
                seq.admitted_at = now
                self._active.append(seq)
        for seq in refused:
            self._finish(seq, Failed(Abort.INTERNAL, "no KV cache slot"), now)

    def _build_batch(self) -> tuple[list[int], list[int], list[int], list[int], list[Sequence]] | None:
        """Decode rows first (one per running sequence), then prefill chunks in admission order. Plain
        lists: Model.forward turns them into its one int32 array (converting here too was a second copy)."""
        slots: list[int] = []
        tokens: list[int] = []
        positions: list[int] = []
        logit_rows: list[int] = []
        samplers: list[Sequence] = []
        decoding = [s for s in self._active if s.prefilled == len(s.prompt_ids)]
        prefilling = [s for s in self._active if s.prefilled < len(s.prompt_ids)]
        for seq in decoding:
            slots.append(seq.slot)
            tokens.append(seq.decoder.last_token)
            positions.append(seq.decoder.next_position)
            logit_rows.append(len(tokens) - 1)
            samplers.append(seq)
        budget = self.step_tokens - len(tokens)
        for seq in prefilling:
            if budget <= 0:
                break
            start = seq.prefilled
            chunk = seq.prompt_ids[start : start + budget]
            slots.extend([seq.slot] * len(chunk))
            tokens.extend(chunk)
            positions.extend(range(start, start + len(chunk)))
            seq.prefilled += len(chunk)
            budget -= len(chunk)
            if seq.prefilled == len(seq.prompt_ids):
                logit_rows.append(len(tokens) - 1)
                samplers.append(seq)
        if not tokens:
            return None
        return slots, tokens, positions, logit_rows, samplers

    def _release(self, seq: Sequence) -> None:
        if seq.slot is not None:
            with self._lock:
                self._model.kv.free(seq.slot)
            seq.slot = None

    def _finish(self, seq: Sequence, last: Any, now: float) -> None:
        if seq.done:
            return
        seq.done = True
        seq.channel.put(Update(seq.tag, last, now))
        if seq.ended is not None:
            seq.ended.set()
