"""The built-in default model: the shipped file loads as a 2B4T-family model and our engine's greedy
continuations equal those of the training code (torch, ternary weights, int8 activations).

The expected ids in tests/fixtures/default_model_greedy.json were written by
tools/train_default_model.py from the trained torch model itself, not by our engine.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from bitnet_grpc.server.engine import DEFAULT_MODEL, Engine
from bitnet_grpc.server.loader import load_weights
from bitnet_grpc.server.sampling import SamplingParams

FIXTURE = Path(__file__).parent / "fixtures" / "default_model_greedy.json"


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load()  # no path: the model shipped as package data


def test_shipped_file_is_the_one_the_fixture_was_made_from(golden: dict) -> None:
    assert DEFAULT_MODEL.is_file(), f"package data missing: {DEFAULT_MODEL}"
    assert DEFAULT_MODEL.stat().st_size < 15 * 2**20
    assert hashlib.sha256(DEFAULT_MODEL.read_bytes()).hexdigest() == golden["model_sha256"]


def test_shipped_file_is_a_2b4t_family_model() -> None:
    weights = load_weights(str(DEFAULT_MODEL))
    cfg = weights.config
    assert cfg.arch == "bitnet-b1.58"
    assert cfg.activation == "relu2"
    assert cfg.tied_embeddings
    assert cfg.n_kv_heads < cfg.n_heads  # grouped-query attention
    assert weights.weight_format == "TQ2_0"
    assert weights.tokenizer.kind == "gpt2" and weights.tokenizer.pre == "llama-bpe"
    for name in ("blk.0.attn_sub_norm.weight", "blk.0.ffn_sub_norm.weight"):
        assert name in weights.float_tensors
    assert "output.weight" not in weights.float_tensors
    assert not any("activation" in c for c in weights.corrections), weights.corrections


def test_prompts_tokenise_like_the_training_tokenizer(engine: Engine, golden: dict) -> None:
    for case in golden["cases"]:
        assert engine.encode_prompt(case["prompt"]) == case["prompt_ids"], case["prompt"]


def test_greedy_continuations_match_the_training_code(engine: Engine, golden: dict) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=golden["max_tokens"], ignore_eos=True)
    mismatches = []
    for case in golden["cases"]:
        ids = [event.token_id for event in engine.generate(case["prompt"], params)]
        if ids != case["expected_ids"]:
            first = next(i for i, (a, b) in enumerate(zip(ids, case["expected_ids"], strict=False)) if a != b)
            mismatches.append(
                f"{case['prompt']!r}: first difference at token {first}: {ids} != {case['expected_ids']}"
            )
    assert not mismatches, "\n".join(mismatches)
