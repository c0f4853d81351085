"""The servicer's Backend over the in-process engine: tokenizer calls, model facts and new sequences.

It is the one place where the gRPC layer meets the engine's types (`Engine`, `SequenceState`, the
tokenizer), so the servicer stays a translation layer and the scheduler stays gRPC-free.
"""

from __future__ import annotations

import logging
import queue
from dataclasses import dataclass

from bitnet_grpc.proto import generation_pb2 as pb
from bitnet_grpc.server.chat_template import ChatTemplateError
from bitnet_grpc.server.engine import DEFAULT_MODEL, Engine, choose_tokens
from bitnet_grpc.server.scheduler import DEFAULT_STEP_TOKENS, Scheduler, Sequence
from bitnet_grpc.server.validation import CheckedGenerate, GenerationLimits, InvalidField
from bitnet_grpc.server.weights import ModelWeights

log = logging.getLogger("bitnet_grpc.serve")


@dataclass(frozen=True)
class ModelFacts:
    """What GetModelInfo reports that the packed model no longer knows (taken before weights are freed)."""

    path: str
    architecture: str
    parameter_count: int
    weight_format: str

    @classmethod
    def of(cls, weights: ModelWeights) -> ModelFacts:
        return cls(weights.source, weights.config.arch, weights.param_count(), weights.weight_format)


class EngineBackend:
    """An engine plus the scheduler that batches its sequences."""

    def __init__(
        self,
        engine: Engine,
        facts: ModelFacts,
        *,
        max_batch: int,
        max_queue: int,
        step_tokens: int | None = None,
    ) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.facts = facts
        self.scheduler = Scheduler(
            engine.model,
            max_batch=max_batch,
            max_queue=max_queue,
            step_tokens=max(step_tokens or DEFAULT_STEP_TOKENS, max_batch),
            choose=choose_tokens,
        )
        self.limits = GenerationLimits(
            vocab_size=engine.config.vocab_size,
            context_size=engine.ctx_size,
            has_chat_template=bool(self.tokenizer.chat_template),
        )

    def encode_prompt(self, text: str) -> list[int]:
        return self.engine.encode_prompt(text)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            return self.tokenizer.encode_chat(messages)
        except ChatTemplateError as error:  # e.g. the template refuses the order of roles
            raise InvalidField("messages", str(error)) from None

    def tokenize(self, text: str, add_special_tokens: bool) -> tuple[list[int], list[str]]:
        ids = self.tokenizer.encode(text, add_bos=None if add_special_tokens else False)
        return ids, [self.tokenizer.token_text(t) for t in ids]

    def detokenize(self, token_ids: list[int], skip_special_tokens: bool) -> str:
        if token_ids and max(token_ids) >= self.tokenizer.vocab_size:
            i = next(i for i, t in enumerate(token_ids) if t >= self.tokenizer.vocab_size)
            raise InvalidField(f"token_ids[{i}]", f"no token {token_ids[i]} in the tokenizer's vocabulary")
        return self.tokenizer.decode(token_ids, skip_special=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        if token_id >= self.tokenizer.vocab_size:  # padding rows of the embedding have no text
            return ""
        return self.tokenizer.token_text(token_id)

    def new_sequence(
        self, checked: CheckedGenerate, channel: queue.SimpleQueue, tag: int, deadline: float | None
    ) -> Sequence:
        state = self.engine.new_sequence(checked.prompt_ids, checked.params)
        return Sequence(
            prompt_ids=state.prompt_ids,
            decoder=state,
            channel=channel,
            tag=tag,
            deadline=deadline,
            request_id=checked.request_id,
        )

    def model_info(self) -> pb.ModelInfo:
        from bitnet_grpc.cyext import ternary

        cfg = self.engine.config
        tok = self.tokenizer
        return pb.ModelInfo(
            model_path=self.facts.path,
            architecture=self.facts.architecture,
            parameter_count=self.facts.parameter_count,
            weight_format=self.facts.weight_format,
            context_size=self.engine.ctx_size,
            vocab_size=cfg.vocab_size,
            bos_token_id=tok.bos_id if tok.bos_id is not None else 0,
            stop_token_ids=self.engine.stop_ids,
            kernel_path=ternary.get_kernel_path(),
            threads=ternary.get_num_threads(),
            max_batch=self.scheduler.max_batch,
            max_queue=self.scheduler.max_queue,
            activation=cfg.activation,
            layers=cfg.n_layers,
            hidden_size=cfg.d_model,
            has_chat_template=self.limits.has_chat_template,
        )


def backend_from_weights(
    weights: ModelWeights,
    *,
    max_batch: int,
    max_queue: int,
    ctx_size: int | None = None,
    threads: int | None = None,
    step_tokens: int | None = None,
) -> EngineBackend:
    """A started backend on already-loaded weights (tests build several servers from one load)."""
    engine = Engine.from_weights(weights, ctx_size=ctx_size, n_slots=max_batch, threads=threads)
    backend = EngineBackend(
        engine, ModelFacts.of(weights), max_batch=max_batch, max_queue=max_queue, step_tokens=step_tokens
    )
    backend.scheduler.start()
    return backend


def load_engine_backend(options) -> EngineBackend:  # options: serve.ServeOptions
    """Load the model named by the serve options (default: the built-in one) and start its scheduler."""
    from bitnet_grpc.server.loader import load_weights

    path = options.model or str(DEFAULT_MODEL)
    log.info("loading %s", path)
    weights = load_weights(path)
    for correction in weights.corrections:
        log.info("loader: %s", correction)
    return backend_from_weights(
        weights,
        max_batch=options.max_batch,
        max_queue=options.max_queue,
        ctx_size=options.ctx_size,
        threads=options.threads,
        step_tokens=options.step_tokens,
    )
