"""Many calls at once: batch invariance through the whole stack, overload, health under load, mass cancel."""

from __future__ import annotations

import time

import grpc
import pytest
from bitnet_grpc.proto import generation_pb2 as pb
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status

SERVING = health_pb2.HealthCheckResponse.SERVING
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()


def varied_requests(n: int) -> list[pb.GenerateRequest]:
    """Different prompt lengths and output lengths, so sequences join and leave the batch at different
    steps; some greedy, some sampled with a seed; all with logprobs so floats are compared too."""
    requests = []
    for i in range(n):
        prompt = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + (i * 7) % 23))
        sampled = i % 3 == 2
        requests.append(
            pb.GenerateRequest(
                prompt=prompt,
                max_tokens=8 + (i * 5) % 17,
                temperature=0.9 if sampled else 0.0,
                seed=1000 + i,
                ignore_eos=True,
                logprobs=2,
            )
        )
    return requests


def outcome(messages) -> tuple:
    """Everything a client can see of a stream except timings: ids, text, logprobs, finish."""
    logprobs = [
        (lp.chosen.token_id, lp.chosen.logprob, tuple((t.token_id, t.logprob) for t in lp.top))
        for m in messages
        for lp in m.logprobs
    ]
    return (
        [t for m in messages for t in m.token_ids],
        "".join(m.text for m in messages),
        logprobs,
        messages[-1].finish_reason,
    )


def test_concurrent_and_batched_results_equal_each_request_alone(make_server) -> None:
    # A small step budget chunks the longer prompts' prefill between other sequences' decode rows.
    server = make_server(max_batch=8, max_queue=24, step_tokens=12)
    requests = varied_requests(32)
    alone = [outcome(list(server.stub.Generate(r))) for r in requests]

    calls = [server.stub.Generate(r) for r in requests]  # all 32 in flight at once
    together = [outcome(list(c)) for c in calls]
    for i, (a, b) in enumerate(zip(alone, together, strict=True)):
        assert a == b, f"request {i} differs when run beside others"

    replies = list(server.stub.GenerateBatch(pb.GenerateBatchRequest(requests=requests)))
    per_index: dict[int, list] = {}
    for reply in replies:
        assert not reply.HasField("error")
        per_index.setdefault(reply.index, []).append(reply.response)
    assert [outcome(per_index[i]) for i in range(len(requests))] == alone


def _timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def test_overload_is_refused_at_once_with_retry_info_while_health_answers(make_server) -> None:
    server = make_server(max_batch=2, max_queue=2)
    server.slow_down(0.005)  # 4 x 100 tokens take about a second: the checks below happen under load
    long = pb.GenerateRequest(prompt="x", max_tokens=100, temperature=0, ignore_eos=True)
    calls = [server.stub.Generate(long) for _ in range(4)]
    scheduler = server.backend.scheduler
    assert server.wait_until(lambda: scheduler.active_count() == 2 and scheduler.queue_depth() == 2)

    started = time.perf_counter()
    with pytest.raises(grpc.RpcError) as info:
        list(server.stub.Generate(long))
    assert time.perf_counter() - started < 1.0  # refused at once, not after waiting
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    retry = error_details_pb2.RetryInfo()
    assert any(d.Unpack(retry) for d in rpc_status.from_call(info.value).details)
    assert retry.retry_delay.ToTimedelta().total_seconds() > 0
    with pytest.raises(grpc.RpcError) as batch_info:
        list(server.stub.GenerateBatch(pb.GenerateBatchRequest(requests=[long])))
    assert batch_info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    # Health checks and unary calls find a thread and answer promptly while the 4 streams run.
    latencies = []
    for _ in range(5):
        latencies.append(_timed(lambda: server.health.Check(health_pb2.HealthCheckRequest(), timeout=1)))
        latencies.append(_timed(lambda: server.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=1)))
    assert scheduler.active_count() == 2, "the measurement must happen under load"
    assert max(latencies) < 0.1, latencies

    for call in calls:
        assert list(call)[-1].finish_reason == pb.FINISH_REASON_LENGTH
    # Once the streams are done, every call succeeds again: a full house at once, then more.
    later = [server.stub.Generate(pb.GenerateRequest(prompt="y", max_tokens=4)) for _ in range(4)]
    for call in later:
        assert list(call)[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
    for _ in range(3):
        out = list(server.stub.Generate(pb.GenerateRequest(prompt="w", max_tokens=4)))
        assert out[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED


def test_health_answers_with_40_streams_on_4_slots(make_server) -> None:
    server = make_server(max_batch=4, max_queue=36)
    server.slow_down(0.002)
    request = pb.GenerateRequest(prompt="x", max_tokens=24, temperature=0, ignore_eos=True)
    calls = [server.stub.Generate(request) for _ in range(40)]
    scheduler = server.backend.scheduler
    assert server.wait_until(lambda: server.service.servicer.open_units() == 40)
    latencies = []
    while scheduler.queue_depth() > 8:
        latencies.append(
            _timed(
                lambda: server.health.Check(health_pb2.HealthCheckRequest(service="bitnet.v1.TextGeneration"))
            )
        )
        time.sleep(0.02)
    assert latencies, "the streams finished before health could be checked under load"
    assert max(latencies) < 0.5, latencies
    assert all(list(c)[-1].finish_reason == pb.FINISH_REASON_LENGTH for c in calls)


def test_cancelling_50_streams_frees_every_slot(make_server) -> None:
    server = make_server(max_batch=8, max_queue=42)
    room = server.backend.limits.context_size - 8
    request = pb.GenerateRequest(prompt="x", max_tokens=room, temperature=0, ignore_eos=True)
    calls = [server.stub.Generate(request) for _ in range(50)]
    scheduler = server.backend.scheduler
    assert server.wait_until(lambda: server.service.servicer.open_units() == 50)
    # Mid-generation: every running sequence has produced tokens. (Reading a call here could pick one
    # still queued, and that would wait for the running ones to finish.)
    assert server.wait_until(lambda: server.metric("bitnet_generated_tokens_total") >= 8 * 4)
    assert scheduler.active_count() == 8
    for call in calls:
        call.cancel()
    assert server.wait_until(lambda: server.metric("bitnet_active_sequences") == 0)
    assert server.metric("bitnet_queue_depth") == 0
    assert server.wait_until(lambda: server.service.servicer.open_units() == 0)
    assert server.wait_until(
        lambda: server.metric("bitnet_requests_total", 'code="CANCELLED",method="Generate"') == 50
    )
    assert scheduler.active_count() == 0
    assert server.backend.engine.model.kv.free_slots() == 8
    out = list(server.stub.Generate(pb.GenerateRequest(prompt="x", max_tokens=3, temperature=0)))
    assert out[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
