"""Engine: generation loop, stop conditions, stop strings across tokens, UTF-8 safety, loading."""

import numpy as np
import pytest
from _formats_helpers import BOS, EOS, EOT, tokenizer_spec
from _model_helpers import numpy_forward, random_weights
from bitnet_grpc.server import engine as engine_module
from bitnet_grpc.server.engine import Engine, SequenceState, StopMatcher
from bitnet_grpc.server.sampling import SamplingParams
from bitnet_grpc.server.tokenizer import Tokenizer

TOKENIZER = Tokenizer.from_spec(tokenizer_spec())
VOCAB = TOKENIZER.vocab_size


@pytest.fixture(scope="module")
def engine():
    return Engine.from_weights(random_weights(11), ctx_size=48, n_slots=2)


# ---- stop strings ------------------------------------------------------------------------------------


def feed(matcher, pieces):
    out, stopped = [], False
    for piece in pieces:
        text, stopped = matcher.push(piece)
        out.append(text)
        if stopped:
            break
    return out, stopped


def test_stop_string_across_pieces_is_cut_and_held_back():
    out, stopped = feed(StopMatcher(["END"]), ["ab", "cE", "N", "Dxyz"])
    assert stopped and out == ["ab", "c", "", ""]


def test_held_text_released_when_it_is_not_a_stop():
    matcher = StopMatcher(["END"])
    out, stopped = feed(matcher, ["xE", "Nd", "E"])
    assert not stopped and out == ["x", "ENd", ""]
    assert matcher.flush() == "E"


def test_earliest_of_several_stops_wins():
    out, stopped = feed(StopMatcher(["world", "lo w"]), ["hel", "lo wor", "ld"])
    assert stopped and "".join(out) == "hel"


def test_no_stops_passes_through():
    assert StopMatcher([]).push("anything") == ("anything", False)


# ---- SequenceState with hand-made logits -------------------------------------------------------------


def onehot(token, vocab=VOCAB):
    row = np.full(vocab, -10.0, np.float32)
    row[token] = 10.0
    return row


def run_tokens(tokens, ctx_size=64, **params):
    seq = SequenceState(
        [BOS, 5], SamplingParams(temperature=0.0, **params), TOKENIZER, ctx_size=ctx_size,
        vocab_size=VOCAB, stop_ids=[EOS, EOT],
    )  # fmt: skip
    events = []
    for token in tokens:
        events.append(seq.step(onehot(token)))
        if events[-1].finish_reason:
            break
    return seq, events


def ids(text):
    return TOKENIZER.encode(text, add_bos=False)


BYTE_TOKEN = {TOKENIZER.token_bytes(i): i for i in range(256)}  # the byte-level alphabet


def test_text_deltas_never_split_utf8():
    tokens = [BYTE_TOKEN[bytes([b])] for b in "é€".encode()]  # 2 + 3 bytes, one token each
    _, events = run_tokens(tokens, max_tokens=5)
    assert [e.text for e in events] == ["", "é", "", "", "€"]
    assert events[-1].finish_reason == "length"


def test_unfinished_character_is_flushed_at_the_end():
    _, events = run_tokens([BYTE_TOKEN[b"a"], BYTE_TOKEN[bytes([0xE2])]], max_tokens=2)
    assert [e.text for e in events] == ["a", "\ufffd"]


def test_stop_token_ends_without_text_and_ignore_eos_continues():
    hello = ids("hello")
    _, events = run_tokens([*hello, EOT, *ids("x")])
    assert [e.finish_reason for e in events] == [None] * len(hello) + ["stop"]
    assert "".join(e.text for e in events) == "hello"
    _, events = run_tokens([*hello, EOT, *ids("x")], ignore_eos=True, max_tokens=len(hello) + 2)
    assert events[-1].finish_reason == "length"
    assert "".join(e.text for e in events) == "hellox"  # the control token itself shows no text


def test_stop_string_across_tokens():
    tokens = ids("say STOP now")
    seq, events = run_tokens(tokens, stop=["ST", "OP now"])
    assert events[-1].finish_reason == "stop_sequence"
    assert "".join(e.text for e in events) == "say "
    tokens = ids("one two three")
    _, events = run_tokens(tokens, stop=["o thr"])
    assert "".join(e.text for e in events) == "one tw"
    assert events[-1].finish_reason == "stop_sequence"


def test_held_back_text_is_flushed_on_length():
    tokens = ids("abcS")
    _, events = run_tokens(tokens, stop=["STOP"], max_tokens=len(tokens))
    assert "".join(e.text for e in events) == "abcS"
    assert events[-1].finish_reason == "length"


@pytest.mark.parametrize("last", [BYTE_TOKEN[bytes([0xE2])], EOT], ids=["length", "stop-token"])
def test_stop_string_completed_by_the_final_flush_is_a_stop_sequence(last):
    # "a" is held back (it begins the stop string); the lone lead byte only becomes U+FFFD when the
    # sequence ends, and that completes the stop string.
    lead = BYTE_TOKEN[bytes([0xE2])]
    tokens = [BYTE_TOKEN[b"x"], BYTE_TOKEN[b"a"], lead] + ([last] if last == EOT else [])
    _, events = run_tokens(tokens, stop=["a\ufffd"], max_tokens=3 if last == lead else 10)
    assert events[-1].finish_reason == "stop_sequence"
    assert "".join(e.text for e in events) == "x"


def test_context_full_and_positions():
    seq, events = run_tokens(ids("abcdefgh"), ctx_size=5)
    # prompt at positions 0, 1; generated tokens are fed at 2, 3, 4; the fourth one is sampled from
    # position 4's logits but has no position left to be fed at
    assert len(events) == 4 and events[-1].finish_reason == "context_full"
    assert seq.next_position == 5
    with pytest.raises(RuntimeError):
        seq.step(onehot(5))


def test_logprobs_in_events():
    seq, events = run_tokens(ids("ab"), logprobs=2)
    assert events[0].logprob == pytest.approx(10.0 - np.log(np.exp(10.0) + (VOCAB - 1) * np.exp(-10.0)))
    assert events[0].top_logprobs[0][0] == ids("ab")[0] and len(events[0].top_logprobs) == 2
    _, events = run_tokens(ids("ab"))
    assert events[0].logprob is None and events[0].top_logprobs == []


def test_sequence_checks_prompt():
    with pytest.raises(ValueError, match="context"):
        SequenceState([1] * 9, SamplingParams(), TOKENIZER, ctx_size=8, vocab_size=VOCAB, stop_ids=[])
    with pytest.raises(ValueError, match="empty"):
        SequenceState([], SamplingParams(), TOKENIZER, ctx_size=8, vocab_size=VOCAB, stop_ids=[])
    with pytest.raises(ValueError, match="vocabulary"):
        SequenceState([VOCAB], SamplingParams(), TOKENIZER, ctx_size=8, vocab_size=VOCAB, stop_ids=[])
    with pytest.raises(ValueError, match="top_p"):
        SequenceState([1], SamplingParams(top_p=2.0), TOKENIZER, ctx_size=8, vocab_size=VOCAB, stop_ids=[])


# ---- the engine over a real (random) model ------------------------------------------------------------


def test_greedy_generation_follows_the_numpy_reference(engine):
    prompt = "the cat"
    events = list(engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)))
    assert len(events) == 8 and events[-1].finish_reason == "length"
    assert all(e.finish_reason is None for e in events[:-1])
    tokens = TOKENIZER.encode(prompt)
    for event in events:  # teacher-forced reference: each greedy token is the reference's arg-max
        expected = numpy_forward(engine_weights(), tokens)[-1]
        assert event.token_id == int(np.argmax(expected))
        tokens.append(event.token_id)
    generated = [e.token_id for e in events]
    assert "".join(e.text for e in events) == TOKENIZER.decode(generated, skip_special=True, at_start=False)


def engine_weights():
    return random_weights(11)


def test_seeded_sampling_is_reproducible(engine):
    params = SamplingParams(
        temperature=1.0, top_p=0.95, seed=1234, max_tokens=12, logprobs=3, ignore_eos=True
    )
    first = [(e.token_id, e.text, e.logprob) for e in engine.generate("the", params)]
    again = [(e.token_id, e.text, e.logprob) for e in engine.generate("the", params)]
    assert first == again
    other = [
        e.token_id for e in engine.generate("the", SamplingParams(seed=99, max_tokens=12, ignore_eos=True))
    ]
    assert other != [t for t, _, _ in first]


def test_token_id_prompt_and_prefill_chunks(engine, monkeypatch):
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    prompt = [BOS] + [(7 * i) % 250 for i in range(30)]
    whole = [e.token_id for e in engine.generate(prompt, params)]
    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", 7)  # several chunks, last one partial
    chunked = [e.token_id for e in engine.generate(prompt, params)]
    assert chunked == whole


def test_slot_is_returned_when_the_stream_is_closed(engine):
    free = engine.model.kv.free_slots()
    stream = engine.generate("abc", SamplingParams(max_tokens=20))
    next(stream)
    assert engine.model.kv.free_slots() == free - 1
    stream.close()
    assert engine.model.kv.free_slots() == free


def test_errors_come_before_any_work(engine):
    with pytest.raises(ValueError, match="context"):
        engine.generate([1] * 49, SamplingParams())
    with pytest.raises(ValueError, match="temperature"):
        engine.generate("hi", SamplingParams(temperature=-1.0))
    assert engine.model.kv.free_slots() == 2


def test_prompt_filling_the_context_gets_one_token(engine):
    events = list(engine.generate([BOS] + [3] * 47, SamplingParams(temperature=0.0, ignore_eos=True)))
    assert len(events) == 1 and events[0].finish_reason == "context_full"


def test_missing_default_model_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(engine_module, "DEFAULT_MODEL", tmp_path / "default-model.gguf")
    with pytest.raises(FileNotFoundError, match="default model"):
        Engine.load()


def test_stop_ids_come_from_the_tokenizer(engine):
    assert sorted(engine.stop_ids) == sorted([EOS, EOT])


def test_load_a_gguf_file_generates_like_the_weights_it_holds(tmp_path):
    from bitnet_grpc.server.gguf_export import write_gguf

    weights = random_weights(12)
    path = tmp_path / "tiny.gguf"
    write_gguf(weights, path, "i2_s", embed_type="f32")
    loaded = Engine.load(str(path), ctx_size=32)
    direct = Engine.from_weights(weights, ctx_size=32)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    assert loaded.ctx_size == 32 and loaded.config.n_layers == 2
    assert [e.token_id for e in loaded.generate("hi", params)] == [
        e.token_id for e in direct.generate("hi", params)
    ]


def test_padding_ids_beyond_the_tokenizer_are_never_sampled():
    seq = SequenceState(
        [BOS], SamplingParams(temperature=0.0), TOKENIZER, ctx_size=16, vocab_size=VOCAB + 5, stop_ids=[]
    )
    row = np.zeros(VOCAB + 5, np.float32)
    row[VOCAB + 2] = 50.0  # the best logit sits on a padding row
    row[7] = 1.0
    assert seq.step(row).token_id == 7
