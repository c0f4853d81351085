"""Tokenizer tests against llama.cpp's vocabulary test files, plus decoding, streaming and chat format.

The `.inp`/`.out` pairs next to llama.cpp's `ggml-vocab-*.gguf` hold test strings and the ids the
original tokenizers (LLaMA-3's tokenizer.json, LLaMA-2's SentencePiece model) give them: an oracle we
did not write. `python tools/fetch_test_vocabs.py` puts them in tests/.cache/vocabs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from bitnet_grpc.server import chat_template
from bitnet_grpc.server.gguf_file import read_metadata
from bitnet_grpc.server.tokenizer import Tokenizer, spec_from_gguf_metadata, spec_from_hf_dir

VOCAB_DIR = Path(__file__).resolve().parent / ".cache" / "vocabs"
BPE_VOCAB = "ggml-vocab-llama-bpe.gguf"  # LLaMA-3, the 2B4T vocabulary
SPM_VOCAB = "ggml-vocab-llama-spm.gguf"  # LLaMA-2 SentencePiece
SEPARATOR = "\n__ggml_vocab_test__\n"  # between test strings in .inp (llama.cpp test-tokenizer-0)

BOS, EOS, EOT = 128000, 128001, 128009

MIXED_SAMPLES = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Crème brûlée à São Paulo, naïve façade, Ærøskøbing, Straße",
    "我想在apple工作1314151天～ 日本語のテキスト 한국어 문장",
    "emoji 👍🏽 😶‍🌫️ 🦙 👨‍👩‍👧‍👦 ✅🚀",
    "def square(x: int) -> int:\n\treturn x ** 2  # comment\n\n    if x != 0: print(f'{x!r}')\n",
    "a   b\t\t\n\n\n  c    \r\n   trailing   ",
    "مرحبا بالعالم — Ελληνικά — Русский текст — עברית",
    " leading space, 3333333 digits, 'quotes' and don't we'll I'M",
    "\u00a0non-breaking\u2009thin\u200bzero-width\ufeffbom",
]


def _require_vocab(name: str) -> Path:
    path = VOCAB_DIR / name
    if not path.is_file():
        message = f"{path} missing: run `python tools/fetch_test_vocabs.py` first"
        if os.environ.get("CI"):  # CI fetches them before pytest: missing there is a failure, not a skip
            pytest.fail(message)
        pytest.skip(message)
    return path


def _oracle_cases(vocab: Path) -> list[tuple[str, list[int]]]:
    """Parse .inp/.out as llama.cpp's test-tokenizer-0 does: inputs split on the separator line (a
    trailing separator ends the list), one line of space-separated ids per input."""
    raw = vocab.with_name(vocab.name + ".inp").read_bytes().decode("utf-8")
    inputs = []
    position = 0
    while position < len(raw):
        end = raw.find(SEPARATOR, position)
        if end < 0:
            inputs.append(raw[position:])
            break
        inputs.append(raw[position:end])
        position = end + len(SEPARATOR)
    lines = vocab.with_name(vocab.name + ".out").read_bytes().decode("utf-8").split("\n")
    if lines and lines[-1] == "":  # getline does not yield an empty last line
        lines.pop()
    assert len(inputs) == len(lines), f"{vocab.name}: {len(inputs)} inputs but {len(lines)} outputs"
    return [(text, [int(t) for t in line.split()]) for text, line in zip(inputs, lines, strict=True)]


@pytest.fixture(scope="module")
def bpe_meta() -> dict:
    return read_metadata(_require_vocab(BPE_VOCAB))


@pytest.fixture(scope="module")
def spm_meta() -> dict:
    return read_metadata(_require_vocab(SPM_VOCAB))


@pytest.fixture(scope="module")
def bpe(bpe_meta) -> Tokenizer:
    spec, _ = spec_from_gguf_metadata(bpe_meta)
    return Tokenizer.from_spec(spec)


@pytest.fixture(scope="module")
def spm(spm_meta) -> Tokenizer:
    spec, _ = spec_from_gguf_metadata(spm_meta)
    return Tokenizer.from_spec(spec)


@pytest.fixture(params=["bpe", "spm"])
def any_tokenizer(request) -> Tokenizer:
    return request.getfixturevalue(request.param)


def _vocab_of(tokenizer: Tokenizer) -> str:
    return BPE_VOCAB if tokenizer.vocab_size == 128256 else SPM_VOCAB


# -- the oracle -------------------------------------------------------------------------------------


def test_ids_match_llama_cpp_test_files(any_tokenizer):
    cases = _oracle_cases(_require_vocab(_vocab_of(any_tokenizer)))
    assert len(cases) > 40
    wrong = [
        (text, expected, got)
        for text, expected in cases
        if (got := any_tokenizer.encode(text, add_bos=False)) != expected
    ]
    assert not wrong, f"{len(wrong)} of {len(cases)} differ, first: {wrong[0]}"


def test_oracle_strings_round_trip(any_tokenizer):
    for text, _ in _oracle_cases(_require_vocab(_vocab_of(any_tokenizer))):
        assert any_tokenizer.decode(any_tokenizer.encode(text, add_bos=False)) == text


def test_known_ids(bpe, spm):
    assert bpe.encode("Hello world") == [BOS, 9906, 1917]  # LLaMA-3 adds BOS by default
    assert bpe.encode("Hello world", add_bos=False) == [9906, 1917]
    assert spm.encode("Hello world") == [1, 15043, 3186]
    assert spm.encode("") == [1] and spm.encode("", add_bos=False) == []


# -- decoding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", MIXED_SAMPLES)
def test_mixed_text_round_trips(any_tokenizer, text):
    ids = any_tokenizer.encode(text, add_bos=False)
    assert any_tokenizer.decode(ids) == text


def test_bos_and_special_tokens_decode(bpe, spm):
    ids = [BOS, 9906, EOT]
    assert bpe.decode(ids) == "<|begin_of_text|>Hello<|eot_id|>"
    assert bpe.decode(ids, skip_special=True) == "Hello"
    assert bpe.token_text(EOT) == "<|eot_id|>"
    assert bpe.token_text(22691) == " Hello"
    assert spm.decode(spm.encode("Hello world"), skip_special=True) == "Hello world"
    assert spm.decode([1, 15043], skip_special=False) == "<s> Hello"  # llama.cpp strips the first token only


def test_sentencepiece_leading_space_depends_on_position(spm):
    ids = spm.encode("Hello", add_bos=False)
    assert ids == [15043]
    assert spm.decode(ids) == "Hello"  # the dummy prefix of a text's start is not content
    assert spm.decode(ids, at_start=False) == " Hello"  # a continuation keeps its space
    decoder = spm.incremental_decoder()
    assert decoder.push(15043) == " Hello"


def test_out_of_range_ids_are_refused(bpe):
    for bad in (-1, bpe.vocab_size):
        with pytest.raises(ValueError):
            bpe.decode([9906, bad])
        with pytest.raises(ValueError):
            bpe.incremental_decoder().push(bad)


def test_parse_special_is_opt_in(bpe, spm):
    assert bpe.encode("<|eot_id|>", add_bos=False, parse_special=True) == [EOT]
    plain = bpe.encode("<|eot_id|>", add_bos=False)
    assert EOT not in plain and len(plain) > 1
    assert bpe.decode(plain) == "<|eot_id|>"
    # SentencePiece: the text after a special token gets the dummy-prefix space again (llama.cpp)
    assert spm.encode("Hello</s>Hello", add_bos=False, parse_special=True) == [15043, 2, 15043]
    assert 2 not in spm.encode("Hello</s>Hello", add_bos=False)


# -- streaming --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["🦙 emoji 👍🏽 😶‍🌫️ 👨‍👩‍👧‍👦", "naïve 我想在 🚀 한국어"])
def test_incremental_decoder_emits_whole_characters(any_tokenizer, text):
    ids = any_tokenizer.encode(text, add_bos=False)
    decoder = any_tokenizer.incremental_decoder(at_start=True)
    deltas = [decoder.push(token_id) for token_id in ids]
    deltas.append(decoder.flush())
    assert all("\ufffd" not in delta for delta in deltas)
    assert "" in deltas[:-1], "some token should end inside a character and be held back"
    assert "".join(deltas) == any_tokenizer.decode(ids) == text


def test_incremental_decoder_matches_decode_with_specials(bpe):
    ids = [BOS, *bpe.encode("Bonjour 🦙", add_bos=False), EOT]
    for skip in (False, True):
        decoder = bpe.incremental_decoder(skip_special=skip)
        streamed = "".join(decoder.push(t) for t in ids) + decoder.flush()
        assert streamed == bpe.decode(ids, skip_special=skip)


def test_incremental_decoder_holds_only_unfinished_characters(bpe):
    single_byte = {}
    for token_id in range(bpe.vocab_size):
        piece = bpe.token_bytes(token_id)
        if len(piece) == 1:
            single_byte.setdefault(piece[0], token_id)
    assert len(single_byte) == 256  # byte-level BPE has a token for every byte

    def stream(data: bytes) -> list[str]:
        decoder = bpe.incremental_decoder()
        return [decoder.push(single_byte[b]) for b in data] + [decoder.flush()]

    assert stream("€".encode()) == ["", "", "€", ""]
    assert stream("🦙".encode()) == ["", "", "", "🦙", ""]
    assert stream(b"\xe2\x82A") == ["", "", "\ufffdA", ""]  # truncated character, then ASCII
    assert stream(b"\x80x") == ["\ufffd", "x", ""]  # a stray continuation byte is not held
    assert stream(b"ok\xf0\x9f") == ["o", "k", "", "", "\ufffd"]  # flush gives up on the rest


# -- chat template ----------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": " Hi there!\n"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Name a colour."},
]


def test_2b4t_chat_template_renders_exactly(bpe):
    assert bpe.chat_template == chat_template.BITNET_2B4T_TEMPLATE
    assert bpe.apply_chat_template(CONVERSATION) == (
        "<|begin_of_text|>System: You are a helpful assistant.<|eot_id|>"
        "User: Hi there!<|eot_id|>"
        "Assistant: Hello! How can I help?<|eot_id|>"
        "User: Name a colour.<|eot_id|>"
        "Assistant: "
    )
    assert bpe.apply_chat_template(CONVERSATION[:2], add_generation_prompt=False) == (
        "<|begin_of_text|>System: You are a helpful assistant.<|eot_id|>User: Hi there!<|eot_id|>"
    )


def test_encode_chat_has_one_bos_and_real_turn_ends(bpe):
    ids = bpe.encode_chat(CONVERSATION)
    assert ids[0] == BOS and ids.count(BOS) == 1
    assert ids.count(EOT) == len(CONVERSATION)
    assert bpe.decode(ids) == bpe.apply_chat_template(CONVERSATION)
    assert ids[-3:] == bpe.encode("Assistant: ", add_bos=False)


def test_template_errors_and_sandbox():
    failing = "{% if messages|length == 0 %}{{ raise_exception('no messages') }}{% endif %}ok"
    with pytest.raises(chat_template.ChatTemplateError, match="no messages"):
        chat_template.render(failing, [])
    assert chat_template.render(failing, [{"role": "user", "content": "x"}]) == "ok"
    escape = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(chat_template.ChatTemplateError):
        chat_template.render(escape, [])
    with pytest.raises(chat_template.ChatTemplateError):
        chat_template.render("{% for %}", [])


# -- corrections ------------------------------------------------------------------------------------

PLACEHOLDER = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'Human: ' + message['content'] + '\\n\\nBITNETAssistant: ' + eos_token }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def test_corrections_for_a_2b4t_style_file(bpe_meta):
    meta = {k: v for k, v in bpe_meta.items() if k != "tokenizer.ggml.pre"}
    meta["tokenizer.chat_template"] = PLACEHOLDER
    spec, corrections = spec_from_gguf_metadata(meta)
    assert spec.pre == "llama-bpe"
    assert spec.chat_template == chat_template.BITNET_2B4T_TEMPLATE
    assert spec.stop_ids == [EOS, EOT]
    assert spec.add_bos and spec.bos_id == BOS
    assert len(corrections) == 3
    assert any("tokenizer.ggml.pre is missing" in c and "llama-bpe" in c for c in corrections)
    assert any("placeholder" in c for c in corrections)
    assert any("<|eot_id|>" in c and "128009" in c for c in corrections)
    tokenizer = Tokenizer.from_spec(spec)
    for text, expected in _oracle_cases(_require_vocab(BPE_VOCAB))[:20]:
        assert tokenizer.encode(text, add_bos=False) == expected


def test_no_corrections_for_a_complete_file(bpe_meta):
    meta = dict(bpe_meta)
    meta["tokenizer.chat_template"] = chat_template.BITNET_2B4T_TEMPLATE
    meta["tokenizer.ggml.eot_token_id"] = EOT
    spec, corrections = spec_from_gguf_metadata(meta)
    assert corrections == []
    assert spec.stop_ids == [EOS, EOT]


def test_missing_pre_elsewhere_falls_back_to_default_split():
    # A byte-level vocabulary that is not LLaMA-3 and has no `.pre`: llama.cpp's 'default' split.
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": ["a", "b", "ab", "Ġ", "Ġab", "<eos>"],
        "tokenizer.ggml.token_type": [1, 1, 1, 1, 1, 1],  # EOS typed as text: a defect
        "tokenizer.ggml.merges": ["a b", "Ġ ab"],
        "tokenizer.ggml.eos_token_id": 5,
    }
    spec, corrections = spec_from_gguf_metadata(meta)
    assert spec.pre == "default" and spec.stop_ids == [5] and not spec.add_bos
    assert any("'default'" in c for c in corrections)
    assert spec.token_types[5] == 3 and any("'<eos>' (id 5)" in c for c in corrections)
    tokenizer = Tokenizer.from_spec(spec)
    assert tokenizer.encode("ab ab") == [2, 4]
    assert tokenizer.encode("ab<eos>", parse_special=True) == [2, 5]
    assert tokenizer.decode([2, 5], skip_special=True) == "ab"


def test_unsupported_inputs_are_refused(bpe_meta):
    with pytest.raises(ValueError, match="tokenizer.ggml.model"):
        spec_from_gguf_metadata({"tokenizer.ggml.model": "bert"})
    spec, _ = spec_from_gguf_metadata({**bpe_meta, "tokenizer.ggml.pre": "no-such-split"})
    with pytest.raises(ValueError, match="no-such-split"):
        Tokenizer.from_spec(spec)


# -- Hugging Face folder ----------------------------------------------------------------------------

HF_2B4T_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize + ': ' + message['content'] | trim "
    "+ '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)


def _write_llama3_hf_folder(meta: dict, folder: Path) -> None:
    """A tokenizer.json built the way LLaMA-3's is, from the GGUF vocabulary, written with the
    `tokenizers` library directly (not through our Tokenizer)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    tokens = meta["tokenizer.ggml.tokens"]
    types = meta["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    hf = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=True))
    split = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), "isolated"), pre_tokenizers.ByteLevel(False, use_regex=False)]
    )
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True) for t, k in zip(tokens, types, strict=True) if k == 3])
    hf.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", BOS)]
    )
    (folder / "tokenizer.json").write_text(hf.to_str(), encoding="utf-8")
    config = {
        "bos_token": "<|begin_of_text|>",
        "eos_token": {"content": "<|end_of_text|>", "special": True},
        "chat_template": HF_2B4T_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def test_hf_folder_matches_the_oracle(bpe_meta, tmp_path):
    _write_llama3_hf_folder(bpe_meta, tmp_path)
    spec, corrections = spec_from_hf_dir(tmp_path)
    assert spec.kind == "hf-json" and spec.pre == "llama-bpe"
    assert spec.bos_id == BOS and spec.eos_id == EOS and spec.add_bos
    assert spec.stop_ids == [EOS, EOT] and len(corrections) == 1 and "<|eot_id|>" in corrections[0]
    assert len(spec.tokens) == 128256 and len(spec.merges) == len(bpe_meta["tokenizer.ggml.merges"])
    tokenizer = Tokenizer.from_spec(spec)
    for text, expected in _oracle_cases(_require_vocab(BPE_VOCAB)):
        ids = tokenizer.encode(text, add_bos=False)
        assert ids == expected, text
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode("<|eot_id|>", add_bos=False, parse_special=True) == [EOT]
    assert EOT not in tokenizer.encode("<|eot_id|>", add_bos=False)
    assert tokenizer.apply_chat_template(CONVERSATION[1:2]) == "User: Hi there!<|eot_id|>Assistant: "
    assert tokenizer.encode_chat(CONVERSATION[1:2])[:1] == [BOS]
