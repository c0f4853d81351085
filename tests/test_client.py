"""The Python client against real servers on 127.0.0.1: streaming, results, batches, errors, async,
retries, round_robin. Servers run in this process (bitnet_grpc.server.serve.Service) so each one's
Prometheus registry can be read directly; the client code under test never imports the server.

`running_server` is also used by the CLI and Node.js client tests.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest
from bitnet_grpc.client import AsyncClient, BitnetError, Client, Completion
from bitnet_grpc.client import sync_client as sync_client_module

# The built-in default model unless a test run names another file.
TEST_MODEL = os.environ.get("BITNET_GRPC_TEST_MODEL") or None
PROMPTS = [f"Story {i}: once upon a time" for i in range(20)]
GREEDY = {"temperature": 0.0, "max_tokens": 6}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.cache
def model_weights():
    """The model file is read once per test process; every server builds its engine from it."""
    from bitnet_grpc.server.engine import DEFAULT_MODEL
    from bitnet_grpc.server.loader import load_weights

    return load_weights(TEST_MODEL or str(DEFAULT_MODEL))


def load_backend(**overrides):
    """A started engine and scheduler; `start_service` can then put it behind a gRPC port at once."""
    from bitnet_grpc.server.engine_backend import backend_from_weights
    from bitnet_grpc.server.serve import ServeOptions

    options = ServeOptions(model=TEST_MODEL, port=0, metrics_port=None, threads=1, grace=5.0, **overrides)
    backend = backend_from_weights(
        model_weights(),
        max_batch=options.max_batch,
        max_queue=options.max_queue,
        ctx_size=options.ctx_size,
        threads=options.threads,
        step_tokens=options.step_tokens,
    )
    return options, backend


def start_service(options, backend, port: int = 0):
    from bitnet_grpc.server.serve import Service

    options.port = port
    service = Service(options)
    service.start()
    service.attach(backend)
    return service


@contextmanager
def running_server(port: int = 0, **overrides) -> Iterator:
    """A real server on 127.0.0.1 (its own engine, scheduler and metrics); yields the Service."""
    options, backend = load_backend(**overrides)
    service = start_service(options, backend, port)
    try:
        yield service
    finally:
        service.shutdown(grace=2.0)


def address(service) -> str:
    return f"127.0.0.1:{service.port}"


def served(service, method: str = "Generate", code: str = "OK") -> int:
    """How many calls of `method` this server finished with `code`, from its own metrics."""
    value = service.metrics.registry.get_sample_value(
        "bitnet_requests_total", {"method": method, "code": code}
    )
    return int(value or 0)


@pytest.fixture(scope="module")
def server():
    with running_server() as service:
        yield service


@pytest.fixture()
def client(server):
    with Client(address(server), timeout=120) as c:
        yield c


# -- streaming and whole results ------------------------------------------------------------------------


def test_generate_streams_chunks_and_ends_with_usage(client):
    chunks = list(
        client.generate("The weather today", max_tokens=48, ignore_eos=True, temperature=0.0, logprobs=2)
    )
    # The server packs the tokens waiting when it sends, so a message may carry several; over 48 tokens
    # a stream still arrives in pieces.
    assert len(chunks) >= 2, "tokens should arrive as several messages"
    assert all(c.finish_reason is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason == "length"
    assert last.usage.completion_tokens == 48 and last.usage.prompt_tokens > 0
    assert last.timings.total_seconds >= last.timings.time_to_first_token_seconds > 0
    ids = [t for c in chunks for t in c.token_ids]
    assert len(ids) == 48
    logprobs = [lp for c in chunks for lp in c.logprobs]
    assert [lp.chosen.token_id for lp in logprobs] == ids
    assert all(len(lp.top) == 2 and lp.chosen.logprob <= 0 for lp in logprobs)
    # Greedy: the chosen token is the most likely one.
    assert all(lp.top[0].logprob <= lp.chosen.logprob + 1e-6 for lp in logprobs)
    text = "".join(c.text for c in chunks)
    assert text == client.detokenize(ids)


def test_complete_equals_the_stream_it_collects(client):
    streamed = list(client.generate("The weather today", **GREEDY))
    whole = client.complete("The weather today", **GREEDY)
    assert whole.text == "".join(c.text for c in streamed)
    assert list(whole.token_ids) == [t for c in streamed for t in c.token_ids]
    assert whole.finish_reason == streamed[-1].finish_reason and whole.usage == streamed[-1].usage
    assert whole.ok and whole.error is None


def test_token_id_prompt_and_stop_early_cancels(client, server):
    ids = client.tokenize("Hello there", add_special_tokens=False).token_ids
    assert ids and client.complete(ids, **GREEDY).usage.prompt_tokens == len(ids)
    before = served(server, code="CANCELLED")
    stream = client.generate("Hello there", max_tokens=200, ignore_eos=True)
    next(stream)
    stream.close()  # the caller stops reading: the call is cancelled, the server frees the slot
    deadline = time.monotonic() + 10
    while served(server, code="CANCELLED") == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served(server, code="CANCELLED") == before + 1


def test_chat_keeps_roles_and_returns_the_reply(client):
    messages = [
        {"role": "system", "content": "You are brief."},
        {"role": "user", "content": "Say hello."},
    ]
    if not client.model_info().has_chat_template:
        with pytest.raises(BitnetError) as info:
            client.chat(messages, **GREEDY)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "messages" in info.value.message
        return
    reply = client.chat(messages, **GREEDY)
    assert reply.usage.completion_tokens == len(reply.token_ids) > 0
    streamed = list(client.chat_stream([("system", "You are brief."), ("user", "Say hello.")], **GREEDY))
    assert "".join(c.text for c in streamed) == reply.text
    # The template adds role markers: the chat prompt is longer than the raw message text.
    assert reply.usage.prompt_tokens > len(client.tokenize("Say hello.").token_ids)


# -- batches --------------------------------------------------------------------------------------------


def test_batch_keeps_input_order_and_matches_single_calls(client, monkeypatch):
    in_flight, peak, lock = 0, 0, threading.Lock()
    original = sync_client_module.Client._stream

    def counting_stream(self, request, timeout):
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        try:
            yield from original(self, request, timeout)
        finally:
            with lock:
                in_flight -= 1

    monkeypatch.setattr(sync_client_module.Client, "_stream", counting_stream)
    results = client.generate_batch(PROMPTS, max_concurrency=4, **GREEDY)
    assert 2 <= peak <= 4, f"expected up to 4 concurrent calls, saw {peak}"
    monkeypatch.undo()
    assert len(results) == len(PROMPTS) and all(r.ok for r in results)
    singles = [client.complete(p, **GREEDY) for p in PROMPTS]
    assert [r.token_ids for r in results] == [s.token_ids for s in singles]
    assert [r.text for r in results] == [s.text for s in singles]


def test_batch_reports_a_failed_prompt_and_keeps_the_others(client):
    vocab = client.model_info().vocab_size
    prompts = ["First prompt", [vocab + 7], "Third prompt", "", "Fifth prompt"]
    results = client.generate_batch(prompts, max_concurrency=2, **GREEDY)
    assert [r.ok for r in results] == [True, False, True, False, True]
    server_side, local = results[1].error, results[3].error
    assert server_side.code == grpc.StatusCode.INVALID_ARGUMENT and "prompt_token_ids" in server_side.message
    assert local.code == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in local.message
    assert results[2].text == client.complete("Third prompt", **GREEDY).text
    assert all(r.usage.completion_tokens == GREEDY["max_tokens"] for r in results if r.ok)


# -- errors ---------------------------------------------------------------------------------------------


def test_bad_parameters_fail_locally_naming_the_field():
    with Client(f"127.0.0.1:{free_port()}", retries=0, timeout=5) as c:  # nothing listens there
        for params, field in (
            ({"top_p": 0.0}, "top_p"),
            ({"temperature": float("nan")}, "temperature"),
            ({"max_tokens": 0}, "max_tokens"),
            ({"logprobs": 21}, "logprobs"),
            ({"stop": ["x"] * 17}, "stop"),
            ({"presence_penalty": 3}, "presence_penalty"),
            ({"seed": -1}, "seed"),
        ):
            with pytest.raises(ValueError, match=field):
                c.generate("hi", **params)
        with pytest.raises(ValueError, match="role"):
            c.chat([{"role": "robot", "content": "hi"}])
        with pytest.raises(TypeError, match="max_tokenz"):
            c.generate("hi", max_tokenz=3)
        with pytest.raises(ValueError, match="max_concurrency"):
            c.generate_batch(["a"], max_concurrency=0)
        with pytest.raises(BitnetError) as info:  # and a well-formed call reports the transport error
            c.complete("hi")
        assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_server_errors_raise_one_exception_type(client):
    context = client.model_info().context_size
    with pytest.raises(BitnetError) as info:
        client.complete("hi", max_tokens=context + 10)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_tokens" in info.value.message and info.value.retry_after is None
    with pytest.raises(BitnetError) as info:
        client.detokenize([client.model_info().vocab_size + 1])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_deadline_exceeded_is_reported(client):
    with pytest.raises(BitnetError) as info:
        client.complete("Count to a thousand", max_tokens=500, ignore_eos=True, timeout=0.05)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_tokenize_detokenize_model_info_health(client):
    info = client.model_info()
    assert info.vocab_size > 0 and info.context_size > 0 and info.layers > 0
    with_bos = client.tokenize("Hello world")
    without = client.tokenize("Hello world", add_special_tokens=False)
    assert len(with_bos.tokens) == len(with_bos.token_ids)
    assert client.detokenize(without.token_ids) == "Hello world"
    assert len(with_bos.token_ids) >= len(without.token_ids)
    assert client.health() == "SERVING"
    assert client.health("bitnet.v1.TextGeneration") == "SERVING"


# -- queue full: RetryInfo, and retries when asked -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_server():
    """One sequence at a time and no queue, so a second stream is refused with RESOURCE_EXHAUSTED."""
    with running_server(max_batch=1, max_queue=0) as service:
        yield service


def _hold_the_only_slot(target: str):
    """Start a long stream and stop reading it: once gRPC flow control fills up, the server's handler
    waits to send and keeps the one admission unit, however fast the model is."""
    holder = Client(target, retries=0, timeout=120)
    room = holder.model_info().context_size - 16
    stream = holder.generate("Hold the slot", max_tokens=room, ignore_eos=True, logprobs=20)
    next(stream)  # streaming: the slot is taken
    return holder, stream


def test_queue_full_carries_retry_info(tiny_server):
    holder, stream = _hold_the_only_slot(address(tiny_server))
    try:
        with Client(address(tiny_server), retries=0, timeout=30) as c, pytest.raises(BitnetError) as info:
            c.complete("Second", max_tokens=2)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.retry_after is not None and info.value.retry_after > 0
    finally:
        stream.close()
        holder.close()


def test_resource_exhausted_is_retried_when_asked(tiny_server):
    holder, stream = _hold_the_only_slot(address(tiny_server))
    refused_before = served(tiny_server, code="RESOURCE_EXHAUSTED")
    outcome: dict[str, object] = {}

    def second_call() -> None:
        with Client(address(tiny_server), retries=4, retry_resource_exhausted=True, timeout=60) as c:
            try:
                outcome["result"] = c.complete("Second", max_tokens=2)
            except BitnetError as exc:
                outcome["error"] = exc

    caller = threading.Thread(target=second_call)
    caller.start()
    try:
        deadline = time.monotonic() + 20
        while (
            served(tiny_server, code="RESOURCE_EXHAUSTED") == refused_before and time.monotonic() < deadline
        ):
            time.sleep(0.01)
        assert served(tiny_server, code="RESOURCE_EXHAUSTED") > refused_before, (
            "first attempt was not refused"
        )
    finally:
        stream.close()  # frees the slot; the retry gets it
        holder.close()
        caller.join(60)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].usage.completion_tokens == 2


# -- retries and balancing ------------------------------------------------------------------------------


def test_retry_reaches_a_server_started_after_the_first_attempt():
    options, backend = load_backend()
    port = free_port()
    # A listener that refuses the first connection proves the first attempt happened with no server up.
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(8)
    first_attempt = threading.Event()

    def refuse_once() -> None:
        conn, _ = listener.accept()
        conn.close()
        listener.close()
        first_attempt.set()

    threading.Thread(target=refuse_once, daemon=True).start()
    outcome: dict[str, object] = {}

    def call() -> None:
        with Client(f"127.0.0.1:{port}", retries=4, initial_backoff=0.5, max_backoff=3.0, timeout=60) as c:
            try:
                outcome["result"] = c.complete("Hello", **GREEDY)
            except BitnetError as exc:
                outcome["error"] = exc

    caller = threading.Thread(target=call)
    caller.start()
    service = None
    try:
        assert first_attempt.wait(20), "the client never tried to connect"
        assert caller.is_alive(), f"the call ended before any server was up: {outcome}"
        service = start_service(options, backend, port)
        caller.join(60)
        assert "error" not in outcome, outcome.get("error")
        assert outcome["result"].usage.completion_tokens == GREEDY["max_tokens"]
        assert served(service) == 1
    finally:
        caller.join(60)
        if service is not None:
            service.shutdown(grace=2.0)
        else:
            backend.scheduler.stop()


def test_without_retries_a_missing_server_fails_at_once():
    started = time.monotonic()
    with Client(f"127.0.0.1:{free_port()}", retries=0, timeout=30) as c, pytest.raises(BitnetError) as info:
        c.complete("Hello", **GREEDY)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 10


def test_round_robin_spreads_calls_over_two_servers(server):
    with running_server() as second:
        targets = [address(server), address(second)]
        before = (served(server), served(second))
        with Client(targets, timeout=120) as c:
            c.health()
            # round_robin connects to every address; give the second subchannel time to be ready.
            time.sleep(0.5)
            results = [c.complete(f"Balance {i}", **GREEDY) for i in range(10)]
        assert all(r.ok for r in results)
        counts = (served(server) - before[0], served(second) - before[1])
        assert sum(counts) == 10 and min(counts) >= 1, counts


# -- asyncio --------------------------------------------------------------------------------------------


def test_async_client_matches_the_sync_client(client, server):
    vocab = client.model_info().vocab_size
    long_run = {"temperature": 0.0, "max_tokens": 48, "ignore_eos": True}
    sync_whole = client.complete("The weather today", **long_run)
    sync_batch = client.generate_batch(PROMPTS[:6], max_concurrency=3, **GREEDY)

    async def scenario() -> dict:
        async with AsyncClient(address(server), timeout=120) as ac:
            chunks = [c async for c in ac.generate("The weather today", **long_run)]
            whole = await ac.complete("The weather today", **long_run)
            batch = await ac.generate_batch(PROMPTS[:6] + [[vocab + 3]], max_concurrency=3, **GREEDY)
            tokens = await ac.tokenize("Hello world", add_special_tokens=False)
            text = await ac.detokenize(tokens.token_ids)
            info = await ac.model_info()
            health = await ac.health()
            chat = None
            if info.has_chat_template:
                chat = await ac.chat([{"role": "user", "content": "Say hello."}], **GREEDY)
            with pytest.raises(ValueError, match="top_k"):
                ac.generate("x", top_k=-1)
            try:
                await ac.complete("hi", max_tokens=info.context_size + 10)
                error = None
            except BitnetError as exc:
                error = exc
            return dict(
                chunks=chunks,
                whole=whole,
                batch=batch,
                text=text,
                info=info,
                health=health,
                chat=chat,
                error=error,
            )

    got = asyncio.run(scenario())
    assert len(got["chunks"]) >= 2 and got["chunks"][-1].finish_reason == "length"
    assert "".join(c.text for c in got["chunks"]) == got["whole"].text == sync_whole.text
    assert got["whole"].token_ids == sync_whole.token_ids
    assert [r.token_ids for r in got["batch"][:6]] == [r.token_ids for r in sync_batch]
    assert (
        isinstance(got["batch"][6], Completion)
        and got["batch"][6].error.code == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert got["text"] == "Hello world" and got["health"] == "SERVING"
    assert got["info"] == client.model_info()
    if got["chat"] is not None:
        assert got["chat"].text == client.chat([{"role": "user", "content": "Say hello."}], **GREEDY).text
    assert got["error"].code == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens" in got["error"].message


# -- channel configuration (no server needed) -----------------------------------------------------------


def test_several_targets_make_one_balanced_channel_with_bounded_retries():
    from bitnet_grpc.client.channel import RetryPolicy, multi_address_target, resolve_channel

    assert multi_address_target(["127.0.0.1:1", "127.0.0.2:2"]) == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert multi_address_target(["[::1]:5", "[::1]:6"]) == "ipv6:[::1]:5,[::1]:6"
    with pytest.raises(ValueError, match="mix"):
        multi_address_target(["127.0.0.1:1", "[::1]:2"])
    with pytest.raises(ValueError, match="host:port"):
        multi_address_target(["127.0.0.1"])
    target, options = resolve_channel(["127.0.0.1:1", "127.0.0.1:2"], RetryPolicy(retries=2))
    config = json.loads(dict(options)["grpc.service_config"])
    assert target == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    policy = config["methodConfig"][0]["retryPolicy"]
    assert policy["maxAttempts"] == 3 and policy["retryableStatusCodes"] == ["UNAVAILABLE"]
    _, options = resolve_channel("127.0.0.1:1", RetryPolicy(retries=1, resource_exhausted=True))
    config = json.loads(dict(options)["grpc.service_config"])
    assert "loadBalancingConfig" not in config  # one address: gRPC's default pick_first
    assert config["methodConfig"][0]["retryPolicy"]["retryableStatusCodes"] == [
        "UNAVAILABLE",
        "RESOURCE_EXHAUSTED",
    ]
    _, options = resolve_channel("127.0.0.1:1", RetryPolicy(retries=0))
    assert "methodConfig" not in json.loads(dict(options)["grpc.service_config"])
    with pytest.raises(ValueError, match="retries"):
        Client("127.0.0.1:1", retries=5)
