"""What one benchmark request measured, and the report built from all of them.

Latencies are taken on the client when each streamed message arrives, so they include the network and
the server's queueing: what a user of the service sees. Definitions follow common LLM-serving practice:
TTFT = first token's arrival - request start; TPOT = (last token - first token) / (output tokens - 1)
per request; ITL = gap between consecutive token arrivals (a message carrying n tokens counts as n
gaps of 1/n of its delay, so batched messages do not hide latency).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class RequestRecord:
    """Client-side timings of one request (perf_counter seconds)."""

    start: float
    first_token: float | None = None
    last_token: float | None = None
    end: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    inter_token: list[float] = field(default_factory=list)
    error_code: str | None = None

    def on_tokens(self, now: float, count: int) -> None:
        if count <= 0:
            return
        if self.last_token is None:
            self.first_token = now
        else:
            gap = (now - self.last_token) / count
            self.inter_token.extend([gap] * count)
        self.last_token = now
        self.output_tokens += count

    @property
    def ok(self) -> bool:
        return self.error_code is None and self.end is not None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    @property
    def tpot(self) -> float | None:
        if self.first_token is None or self.last_token is None or self.output_tokens < 2:
            return None
        return (self.last_token - self.first_token) / (self.output_tokens - 1)

    @property
    def latency(self) -> float | None:
        return None if self.end is None else self.end - self.start


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not sorted_values:
        return math.nan
    position = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def distribution_ms(values: Sequence[float]) -> dict[str, float | int]:
    """mean, p50, p90, p99 (and count) of seconds values, in milliseconds."""
    ordered = sorted(v * 1000.0 for v in values)
    if not ordered:
        return {"count": 0, "mean": math.nan, "p50": math.nan, "p90": math.nan, "p99": math.nan}
    return {
        "count": len(ordered),
        "mean": sum(ordered) / len(ordered),
        "p50": percentile(ordered, 50),
        "p90": percentile(ordered, 90),
        "p99": percentile(ordered, 99),
    }


def summarize(records: Sequence[RequestRecord], wall_seconds: float) -> dict:
    """The report's numbers: throughput over the whole run, latency distributions over successes."""
    done = [r for r in records if r.ok]
    errors = Counter(r.error_code for r in records if r.error_code is not None)
    output_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.prompt_tokens for r in done)
    wall = max(wall_seconds, 1e-9)
    return {
        "duration_s": wall_seconds,
        "requests_completed": len(done),
        "requests_failed": sum(errors.values()),
        "request_throughput_per_s": len(done) / wall,
        "output_tokens": output_tokens,
        "prompt_tokens": prompt_tokens,
        "output_tokens_per_s": output_tokens / wall,
        "prompt_tokens_per_s": prompt_tokens / wall,
        "ttft_ms": distribution_ms([r.ttft for r in done if r.ttft is not None]),
        "tpot_ms": distribution_ms([r.tpot for r in done if r.tpot is not None]),
        "itl_ms": distribution_ms([gap for r in done for gap in r.inter_token]),
        "e2e_latency_ms": distribution_ms([r.latency for r in done if r.latency is not None]),
        "errors": dict(sorted(errors.items())),
    }


def format_report(report: dict) -> str:
    """A human-readable table of a report made by `summarize` (plus the run's settings)."""
    lines = [
        f"target              {report.get('target', '')}",
        f"load                {report.get('load', '')}",
        f"duration            {report['duration_s']:.2f} s",
        f"requests            {report['requests_completed']} completed, {report['requests_failed']} failed",
        f"request throughput  {report['request_throughput_per_s']:.2f} req/s",
        f"output tokens       {report['output_tokens']} ({report['output_tokens_per_s']:.1f} tok/s)",
        f"prompt tokens       {report['prompt_tokens']} ({report['prompt_tokens_per_s']:.1f} tok/s)",
        "",
        f"{'(ms)':<20}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for key, label in (
        ("ttft_ms", "time to first token"),
        ("tpot_ms", "time per out token"),
        ("itl_ms", "inter-token latency"),
        ("e2e_latency_ms", "request latency"),
    ):
        d = report[key]
        lines.append(f"{label:<20}" + "".join(f"{d[q]:>10.1f}" for q in ("mean", "p50", "p90", "p99")))
    if report["errors"]:
        lines.append("")
        lines.append("errors by status    " + ", ".join(f"{k}: {v}" for k, v in report["errors"].items()))
    return "\n".join(lines)
