"""The gRPC translation layer of bitnet.v1.TextGeneration: check, admit, stream, account.

It owns no model state. A `Backend` (the engine plus its scheduler) does the work; this layer turns
requests into sequences and their channel events into responses, and turns every way a call can fail
into the right status code.

Threads: grpcio's sync server runs each call on a pool thread for the call's whole life. Generation
calls are admitted here, before any waiting, against max_batch + max_queue sequence units, so at most
that many pool threads can ever be held by generation streams (slow readers included); the rest of the
pool stays free for health checks, reflection and unary calls (serve.py sizes it).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from bitnet_grpc.proto import generation_pb2 as pb
from bitnet_grpc.server.metrics import ServiceMetrics
from bitnet_grpc.server.scheduler import Failed, QueueFull, Scheduler, Sequence
from bitnet_grpc.server.validation import (
    CheckedGenerate,
    GenerationLimits,
    InvalidField,
    UndecodableRequest,
    check_generate,
    check_token_ids,
    tolerant_deserializer,
)
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TextGeneration"].full_name
request_log = logging.getLogger("bitnet_grpc.requests")

# grpcio's sync server reports "no deadline" as a time_remaining() of about 2**63 ns, not None.
_NO_DEADLINE_SECONDS = 10**8
# Wake up now and then while waiting on a channel, in case a terminated RPC's callback was missed.
_CHANNEL_POLL_SECONDS = 1.0
_CALL_ENDED = object()  # put into a channel by the RPC-termination callback

_FINISH_REASONS = {
    "length": pb.FINISH_REASON_LENGTH,
    "stop": pb.FINISH_REASON_STOP,
    "stop_sequence": pb.FINISH_REASON_STOP_SEQUENCE,
    "context_full": pb.FINISH_REASON_CONTEXT_FULL,
}


class Backend(Protocol):
    """What the servicer needs from the loaded model: limits, tokenizer, sequences, the scheduler."""

    scheduler: Scheduler
    limits: GenerationLimits

    def encode_prompt(self, text: str) -> list[int]: ...
    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]: ...
    def tokenize(self, text: str, add_special_tokens: bool) -> tuple[list[int], list[str]]: ...
    def detokenize(self, token_ids: list[int], skip_special_tokens: bool) -> str: ...
    def token_text(self, token_id: int) -> str: ...
    def model_info(self) -> pb.ModelInfo: ...
    def new_sequence(
        self, checked: CheckedGenerate, channel: queue.SimpleQueue, tag: int, deadline: float | None
    ) -> Sequence: ...


class _Abort(Exception):
    """Raised inside handlers to end the call with a status; the handler wrapper applies it."""

    def __init__(self, code: grpc.StatusCode, message: str, details: list[Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or []


def _invalid(error: InvalidField) -> _Abort:
    violation = error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.reason)
    return _Abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        str(error),
        [error_details_pb2.BadRequest(field_violations=[violation])],
    )


def _overloaded(message: str, retry_after: float) -> _Abort:
    whole = int(retry_after)
    delay = duration_pb2.Duration(seconds=whole, nanos=int((retry_after - whole) * 1e9))
    return _Abort(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"server is busy, retry in {retry_after:.2f}s: {message}",
        [error_details_pb2.RetryInfo(retry_delay=delay)],
    )


def _abort(context: grpc.ServicerContext, error: _Abort) -> None:
    """End the call with code, message and google.rpc details (never returns)."""
    details = []
    for message in error.details:
        packed = any_pb2.Any()
        packed.Pack(message)
        details.append(packed)
    status = status_pb2.Status(code=error.code.value[0], message=error.message, details=details)
    context.abort_with_status(rpc_status.to_status(status))


def _deadline(context: grpc.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    if remaining is None or remaining > _NO_DEADLINE_SECONDS:
        return None
    return time.monotonic() + remaining


@dataclass
class _CallRecord:
    """What the per-request log line and the metrics say about one call (or one request of a batch)."""

    method: str
    request_id: str = ""
    code: grpc.StatusCode = grpc.StatusCode.OK
    message: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    last_token_time: float | None = None
    extra: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)


@dataclass
class _Delivery:
    """What one sequence's channel held when the handler looked: tokens, maybe its end."""

    tag: int
    events: list[Any] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    failure: Failed | None = None

    @property
    def finish_reason(self) -> Any:
        return getattr(self.events[-1], "finish_reason", None) if self.events else None

    @property
    def last(self) -> bool:
        return self.failure is not None or self.finish_reason is not None


def _take_ready(channel: queue.SimpleQueue) -> list[Any]:
    items = []
    while True:
        try:
            items.append(channel.get_nowait())
        except queue.Empty:
            return items


def _internal(method: str) -> _Abort:
    """A bug: logged with its traceback here, reported to the client without details."""
    logging.getLogger(__name__).exception("%s failed", method)
    return _Abort(grpc.StatusCode.INTERNAL, f"{method} failed on the server")


def _failure_status(failure: Failed) -> _Abort:
    return _Abort(getattr(grpc.StatusCode, failure.reason.name), failure.detail or failure.reason.value)


class TextGenerationServicer:
    """bitnet.v1.TextGeneration over a Backend attached once the model has loaded."""

    def __init__(self, metrics: ServiceMetrics, *, capacity: int, stream_interval: float = 0.0) -> None:
        self.metrics = metrics
        self.capacity = capacity  # max_batch + max_queue: sequence units that may be open at once
        self.stream_interval = stream_interval  # seconds a stream may hold tokens to send them together
        self._backend: Backend | None = None
        self._draining = False
        self._lock = threading.Lock()
        self._held = 0
        self._idle = threading.Condition(self._lock)

    # ---- lifecycle (serve.py) ------------------------------------------------------------------------
    def attach(self, backend: Backend) -> None:
        self._backend = backend

    def begin_drain(self) -> None:
        """Refuse new calls with UNAVAILABLE; calls already admitted go on. Set under the admission
        lock: a call is either counted before the drain starts (and waited for) or refused."""
        with self._lock:
            self._draining = True

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no generation call is open; False if `timeout` passed first."""
        end = time.monotonic() + timeout
        with self._idle:
            while self._held:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def open_units(self) -> int:
        return self._held

    def handler(self) -> grpc.GenericRpcHandler:
        """Method handlers whose deserializers never raise (bad UTF-8 becomes INVALID_ARGUMENT)."""

        def stream(method: Callable, req: type, resp: type) -> grpc.RpcMethodHandler:
            return grpc.unary_stream_rpc_method_handler(
                method,
                request_deserializer=tolerant_deserializer(req),
                response_serializer=resp.SerializeToString,
            )

        def unary(method: Callable, req: type, resp: type) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                method,
                request_deserializer=tolerant_deserializer(req),
                response_serializer=resp.SerializeToString,
            )

        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Generate": stream(self.Generate, pb.GenerateRequest, pb.GenerateResponse),
                "GenerateBatch": stream(
                    self.GenerateBatch, pb.GenerateBatchRequest, pb.GenerateBatchResponse
                ),
                "Tokenize": unary(self.Tokenize, pb.TokenizeRequest, pb.TokenizeResponse),
                "Detokenize": unary(self.Detokenize, pb.DetokenizeRequest, pb.DetokenizeResponse),
                "GetModelInfo": unary(self.GetModelInfo, pb.GetModelInfoRequest, pb.ModelInfo),
            },
        )

    # ---- unary methods -------------------------------------------------------------------------------
    def Tokenize(self, request: Any, context: grpc.ServicerContext) -> pb.TokenizeResponse:
        def run(backend: Backend) -> pb.TokenizeResponse:
            add = request.add_special_tokens if request.HasField("add_special_tokens") else True
            ids, pieces = backend.tokenize(request.text, add)
            return pb.TokenizeResponse(token_ids=ids, tokens=pieces)

        return self._unary("Tokenize", request, context, run)

    def Detokenize(self, request: Any, context: grpc.ServicerContext) -> pb.DetokenizeResponse:
        def run(backend: Backend) -> pb.DetokenizeResponse:
            ids = check_token_ids("token_ids", request.token_ids, backend.limits.vocab_size)
            skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
            return pb.DetokenizeResponse(text=backend.detokenize(ids, skip))

        return self._unary("Detokenize", request, context, run)

    def GetModelInfo(self, request: Any, context: grpc.ServicerContext) -> pb.ModelInfo:
        return self._unary("GetModelInfo", request, context, lambda backend: backend.model_info())

    def _unary(self, method: str, request: Any, context: grpc.ServicerContext, run: Callable) -> Any:
        record = _CallRecord(method)
        try:
            backend = self._ready()
            if isinstance(request, UndecodableRequest):
                raise _invalid(request.error)
            return run(backend)
        except InvalidField as error:
            self._fail(context, record, _invalid(error))
        except _Abort as error:
            self._fail(context, record, error)
        except Exception:
            self._fail(context, record, _internal(method))
        finally:
            self._account(record)

    # ---- streaming methods ---------------------------------------------------------------------------
    def Generate(self, request: Any, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        record = _CallRecord("Generate", request_id=getattr(request, "request_id", ""))
        try:
            backend = self._ready()
            if isinstance(request, UndecodableRequest):
                raise _invalid(request.error)
            checked = self._check(backend, request)
            record.request_id = checked.request_id
            record.prompt_tokens = len(checked.prompt_ids)
            with self._admission(backend, 1):
                channel: queue.SimpleQueue = queue.SimpleQueue()
                seq = self._new_sequence(backend, checked, channel, 0, _deadline(context))
                ended = seq.ended = threading.Event()
                self._submit(backend, context, channel, [seq], ended)
                for delivery in self._updates(channel, 1, context, ended):
                    self._observe(seq, delivery, record)
                    if delivery.events:
                        yield self._response(backend, seq, delivery)
                    if delivery.failure is not None:
                        raise _failure_status(delivery.failure)
        except _Abort as error:
            self._fail(context, record, error)
        except GeneratorExit:  # grpcio dropped the stream: the client went away
            record.code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            self._fail(context, record, _internal("Generate"))
        finally:
            self._account(record)

    def GenerateBatch(
        self, request: Any, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateBatchResponse]:
        """Check every request, admit the good ones together (or refuse the call), report the bad ones
        by index, then stream all sequences through one channel."""
        outer = _CallRecord("GenerateBatch")
        records: list[_CallRecord] = []
        try:
            backend = self._ready()
            if isinstance(request, UndecodableRequest):
                raise _invalid(request.error)
            if not request.requests:
                raise _invalid(InvalidField("requests", "at least one request is required"))
            if len(request.requests) > self.capacity:
                raise _invalid(
                    InvalidField("requests", f"at most {self.capacity} (max_batch + max_queue) per call")
                )
            checked: dict[int, CheckedGenerate] = {}
            for index, sub in enumerate(request.requests):
                record = _CallRecord("GenerateBatch", request_id=sub.request_id, extra={"index": index})
                records.append(record)
                try:
                    checked[index] = self._check(backend, sub)
                    record.request_id = checked[index].request_id
                    record.prompt_tokens = len(checked[index].prompt_ids)
                except _Abort as error:
                    record.code, record.message = error.code, error.message
            with self._admission(backend, len(checked)):
                for index, record in enumerate(records):
                    if index not in checked:
                        error = pb.BatchError(code=record.code.value[0], message=record.message)
                        yield pb.GenerateBatchResponse(index=index, error=error)
                if not checked:
                    return
                channel: queue.SimpleQueue = queue.SimpleQueue()
                deadline = _deadline(context)
                seqs = {i: self._new_sequence(backend, c, channel, i, deadline) for i, c in checked.items()}
                ended = threading.Event()
                for seq in seqs.values():
                    seq.ended = ended
                self._submit(backend, context, channel, list(seqs.values()), ended)
                for delivery in self._updates(channel, len(seqs), context, ended):
                    index = delivery.tag
                    self._observe(seqs[index], delivery, records[index])
                    if delivery.events:
                        response = self._response(backend, seqs[index], delivery)
                        yield pb.GenerateBatchResponse(index=index, response=response)
                    if delivery.failure is not None:
                        failure = _failure_status(delivery.failure)
                        records[index].code, records[index].message = failure.code, failure.message
                        if failure.code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
                            raise failure  # the whole call is over
                        error = pb.BatchError(code=failure.code.value[0], message=failure.message)
                        yield pb.GenerateBatchResponse(index=index, error=error)
        except _Abort as error:
            self._fail(context, outer, error)
        except GeneratorExit:
            outer.code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            self._fail(context, outer, _internal("GenerateBatch"))
        finally:
            for record in records:
                if record.code == grpc.StatusCode.OK and not record.finish_reason:
                    record.code, record.message = outer.code, outer.message  # ended with the call
                self._account(record, count_call=False)
            outer.prompt_tokens = sum(r.prompt_tokens for r in records)
            outer.completion_tokens = sum(r.completion_tokens for r in records)
            outer.extra["requests"] = len(records)
            self._account(outer)

    # ---- helpers -------------------------------------------------------------------------------------
    def _ready(self) -> Backend:
        if self._draining:
            raise _Abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        if self._backend is None:
            raise _Abort(grpc.StatusCode.UNAVAILABLE, "model is still loading")
        return self._backend

    def _check(self, backend: Backend, request: Any) -> CheckedGenerate:
        try:
            return check_generate(request, backend.limits, backend.encode_prompt, backend.encode_chat)
        except InvalidField as error:
            raise _invalid(error) from None

    def _new_sequence(
        self,
        backend: Backend,
        checked: CheckedGenerate,
        channel: queue.SimpleQueue,
        tag: int,
        deadline: float | None,
    ) -> Sequence:
        try:
            return backend.new_sequence(checked, channel, tag, deadline)
        except ValueError as error:  # the engine's own checks; the servicer's should have caught it
            raise _invalid(InvalidField("request", str(error))) from None

    @contextmanager
    def _admission(self, backend: Backend, units: int) -> Iterator[None]:
        """Hold `units` of capacity for the life of the handler, or refuse at once."""
        with self._lock:
            # Checked again here: a call that passed _ready() may have been tokenising when the
            # drain began, and wait_idle() does not count it until it holds units.
            if self._draining:
                raise _Abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
            if self._held + units > self.capacity:
                held = self._held
                admitted = False
            else:
                self._held += units
                admitted = True
        if not admitted:
            raise _overloaded(
                f"{held} of {self.capacity} sequence slots in use", backend.scheduler.retry_after()
            )
        try:
            yield
        finally:
            with self._idle:
                self._held -= units
                self._idle.notify_all()

    def _submit(
        self,
        backend: Backend,
        context: grpc.ServicerContext,
        channel: queue.SimpleQueue,
        seqs: list[Sequence],
        ended: threading.Event,
    ) -> None:
        def call_ended() -> None:
            for seq in seqs:
                seq.cancel()
            channel.put(_CALL_ENDED)
            ended.set()

        try:
            backend.scheduler.submit(seqs)
        except QueueFull as full:
            raise _overloaded(str(full), full.retry_after) from None
        except RuntimeError as error:  # the scheduler stopped: the server is going down
            raise _Abort(grpc.StatusCode.UNAVAILABLE, str(error)) from None
        if not context.add_callback(call_ended):
            call_ended()  # the RPC already ended

    def _updates(
        self, channel: queue.SimpleQueue, count: int, context: grpc.ServicerContext, ended: threading.Event
    ) -> Iterator[_Delivery]:
        """Channel updates, each sequence's ready tokens merged, until `count` sequences have ended.

        The first message goes out as soon as there is a token. After that the handler sleeps out the
        rest of `stream_interval` before it looks again, rather than waking for every token: a woken
        handler competes with the engine thread for the GIL (and the engine's `put` wakes nobody when
        nobody waits), so fewer wake-ups and fewer, fuller messages leave the CPU to the engine. The
        pause is cut short by `ended` (a sequence's last update is in the channel, or the call ended):
        a finished stream's last tokens go out at once, not up to an interval late, which would leave
        a closed-loop client idle and its KV slot unused for that long.
        """
        open_count = count
        sent_at: float | None = None  # when the previous message went out
        while open_count:
            if sent_at is not None:
                pause = sent_at + self.stream_interval - time.monotonic()
                if pause > 0 and ended.wait(pause):
                    ended.clear()  # updates put before the set are in the channel: taken just below
            items = _take_ready(channel)
            if not items:
                try:
                    items = [channel.get(timeout=_CHANNEL_POLL_SECONDS), *_take_ready(channel)]
                except queue.Empty:
                    if not context.is_active():
                        raise _Abort(grpc.StatusCode.CANCELLED, "the call ended") from None
                    continue
            deliveries: dict[int, _Delivery] = {}
            for item in items:
                if item is _CALL_ENDED:
                    remaining = context.time_remaining()
                    if remaining is not None and remaining <= 0:
                        raise _Abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
                    raise _Abort(grpc.StatusCode.CANCELLED, "the call was cancelled")
                delivery = deliveries.setdefault(item.tag, _Delivery(item.tag))
                if isinstance(item.event, Failed):
                    delivery.failure = item.event
                else:
                    delivery.events.append(item.event)
                    delivery.times.append(item.time)
            for delivery in deliveries.values():
                if delivery.last:
                    open_count -= 1
                yield delivery
            sent_at = time.monotonic()

    def _observe(self, seq: Sequence, delivery: _Delivery, record: _CallRecord) -> None:
        """Metrics and log fields for the tokens of one delivery."""
        for t in delivery.times:
            if record.last_token_time is None:
                self.metrics.time_to_first_token.observe(t - seq.arrival)
            else:
                self.metrics.inter_token_latency.observe(t - record.last_token_time)
            record.last_token_time = t
        self.metrics.generated_tokens.inc(len(delivery.events))
        record.completion_tokens += len(delivery.events)
        if delivery.finish_reason is not None:
            record.finish_reason = str(delivery.finish_reason)
            record.extra.update(_timings(seq))

    def _response(self, backend: Backend, seq: Sequence, delivery: _Delivery) -> pb.GenerateResponse:
        events = delivery.events
        response = pb.GenerateResponse(
            text="".join(e.text for e in events),
            token_ids=[e.token_id for e in events],
            request_id=seq.request_id,
        )
        for event in events:
            if getattr(event, "logprob", None) is not None:
                chosen = pb.TokenLogprob(
                    token_id=event.token_id, token=backend.token_text(event.token_id), logprob=event.logprob
                )
                top = [
                    pb.TokenLogprob(token_id=tid, token=backend.token_text(tid), logprob=lp)
                    for tid, lp in (event.top_logprobs or [])
                ]
                response.logprobs.append(pb.TokenLogprobs(chosen=chosen, top=top))
        if delivery.finish_reason is not None:
            response.finish_reason = _FINISH_REASONS.get(
                str(delivery.finish_reason), pb.FINISH_REASON_UNSPECIFIED
            )
            response.usage.prompt_tokens = len(seq.prompt_ids)
            response.usage.completion_tokens = seq.generated
            t = _timings(seq)
            response.timings.queue_seconds = t["queue_s"]
            response.timings.time_to_first_token_seconds = t["ttft_s"]
            response.timings.decode_tokens_per_second = t["decode_tps"]
            response.timings.total_seconds = t["total_s"]
        return response

    def _fail(self, context: grpc.ServicerContext, record: _CallRecord, error: _Abort) -> None:
        record.code, record.message = error.code, error.message
        if error.code == grpc.StatusCode.CANCELLED and not context.is_active():
            return  # nobody is listening
        _abort(context, error)

    def _account(self, record: _CallRecord, count_call: bool = True) -> None:
        """Metrics and the one log line of a call (or of one request of a batch: count_call=False)."""
        if count_call:
            self.metrics.requests.labels(record.method, record.code.name).inc()
        if record.finish_reason:
            self.metrics.prompt_tokens.inc(record.prompt_tokens)
        line: dict[str, Any] = {
            "event": "request",
            "method": record.method,
            "request_id": record.request_id,
            "status": record.code.name,
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
        }
        if record.finish_reason:
            line["finish_reason"] = record.finish_reason
        line.update({k: round(v, 6) for k, v in record.extra.items()})
        line["elapsed_s"] = round(time.monotonic() - record.started, 6)
        if record.message:
            line["message"] = record.message
        request_log.info(json.dumps(line, ensure_ascii=False))


def _timings(seq: Sequence) -> dict[str, float]:
    admitted = seq.admitted_at if seq.admitted_at is not None else seq.arrival
    first = seq.first_token_at if seq.first_token_at is not None else admitted
    last = seq.last_token_at if seq.last_token_at is not None else first
    decode_time = last - first
    tps = (seq.generated - 1) / decode_time if seq.generated > 1 and decode_time > 0 else 0.0
    return {
        "queue_s": admitted - seq.arrival,
        "ttft_s": first - seq.arrival,
        "decode_tps": tps,
        "total_s": last - seq.arrival,
    }
