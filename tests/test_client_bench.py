"""The load generator against a real server: its counts agree with the server's own metrics, the
report's numbers are consistent, and `bench --json` writes the report. Short runs only: speed itself is
measured by hand (see README), never asserted here."""

from __future__ import annotations

import io
import json
import math

import pytest
from bitnet_grpc.client import Client
from bitnet_grpc.client.bench import BenchConfig, run_bench
from bitnet_grpc.client.bench_stats import RequestRecord, percentile, summarize
from bitnet_grpc.client.cli import main
from test_client import address, running_server


@pytest.fixture(scope="module")
def server():
    with running_server() as service:
        yield service


def generate_calls(service, code: str = "OK") -> int:
    labels = {"method": "Generate", "code": code}
    return int(service.metrics.registry.get_sample_value("bitnet_requests_total", labels) or 0)


def generated_tokens(service) -> int:
    return int(service.metrics.registry.get_sample_value("bitnet_generated_tokens_total") or 0)


def test_fixed_concurrency_run_agrees_with_server_metrics(server):
    calls, tokens = generate_calls(server), generated_tokens(server)
    progress = io.StringIO()
    report = run_bench(
        BenchConfig(target=address(server), concurrency=4, duration=3.0, input_len=8, output_len=8),
        progress_stream=progress,
    )
    completed = report["requests_completed"]
    assert completed > 0 and report["requests_failed"] == 0 and report["errors"] == {}
    assert generate_calls(server) - calls == completed
    assert generated_tokens(server) - tokens == report["output_tokens"] == completed * 8
    assert report["prompt_tokens"] == completed * 8
    assert report["requests_issued"] == completed
    assert report["request_throughput_per_s"] == pytest.approx(completed / report["duration_s"])
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_latency_ms"):
        d = report[key]
        assert d["count"] > 0 and 0 < d["p50"] <= d["p90"] <= d["p99"], (key, d)
    assert report["ttft_ms"]["mean"] <= report["e2e_latency_ms"]["mean"]
    # 8 tokens give 7 gaps, fewer when the server packs several tokens into a message under load.
    assert completed <= report["itl_ms"]["count"] <= completed * 7
    assert "done" in progress.getvalue()


def test_poisson_run_with_a_request_count_and_json_report(server, tmp_path, capsys):
    calls = generate_calls(server)
    path = tmp_path / "report.json"
    argv = ["bench", "--target", address(server), "--rate", "20", "--requests", "12", "--input-len", "4"]
    argv += ["--output-len", "4", "--json", str(path), "-q"]
    assert main(argv) == 0
    report = json.loads(path.read_text())
    assert report["requests_issued"] == 12 and report["requests_completed"] == 12
    assert generate_calls(server) - calls == 12
    assert report["config"]["rate"] == 20 and "Poisson" in report["load"]
    assert "time to first token" in capsys.readouterr().out


def test_bench_counts_errors_by_status_code(server):
    with Client(address(server)) as c:
        context = c.model_info().context_size
    # Every request asks for more tokens than the context holds: all fail, all are counted.
    report = run_bench(
        BenchConfig(target=address(server), concurrency=2, requests=5, input_len=4, output_len=context + 1),
        progress_stream=None,
    )
    assert report["requests_completed"] == 0 and report["errors"] == {"INVALID_ARGUMENT": 5}


def test_statistics_by_hand():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0 and math.isnan(percentile([], 50))
    record = RequestRecord(start=0.0)
    record.on_tokens(0.5, 1)
    record.on_tokens(0.7, 2)  # one message with two tokens: two gaps of 0.1 s
    record.end = 0.8
    assert (
        record.ttft == 0.5
        and record.tpot == pytest.approx(0.1)
        and record.inter_token == pytest.approx([0.1, 0.1])
    )
    failed = RequestRecord(start=0.0, error_code="UNAVAILABLE")
    report = summarize([record, failed], wall_seconds=2.0)
    assert report["requests_completed"] == 1 and report["errors"] == {"UNAVAILABLE": 1}
    assert report["output_tokens_per_s"] == 1.5 and report["ttft_ms"]["p50"] == 500.0
