"""Where a serving step's time goes, measured in-process (no gRPC): the engine thread's split between the
forward pass, sampling and scheduling, and the forward pass split by kernel, at each concurrency.

Run by `benchmarks/serving.py --breakdown` after its gRPC rounds; comparing its tokens/s with the gRPC
numbers shows what the RPC layer (and a client sharing the cores) costs.
"""

from __future__ import annotations

import argparse
import queue
import random
import threading
import time
from collections import defaultdict

import numpy as np
from bitnet_grpc.cyext import floatops, ternary
from bitnet_grpc.server.engine import Engine, choose_tokens
from bitnet_grpc.server.sampling import SamplingParams
from bitnet_grpc.server.scheduler import Scheduler, Sequence, StepTimes


def closed_loop(engine: Engine, scheduler: Scheduler, args: argparse.Namespace, streams: int) -> dict:
    """`streams` threads, each submitting its next request when the previous one ends."""
    rng = random.Random(streams)
    avoid = set(engine.stop_ids) | {engine.tokenizer.bos_id}
    choices = [t for t in range(engine.tokenizer.vocab_size) if t not in avoid]
    temperature = 1.0 if args.temperature is None else args.temperature
    end = time.monotonic() + args.duration
    generated = [0] * streams

    def client(i: int) -> None:
        while time.monotonic() < end:
            prompt = [rng.choice(choices) for _ in range(args.input_len)]
            params = SamplingParams(max_tokens=args.output_len, temperature=temperature, ignore_eos=True)
            state = engine.new_sequence(prompt, params)
            seq = Sequence(state.prompt_ids, state, queue.SimpleQueue(), ended=threading.Event())
            scheduler.submit([seq])
            seq.ended.wait()
            generated[i] += len(state.generated)

    before = StepTimes(**vars(scheduler.times))
    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    after = scheduler.times
    steps = max(after.steps - before.steps, 1)
    per_step = {
        name: (getattr(after, name) - getattr(before, name)) / steps * 1e3
        for name in ("forward", "sampling", "scheduling")
    }
    per_step["idle"] = wall * 1e3 / steps - sum(per_step.values())
    return {
        "tokens_per_s": sum(generated) / wall,
        "steps": steps,
        "rows_per_step": (after.rows - before.rows) / steps,
        "ms_per_step": per_step,
    }


def kernel_times(engine: Engine, rows: int, position: int, repeats: int = 50) -> dict[str, float]:
    """Milliseconds per forward pass of `rows` decode rows, by kernel (wrapped module functions)."""
    model = engine.model
    spent: dict[str, float] = defaultdict(float)
    patched: list[tuple[object, str, object]] = []

    def timed(name: str, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t

        return wrapper

    for module in (floatops, ternary):
        for name in dir(module):
            fn = getattr(module, name)
            if callable(fn) and not name.startswith("_") and not isinstance(fn, type):
                patched.append((module, name, fn))
                setattr(module, name, timed(name, fn))
    if hasattr(model, "gate"):  # bound once at load
        patched.append((model, "gate", model.gate))
        model.gate = timed(getattr(model.gate, "__name__", "gate"), model.gate)
    slots = np.arange(rows, dtype=np.int32)
    tokens = np.full(rows, 7, np.int32)
    positions = np.full(rows, position, np.int32)
    logit_rows = np.arange(rows, dtype=np.int32)
    out = np.empty((rows, engine.config.vocab_size), np.float32)
    try:
        for _ in range(5):
            model.forward(slots, tokens, positions, logit_rows, out=out)
        spent.clear()
        t = time.perf_counter()
        for _ in range(repeats):
            model.forward(slots, tokens, positions, logit_rows, out=out)
        total = time.perf_counter() - t
    finally:
        for owner, name, fn in reversed(patched):
            setattr(owner, name, fn)
    result = {name: s / repeats * 1e3 for name, s in sorted(spent.items(), key=lambda kv: -kv[1])}
    result["other (python, numpy adds, timing)"] = (total - sum(spent.values())) / repeats * 1e3
    result["forward total"] = total / repeats * 1e3
    return result


def engine_breakdown(args: argparse.Namespace) -> dict:
    levels = sorted(args.concurrency)
    engine = Engine.load(args.model, n_slots=max(levels), threads=args.threads)
    scheduler = Scheduler(engine.model, max_batch=max(levels), max_queue=max(levels), choose=choose_tokens)
    scheduler.start()
    result: dict = {"closed_loop": {}, "kernels_ms": {}}
    try:
        for c in levels:  # warm-up
            closed_loop(engine, scheduler, argparse.Namespace(**{**vars(args), "duration": 1.0}), c)
        for c in levels:
            run = result["closed_loop"][c] = closed_loop(engine, scheduler, args, c)
            split = ", ".join(f"{k} {v:.3f}" for k, v in run["ms_per_step"].items())
            print(
                f"in-process concurrency {c:>3}: {run['tokens_per_s']:8.1f} tok/s, "
                f"{run['rows_per_step']:.1f} rows/step, ms per step: {split}",
                flush=True,
            )
    finally:
        scheduler.stop()
    position = args.input_len + args.output_len // 2
    for c in levels:
        times = result["kernels_ms"][c] = kernel_times(engine, c, position)
        split = ", ".join(f"{k} {v:.3f}" for k, v in times.items())
        print(f"forward of {c:>3} decode rows at position {position}, ms: {split}", flush=True)
    return result
