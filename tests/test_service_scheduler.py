"""The continuous-batching scheduler driven in-process (no gRPC): invariance, chunked prefill, limits."""

from __future__ import annotations

import queue
import threading
import time

import pytest
from bitnet_grpc.server.engine import Engine, choose_tokens
from bitnet_grpc.server.sampling import SamplingParams
from bitnet_grpc.server.scheduler import Abort, Failed, QueueFull, Scheduler, Sequence


@pytest.fixture
def engine(service_weights) -> Engine:
    return Engine.from_weights(service_weights, n_slots=4, threads=2)


def make_sequence(engine: Engine, prompt, params: SamplingParams, tag: int = 0, **extra) -> Sequence:
    state = engine.new_sequence(prompt, params)
    return Sequence(state.prompt_ids, state, queue.Queue(), tag=tag, **extra)


def drain(seq: Sequence, timeout: float = 60.0) -> list:
    """All events of a sequence, up to and including its last one."""
    events = []
    while True:
        update = seq.channel.get(timeout=timeout)
        events.append(update)
        if isinstance(update.event, Failed) or update.event.finish_reason is not None:
            return events


def signature(events: list) -> list:
    return [(u.event.token_id, u.event.text, u.event.logprob, u.event.top_logprobs) for u in events]


@pytest.mark.parametrize("choose", [None, choose_tokens], ids=["per-sequence", "batch-chooser"])
def test_chunked_batched_run_equals_the_engine_alone(engine, choose) -> None:
    prompts = [
        "a long prompt that is chunked over many small steps while others decode " * 3,
        "short",
        "a medium prompt, eleven words or so, to mix it up",
        "x",
    ]
    params = [
        SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=3),
        SamplingParams(max_tokens=24, temperature=1.0, seed=5, ignore_eos=True, logprobs=2),
        SamplingParams(
            max_tokens=9, temperature=0.7, top_k=40, top_p=0.9, seed=9, ignore_eos=True, logprobs=1
        ),
        SamplingParams(max_tokens=30, temperature=0, repetition_penalty=1.3, ignore_eos=True, logprobs=1),
    ]
    alone = [
        [(e.token_id, e.text, e.logprob, e.top_logprobs) for e in engine.generate(p, sp)]
        for p, sp in zip(prompts, params, strict=True)
    ]
    scheduler = Scheduler(engine.model, max_batch=3, max_queue=4, step_tokens=7, choose=choose)
    scheduler.start()
    try:
        seqs = [make_sequence(engine, p, sp) for p, sp in zip(prompts, params, strict=True)]
        scheduler.submit(seqs)
        together = [signature(drain(s)) for s in seqs]
    finally:
        scheduler.stop()
    assert together == alone
    assert engine.model.kv.free_slots() == 4


def test_running_streams_keep_flowing_during_a_long_prefill(engine) -> None:
    scheduler = Scheduler(engine.model, max_batch=2, max_queue=0, step_tokens=8)
    scheduler.start()
    try:
        runner = make_sequence(engine, "x", SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        scheduler.submit([runner])
        runner.channel.get(timeout=30)  # decoding
        long_prompt = list(range(1, 141))  # 140 tokens: 20 steps of 7 prompt rows beside the decode row
        newcomer = make_sequence(engine, long_prompt, SamplingParams(max_tokens=1, temperature=0))
        steps_before = scheduler.steps
        scheduler.submit([newcomer])
        first = drain(newcomer)[0]
        prefill_steps = scheduler.steps - steps_before
        assert prefill_steps >= 140 // 7
        # The runner got a token in every step of the newcomer's prefill (at least 140 / 7 of them;
        # `prefill_steps` may also count steps the engine ran before the admission or after the token).
        during = [u for u in drain_available(runner) if u.time <= first.time]
        assert len(during) >= 140 // 7
    finally:
        scheduler.stop()


def drain_available(seq: Sequence) -> list:
    items = []
    while True:
        try:
            items.append(seq.channel.get_nowait())
        except queue.Empty:
            return items


def test_queue_limit_is_all_or_nothing_and_stop_fails_what_is_left(engine) -> None:
    scheduler = Scheduler(engine.model, max_batch=1, max_queue=2)
    scheduler.start()
    long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    seqs = [make_sequence(engine, "x", long) for _ in range(3)]
    scheduler.submit(seqs[:1])
    seqs[0].channel.get(timeout=30)  # running
    with pytest.raises(QueueFull) as full:
        scheduler.submit(seqs[1:] + [make_sequence(engine, "x", long)])  # 3 more do not fit in 2
    assert full.value.retry_after > 0
    assert scheduler.queue_depth() == 0
    scheduler.submit(seqs[1:])
    assert scheduler.queue_depth() == 2
    scheduler.stop()
    for seq in seqs:
        last = drain(seq)[-1].event
        assert last == Failed(Abort.UNAVAILABLE)
    assert engine.model.kv.free_slots() == 4


def test_an_unread_channel_stalls_nobody(engine) -> None:
    scheduler = Scheduler(engine.model, max_batch=2, max_queue=0)
    scheduler.start()
    try:
        ignored = make_sequence(engine, "x", SamplingParams(max_tokens=300, temperature=0, ignore_eos=True))
        reader = make_sequence(engine, "y", SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
        scheduler.submit([ignored, reader])
        assert drain(reader)[-1].event.finish_reason == "length"
        deadline = time.monotonic() + 30
        while scheduler.active_count() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ignored.channel.qsize() == 300  # all produced, none read, engine idle again
    finally:
        scheduler.stop()


def test_deadline_and_cancel_leave_at_the_next_step(engine) -> None:
    scheduler = Scheduler(engine.model, max_batch=1, max_queue=2)
    scheduler.start()
    try:
        long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
        running = make_sequence(engine, "x", long, deadline=time.monotonic() + 0.05)
        queued = make_sequence(engine, "y", long)
        scheduler.submit([running, queued])
        assert drain(running)[-1].event.reason == Abort.DEADLINE_EXCEEDED
        queued.channel.get(timeout=30)  # it got the slot
        steps = scheduler.steps
        queued.cancel()
        assert drain(queued)[-1].event == Failed(Abort.CANCELLED)
        assert scheduler.steps - steps <= 1  # the step under way may finish; the next one drops it
        assert scheduler.idle()
        assert engine.model.kv.free_slots() == 4
    finally:
        scheduler.stop()


def test_a_failed_slot_allocation_fails_the_sequence_it_was_for(engine, monkeypatch) -> None:
    def broken_alloc() -> int:
        raise RuntimeError("no slot for you")

    monkeypatch.setattr(engine.model.kv, "alloc", broken_alloc)
    scheduler = Scheduler(engine.model, max_batch=2, max_queue=2)
    scheduler.start()
    try:
        seq = make_sequence(engine, "x", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
        scheduler.submit([seq])
        last = drain(seq, timeout=10)[-1].event
        assert isinstance(last, Failed) and last.reason == Abort.INTERNAL
        assert scheduler.idle()
    finally:
        scheduler.stop()
    assert engine.model.kv.free_slots() == 4


def test_stop_that_times_out_leaves_the_step_under_way_to_end_its_sequences(engine, monkeypatch) -> None:
    entered, release = threading.Event(), threading.Event()
    forward = engine.model.forward

    def held_forward(*args, **kwargs):
        if not release.is_set():
            entered.set()
            release.wait(30)
        return forward(*args, **kwargs)

    scheduler = Scheduler(engine.model, max_batch=1, max_queue=0)
    scheduler.start()
    seq = make_sequence(engine, "x", SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
    release.set()
    scheduler.submit([seq])
    seq.channel.get(timeout=30)  # decoding
    release.clear()
    monkeypatch.setattr(engine.model, "forward", held_forward)
    assert entered.wait(30)  # the engine thread is inside a forward pass
    scheduler.stop(timeout=0.01)  # gives up waiting for it
    release.set()
    scheduler._thread.join(30)
    assert not scheduler._thread.is_alive()
    updates = drain_available(seq)
    terminal = [i for i, u in enumerate(updates) if isinstance(u.event, Failed) or u.event.finish_reason]
    assert terminal == [len(updates) - 1]  # one last event, and nothing after it
    assert updates[-1].event == Failed(Abort.UNAVAILABLE)
    assert engine.model.kv.free_slots() == 4
