"""Every way a call can go wrong: bad fields, bad bytes, deadlines, cancellation."""

from __future__ import annotations

import threading

import grpc
import pytest
from bitnet_grpc.proto import generation_pb2 as pb
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status

USER = pb.ChatMessage(role="user", content="hi")


def bad_generate_requests(vocab: int, ctx: int) -> list[tuple[str, dict]]:
    """(field the error must name, GenerateRequest fields) for each invalid request."""
    return [
        ("temperature", dict(prompt="x", temperature=float("nan"))),
        ("temperature", dict(prompt="x", temperature=-0.5)),
        ("top_p", dict(prompt="x", top_p=0.0)),
        ("top_p", dict(prompt="x", top_p=1.5)),
        ("top_p", dict(prompt="x", top_p=float("inf"))),
        ("min_p", dict(prompt="x", min_p=1.5)),
        ("repetition_penalty", dict(prompt="x", repetition_penalty=0.0)),
        ("presence_penalty", dict(prompt="x", presence_penalty=2.5)),
        ("frequency_penalty", dict(prompt="x", frequency_penalty=-3.0)),
        ("logprobs", dict(prompt="x", logprobs=21)),
        ("max_tokens", dict(prompt="x", max_tokens=0)),
        ("max_tokens", dict(prompt="x", max_tokens=ctx)),
        ("prompt_token_ids", dict(prompt_token_ids=[1] * ctx)),
        ("prompt", dict(prompt="lorem ipsum dolor " * ctx)),
        ("prompt", dict()),
        ("prompt", dict(prompt="")),
        ("messages", dict(prompt="x", messages=[USER])),
        ("prompt_token_ids", dict(prompt="x", prompt_token_ids=[1])),
        ("prompt_token_ids", dict(messages=[USER], prompt_token_ids=[1])),
        ("prompt_token_ids[1]", dict(prompt_token_ids=[1, vocab])),
        ("messages[0].role", dict(messages=[pb.ChatMessage(role="robot", content="beep")])),
        ("stop", dict(prompt="x", stop=[f"s{i}" for i in range(17)])),
        ("stop[1]", dict(prompt="x", stop=["ok", ""])),
        ("stop[0]", dict(prompt="x", stop=["é" * 129])),
        ("request_id", dict(prompt="x", request_id="r" * 200)),
    ]


def field_violations(error: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(error)
    fields = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    return fields


def assert_invalid(call, field: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if not isinstance(result, pb.ModelInfo | pb.TokenizeResponse | pb.DetokenizeResponse):
            list(result)
    error = info.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, error.code(), error.details())
    assert error.details().startswith(field + ":"), (field, error.details())
    assert field_violations(error) == [field]


def test_every_bad_field_is_invalid_argument_naming_it(server) -> None:
    limits = server.backend.limits
    cases = bad_generate_requests(limits.vocab_size, limits.context_size)
    if not limits.has_chat_template:  # then any messages are refused, named as such
        cases = [("messages", c) if f.startswith("messages[") else (f, c) for f, c in cases]
    for field, fields in cases:
        assert_invalid(lambda fields=fields: server.stub.Generate(pb.GenerateRequest(**fields)), field)
    assert_invalid(
        lambda: server.stub.Detokenize(pb.DetokenizeRequest(token_ids=[0, limits.vocab_size])), "token_ids[1]"
    )
    assert (
        server.health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    )
    assert server.metric("bitnet_requests_total", 'code="INVALID_ARGUMENT",method="Generate"') == len(cases)
    # ... and the server still generates.
    out = list(server.stub.Generate(pb.GenerateRequest(prompt="x", max_tokens=2, temperature=0)))
    assert out[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED


def _with_bad_utf8(message, marker: str) -> bytes:
    """The message's bytes with the UTF-8 of `marker` replaced by an invalid byte of the same length."""
    raw = message.SerializeToString()
    encoded = marker.encode()
    assert raw.count(encoded) == 1
    return raw.replace(encoded, b"\xff" * len(encoded))


@pytest.mark.parametrize(
    ("method", "message", "response", "field"),
    [
        ("Generate", pb.GenerateRequest(prompt="aMARKb"), pb.GenerateResponse, "prompt"),
        ("Generate", pb.GenerateRequest(prompt="x", stop=["ok", "MARK"]), pb.GenerateResponse, "stop[1]"),
        (
            "Generate",
            pb.GenerateRequest(messages=[USER, pb.ChatMessage(role="user", content="MARK")]),
            pb.GenerateResponse,
            "messages[1].content",
        ),
        (
            "GenerateBatch",
            pb.GenerateBatchRequest(requests=[pb.GenerateRequest(prompt="x", request_id="MARK")]),
            pb.GenerateBatchResponse,
            "requests[0].request_id",
        ),
        ("Tokenize", pb.TokenizeRequest(text="MARK"), pb.TokenizeResponse, "text"),
    ],
)
def test_invalid_utf8_is_invalid_argument_not_internal(server, method, message, response, field) -> None:
    raw = _with_bad_utf8(message, "MARK")
    path = f"/bitnet.v1.TextGeneration/{method}"
    identity = dict(request_serializer=lambda b: b, response_deserializer=response.FromString)
    if method in ("Generate", "GenerateBatch"):
        call = server.channel.unary_stream(path, **identity)
        assert_invalid(lambda: call(raw), field)
    else:
        call = server.channel.unary_unary(path, **identity)
        with pytest.raises(grpc.RpcError) as info:
            call(raw)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(field + ":")


def test_batch_reports_bad_requests_by_index_and_runs_the_rest(server) -> None:
    good = pb.GenerateRequest(prompt="x", max_tokens=3, temperature=0, ignore_eos=True)
    request = pb.GenerateBatchRequest(requests=[good, pb.GenerateRequest(prompt="x", top_p=7), good])
    replies = list(server.stub.GenerateBatch(request))
    errors = [r for r in replies if r.HasField("error")]
    assert [(e.index, e.error.code) for e in errors] == [(1, grpc.StatusCode.INVALID_ARGUMENT.value[0])]
    assert "top_p" in errors[0].error.message
    finished = [r.index for r in replies if r.HasField("response") and r.response.finish_reason]
    assert sorted(finished) == [0, 2]
    assert_invalid(lambda: server.stub.GenerateBatch(pb.GenerateBatchRequest()), "requests")


def _long_request(server, **extra) -> pb.GenerateRequest:
    room = server.backend.limits.context_size - 8
    return pb.GenerateRequest(prompt="x", max_tokens=room, temperature=0, ignore_eos=True, **extra)


def test_deadline_while_running_frees_the_slot(server) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(server.stub.Generate(_long_request(server), timeout=0.05))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    scheduler = server.backend.scheduler
    assert server.wait_until(lambda: scheduler.active_count() == 0 and scheduler.queue_depth() == 0, 5)
    assert server.wait_until(lambda: server.service.servicer.open_units() == 0, 5)


def test_deadline_while_queued_is_deadline_exceeded(make_server) -> None:
    server = make_server(max_batch=1, max_queue=2)
    server.slow_down(0.005)  # the running request keeps its slot for seconds
    running = server.stub.Generate(_long_request(server))
    next(running)  # the only slot is taken
    with pytest.raises(grpc.RpcError) as info:
        list(server.stub.Generate(pb.GenerateRequest(prompt="y", max_tokens=4), timeout=0.2))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert server.wait_until(lambda: server.backend.scheduler.queue_depth() == 0, 5)
    assert server.backend.scheduler.active_count() == 1  # the running one is untouched
    running.cancel()
    assert server.wait_until(lambda: server.backend.scheduler.active_count() == 0, 5)


def test_cancel_frees_the_slot(server) -> None:
    scheduler = server.backend.scheduler
    call = server.stub.Generate(_long_request(server))
    next(call)
    call.cancel()
    assert server.wait_until(lambda: scheduler.active_count() == 0, 5)
    assert server.backend.engine.model.kv.free_slots() == server.backend.scheduler.max_batch
    out = list(server.stub.Generate(pb.GenerateRequest(prompt="x", max_tokens=2, temperature=0)))
    assert out[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED


def test_a_call_being_checked_when_the_drain_starts_is_finished_or_refused_never_cut(
    server, monkeypatch
) -> None:
    server.slow_down(0.02)  # 100 tokens take 2 s: longer than the 1 s grpcio gives streams at stop()
    checking, release = threading.Event(), threading.Event()
    encode = server.backend.encode_prompt

    def held_encode(text: str) -> list[int]:
        checking.set()
        release.wait(30)
        return encode(text)

    monkeypatch.setattr(server.backend, "encode_prompt", held_encode)
    responses, errors = [], []

    def call() -> None:
        request = pb.GenerateRequest(prompt="x", max_tokens=100, temperature=0, ignore_eos=True)
        try:
            responses.extend(server.stub.Generate(request, timeout=60))
        except grpc.RpcError as error:
            errors.append(error)

    caller = threading.Thread(target=call)
    caller.start()
    assert checking.wait(30)  # past the drain check, still tokenising
    shutdown = threading.Thread(target=server.service.shutdown, kwargs={"grace": 30.0})
    shutdown.start()
    assert server.wait_until(lambda: server.service.servicer._draining, 5)
    release.set()
    caller.join(60)
    shutdown.join(60)
    if errors:
        assert errors[0].code() == grpc.StatusCode.UNAVAILABLE
        assert not responses  # refused before any token, not cut in the middle
    else:
        assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert sum(len(r.token_ids) for r in responses) == 100
