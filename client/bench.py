"""Load generator: many concurrent streams against a running server, measured on the client.

Two ways to apply load: a fixed number of streams always in flight (closed loop: each finished request
starts the next), or requests arriving as a Poisson process at a set rate (open loop: arrivals do not
wait for the server, so queueing shows up in TTFT). The run ends after a duration or a request count;
requests already started then run to completion so every request is counted exactly once, which is
what lets the completed count be compared with the server's own metrics.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

from bitnet_grpc.client.async_client import AsyncClient
from bitnet_grpc.client.bench_stats import RequestRecord, summarize
from bitnet_grpc.client.errors import BitnetError
from bitnet_grpc.client.params import GenerationParams, Prompt


@dataclass(frozen=True)
class BenchConfig:
    target: str | Sequence[str]
    concurrency: int = 8  # streams in flight; with a rate, a cap on them (0 = none)
    rate: float | None = None  # requests per second (Poisson); None = fixed concurrency
    duration: float | None = None  # seconds of issuing requests
    requests: int | None = None  # or a request count
    prompts_file: str | None = None
    input_len: int = 32
    output_len: int = 64
    ignore_eos: bool = True
    temperature: float | None = None
    seed: int = 0
    request_timeout: float = 600.0
    retries: int = 0  # 0: every failure is counted, not hidden by a retry
    progress_interval: float = 1.0

    def __post_init__(self) -> None:
        if self.concurrency < (1 if self.rate is None else 0):
            raise ValueError("concurrency must be >= 1 (or 0 = no cap with a rate)")
        if self.rate is not None and not self.rate > 0:
            raise ValueError("rate must be > 0 requests per second")
        if self.duration is None and self.requests is None:
            raise ValueError("give a duration or a request count")
        if self.duration is not None and not self.duration > 0:
            raise ValueError("duration must be > 0 seconds")
        if self.requests is not None and self.requests < 1:
            raise ValueError("requests must be >= 1")
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError("input_len and output_len must be >= 1")

    def describe_load(self) -> str:
        if self.rate is not None:
            cap = f", at most {self.concurrency} in flight" if self.concurrency else ""
            load = f"Poisson arrivals at {self.rate:g} req/s{cap}"
        else:
            load = f"{self.concurrency} concurrent streams"
        until = f"{self.duration:g} s" if self.duration is not None else ""
        if self.requests is not None:
            until = f"{until} or {self.requests} requests" if until else f"{self.requests} requests"
        source = self.prompts_file or f"synthetic {self.input_len}-token prompts"
        return f"{load} for {until}; {source}, {self.output_len} output tokens"


def read_prompts(path: str) -> list[str]:
    """Prompts from a file: one per line, or JSON lines with a "prompt" field (files ending .jsonl)."""
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.endswith(".jsonl"):
        return [json.loads(line)["prompt"] for line in lines]
    return lines


def synthetic_prompts(
    count: int, length: int, vocab_size: int, avoid: set[int], rng: random.Random
) -> list[list[int]]:
    """Random token-id prompts of exactly `length` tokens, skipping BOS and stop tokens, so the
    input length is exact whatever the tokenizer does with text."""
    choices = [t for t in range(min(vocab_size, 1 << 20)) if t not in avoid]
    return [[rng.choice(choices) for _ in range(length)] for _ in range(count)]


class Progress:
    """One status line on stderr, rewritten in place on a terminal, appended otherwise."""

    def __init__(self, stream: TextIO, started: float) -> None:
        self.stream = stream
        self.started = started
        self.tty = stream.isatty()

    def show(self, records: list[RequestRecord], in_flight: int, final: bool = False) -> None:
        elapsed = time.perf_counter() - self.started
        done = sum(1 for r in records if r.ok)
        failed = sum(1 for r in records if r.error_code is not None)
        tokens = sum(r.output_tokens for r in records)
        line = (
            f"[{elapsed:7.1f} s] done {done}  failed {failed}  in flight {in_flight}  "
            f"output {tokens} tok ({tokens / max(elapsed, 1e-9):.1f} tok/s)"
        )
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


class BenchRun:
    def __init__(self, config: BenchConfig, progress_stream: TextIO | None = sys.stderr) -> None:
        self.config = config
        self.progress_stream = progress_stream
        self.records: list[RequestRecord] = []
        self.in_flight = 0
        self.issued = 0
        self.prompts: list[Prompt] = []
        self.params: dict = {}

    def _more(self, started: float, issued: int) -> bool:
        """Whether another request may start: neither the count nor the duration is used up."""
        c = self.config
        if c.requests is not None and issued >= c.requests:
            return False
        return c.duration is None or time.perf_counter() - started < c.duration

    async def _one(self, client: AsyncClient) -> None:
        prompt = self.prompts[self.issued % len(self.prompts)]
        self.issued += 1
        record = RequestRecord(start=time.perf_counter())
        self.records.append(record)
        self.in_flight += 1
        try:
            async for chunk in client.generate(prompt, **self.params):
                record.on_tokens(time.perf_counter(), len(chunk.token_ids))
                if chunk.usage is not None:
                    record.prompt_tokens = chunk.usage.prompt_tokens
            record.end = time.perf_counter()
        except BitnetError as exc:
            record.error_code = exc.code.name
        finally:
            self.in_flight -= 1

    async def _closed_loop(self, client: AsyncClient, started: float) -> None:
        async def worker() -> None:
            while self._more(started, self.issued):
                await self._one(client)

        await asyncio.gather(*(worker() for _ in range(self.config.concurrency)))

    async def _open_loop(self, client: AsyncClient, started: float) -> None:
        rng = random.Random(self.config.seed + 1)
        gate = asyncio.Semaphore(self.config.concurrency) if self.config.concurrency else None
        tasks = []

        async def gated() -> None:
            if gate is None:
                await self._one(client)
                return
            async with gate:
                await self._one(client)

        next_arrival = started
        while self._more(started, len(tasks)):
            tasks.append(asyncio.create_task(gated()))
            next_arrival += rng.expovariate(self.config.rate)
            delay = next_arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        await asyncio.gather(*tasks)

    async def _report_progress(self, started: float) -> None:
        progress = Progress(self.progress_stream, started)
        try:
            while True:
                await asyncio.sleep(self.config.progress_interval)
                progress.show(self.records, self.in_flight)
        except asyncio.CancelledError:
            progress.show(self.records, self.in_flight, final=True)
            raise

    async def run(self) -> dict:
        c = self.config
        async with AsyncClient(c.target, timeout=c.request_timeout, retries=c.retries) as client:
            info = await client.model_info()
            rng = random.Random(c.seed)
            if c.prompts_file:
                self.prompts = list(read_prompts(c.prompts_file))
                if not self.prompts:
                    raise ValueError(f"{c.prompts_file} has no prompts")
            else:
                count = min(c.requests or 256, 256)
                avoid = {info.bos_token_id, *info.stop_token_ids}
                self.prompts = synthetic_prompts(count, c.input_len, info.vocab_size, avoid, rng)
            self.params = {"max_tokens": c.output_len, "ignore_eos": c.ignore_eos}
            if c.temperature is not None:
                self.params["temperature"] = c.temperature
            GenerationParams(**self.params)  # fail before the run, not in every request
            started = time.perf_counter()
            progress = None
            if self.progress_stream is not None:
                progress = asyncio.create_task(self._report_progress(started))
            try:
                if c.rate is None:
                    await self._closed_loop(client, started)
                else:
                    await self._open_loop(client, started)
            finally:
                if progress is not None:
                    progress.cancel()
                    await asyncio.gather(progress, return_exceptions=True)
            wall = time.perf_counter() - started
        report = summarize(self.records, wall)
        report.update(
            target=c.target if isinstance(c.target, str) else ",".join(c.target),
            load=c.describe_load(),
            requests_issued=self.issued,
            config=asdict(c),
            model={
                "architecture": info.architecture,
                "parameters": info.parameter_count,
                "path": info.model_path,
            },
        )
        return report


def run_bench(config: BenchConfig, progress_stream: TextIO | None = sys.stderr) -> dict:
    """Run a benchmark to the end and return its report (see bench_stats.summarize for the fields)."""
    return asyncio.run(BenchRun(config, progress_stream).run())
