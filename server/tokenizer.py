"""Text <-> token ids for BitNet models, tokenising the way llama.cpp and the original tokenizers do.

Encoding runs on the `tokenizers` library, configured from a `TokenizerSpec`:
- `gpt2` (byte-level BPE, the LLaMA-3 vocabulary of 2B4T): the pre-tokenizer split named by
  `tokenizer.ggml.pre`, then GPT-2's byte-to-unicode mapping, then BPE merges.
- `llama` (SentencePiece, LLaMA-2): spaces become `▁`, a dummy-prefix space starts the text (and every
  stretch of text after a special token, as in llama.cpp), and SentencePiece's highest-score-first pair
  merging is expressed as BPE merges ordered by score, with `<0xXX>` byte fallback.
- `hf-json`: the tokenizer.json as written.
Special tokens are split off here rather than by the library, so `parse_special` is a per-call choice:
control tokens are recognised only when asked; user-defined tokens always are (llama.cpp's rule).

Decoding goes through a table of each token's bytes rather than the library's decoders: streaming needs
bytes (a token can end in the middle of a UTF-8 character) and one table keeps `decode` and the
incremental decoder identical.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import tokenizers
from tokenizers import Regex, models, normalizers, pre_tokenizers

from . import chat_template
from .tokenizer_spec import (
    LLAMA3_PRE_NAMES,
    TOKEN_BYTE,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNKNOWN,
    TOKEN_UNUSED,
    TOKEN_USER_DEFINED,
    spec_from_gguf_metadata,
    spec_from_hf_dir,
)
from .weights import TokenizerSpec

__all__ = [
    "IncrementalDecoder",
    "Tokenizer",
    "spec_from_gguf_metadata",
    "spec_from_hf_dir",
]

SPM_SPACE = "\u2581"  # SentencePiece's visible space, "▁"

# Pre-tokenizer splits (regexes applied in turn, each splitting the pieces of the previous), by
# `tokenizer.ggml.pre`. Facts from llama.cpp's llama-vocab.cpp; the LLaMA-3 one is the original regex of
# the LLaMA-3 tokenizer.json, which the `tokenizers` regex engine runs as written.
_GPT2_WORDS = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS_BY_FAMILY: dict[str, tuple[str, ...]] = {
    "llama3": (_LLAMA3,),
    "gpt2": (_GPT2_WORDS + r"|\s+",),
    "qwen2": (_QWEN2,),
    "starcoder": (r"\p{N}", _GPT2_WORDS),
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_WORDS, r"\p{N}+", r"[0-9][0-9][0-9]"),
}
_FAMILY_BY_PRE: dict[str, str] = {
    **{name: "llama3" for name in LLAMA3_PRE_NAMES},
    **{name: "gpt2" for name in ("gpt-2", "phi-2", "mpt", "olmo", "jais", "jina-es", "jina-de")},
    **{name: "qwen2" for name in ("qwen2", "stablelm2", "deepseek-r1-qwen")},
    **{name: "starcoder" for name in ("starcoder", "refact", "command-r", "smollm", "codeshell")},
    "default": "default",
}
# Families whose BPE looks a whole split piece up in the vocabulary before merging (llama.cpp
# `ignore_merges`, tokenizer.json `"ignore_merges": true`).
_WHOLE_WORD_FIRST = frozenset({"llama3"})

# Token types whose text is markup rather than content: hidden by `skip_special`.
_SPECIAL_TYPES = frozenset({TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_UNUSED})


def supported_pre_tokenizers() -> list[str]:
    return sorted(_FAMILY_BY_PRE)


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters used in byte-level BPE vocabularies.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes get code points from 256 upwards,
    in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_UNICODE_TO_BYTE = {char: byte for byte, char in _byte_to_unicode().items()}
# str.translate table: alphabet characters to the code point of their byte (then Latin-1 gives the byte);
# characters below 256 that are not in the alphabet to a sentinel that makes the Latin-1 encoding fail.
_BYTE_LEVEL_TRANSLATION = {
    **{code: 0xFFFF for code in range(256)},
    **{ord(char): byte for char, byte in _UNICODE_TO_BYTE.items()},
}


def _byte_level_bytes(text: str) -> bytes:
    try:
        return text.translate(_BYTE_LEVEL_TRANSLATION).encode("latin-1")
    except UnicodeEncodeError:  # a character outside the byte alphabet: keep it as UTF-8
        to_byte = _UNICODE_TO_BYTE
        return b"".join(bytes((to_byte[c],)) if c in to_byte else c.encode("utf-8") for c in text)


def _sentencepiece_bytes(text: str, token_type: int) -> bytes:
    if token_type == TOKEN_BYTE and len(text) == 6 and text.startswith("<0x"):
        return bytes((int(text[3:5], 16),))
    return text.replace(SPM_SPACE, " ").encode("utf-8")


def _piece_table(tokens: Sequence[str], token_types: Sequence[int], style: str) -> list[bytes]:
    """The bytes each token stands for. Special and user-defined tokens stand for their own text."""
    table: list[bytes] = []
    for text, token_type in zip(tokens, token_types, strict=True):
        if token_type in _SPECIAL_TYPES or token_type == TOKEN_USER_DEFINED:
            table.append(text.encode("utf-8"))
        elif style == "byte-level":
            table.append(_byte_level_bytes(text))
        else:
            table.append(_sentencepiece_bytes(text, token_type))
    return table


def _special_pattern(tokens: Sequence[str], token_types: Sequence[int], types: frozenset[int]):
    """A regex matching the texts of tokens of `types`, longest first; None if there are none."""
    texts = sorted(
        {t for t, k in zip(tokens, token_types, strict=True) if k in types and t}, key=len, reverse=True
    )
    if not texts:
        return None
    return re.compile("|".join(re.escape(t) for t in texts))


def _spm_merges(tokens: Sequence[str], token_types: Sequence[int], scores: Sequence[float]):
    """SentencePiece BPE as ordinary BPE merges: every split of a token into two vocabulary pieces,
    ordered by the merged token's score (highest first), ties by token id then by the pieces' ids.

    SentencePiece merges the adjacent pair whose concatenation scores highest; BPE applies the
    lowest-ranked merge first, so ranking merges by that score gives the same result.
    """
    ids = {text: i for i, text in enumerate(tokens)}
    ranked: list[tuple[float, int, int, int, str, str]] = []
    for token_id, (text, token_type) in enumerate(zip(tokens, token_types, strict=True)):
        if token_type != TOKEN_NORMAL or len(text) < 2:
            continue
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            left_id, right_id = ids.get(left), ids.get(right)
            if left_id is not None and right_id is not None:
                ranked.append((-scores[token_id], token_id, left_id, right_id, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _vocab_dict(tokens: Sequence[str]) -> dict[str, int]:
    return {text: token_id for token_id, text in enumerate(tokens)}


def _build_gpt2(spec: TokenizerSpec) -> tokenizers.Tokenizer:
    pre = spec.pre or "default"
    family = _FAMILY_BY_PRE.get(pre)
    if family is None:
        raise ValueError(
            f"unsupported pre-tokenizer {pre!r} (tokenizer.ggml.pre); supported: "
            + ", ".join(supported_pre_tokenizers())
        )
    merges = [tuple(m.split(" ", 1)) for m in spec.merges]
    if any(len(m) != 2 for m in merges):
        raise ValueError("tokenizer merges must be 'left right' pairs")
    model = models.BPE(
        _vocab_dict(spec.tokens), merges, ignore_merges=family in _WHOLE_WORD_FIRST, fuse_unk=False
    )
    core = tokenizers.Tokenizer(model)
    splits = [
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)
        for pattern in _SPLITS_BY_FAMILY[family]
    ]
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    return core


def _build_sentencepiece(spec: TokenizerSpec) -> tokenizers.Tokenizer:
    types = spec.token_types
    scores = spec.scores or [-float(i) for i in range(len(spec.tokens))]
    unk = next((t for t, k in zip(spec.tokens, types, strict=True) if k == TOKEN_UNKNOWN), None)
    model = models.BPE(
        _vocab_dict(spec.tokens),
        _spm_merges(spec.tokens, types, scores),
        unk_token=unk,
        fuse_unk=True,
        byte_fallback=True,
    )
    core = tokenizers.Tokenizer(model)
    core.normalizer = normalizers.Replace(" ", SPM_SPACE)
    return core


def _find(node: Any, type_name: str) -> Mapping[str, Any] | None:
    """The first component of a tokenizer.json section with the given "type"."""
    if isinstance(node, Mapping):
        if node.get("type") == type_name:
            return node
        children: Iterable[Any] = node.values()
    elif isinstance(node, list):
        children = node
    else:
        return None
    for child in children:
        found = _find(child, type_name)
        if found is not None:
            return found
    return None


def _hf_decoding(tokenizer_json: str) -> tuple[str, bool]:
    """(piece style, strip the first space) from the tokenizer.json decoder."""
    data = json.loads(tokenizer_json)
    decoder = data.get("decoder")
    if _find(decoder, "ByteLevel") is not None:
        return "byte-level", False
    if _find(decoder, "ByteFallback") is not None or (data.get("model") or {}).get("byte_fallback"):
        strip = _find(decoder, "Strip")
        return "sentencepiece", bool(strip and strip.get("start", 0) > 0)
    metaspace = _find(decoder, "Metaspace")
    if metaspace is not None:
        scheme = metaspace.get("prepend_scheme", "always" if metaspace.get("add_prefix_space") else "never")
        return "sentencepiece", scheme != "never"
    raise ValueError("tokenizer.json decoder is neither byte-level nor SentencePiece-style: not supported")


class Tokenizer:
    """Encode, decode and stream-decode text for one model; render its chat template."""

    def __init__(
        self,
        spec: TokenizerSpec,
        core: tokenizers.Tokenizer,
        *,
        piece_style: str,
        space_prefix: bool,
        strip_first_space: bool,
    ) -> None:
        self.spec = spec
        self._core = core
        tokens = spec.tokens
        types = spec.token_types
        self._tokens = tokens
        self._pieces = _piece_table(tokens, types, piece_style)
        self._special_ids = frozenset(i for i, k in enumerate(types) if k in _SPECIAL_TYPES)
        self._ids_by_text = {
            t: i for i, (t, k) in enumerate(zip(tokens, types, strict=True)) if k != TOKEN_NORMAL
        }
        self._always_split = _special_pattern(tokens, types, frozenset({TOKEN_USER_DEFINED}))
        self._special_split = _special_pattern(
            tokens, types, frozenset({TOKEN_USER_DEFINED, TOKEN_CONTROL, TOKEN_UNKNOWN})
        )
        self._space_prefix = space_prefix
        self._strip_first_space = strip_first_space

    @classmethod
    def from_spec(cls, spec: TokenizerSpec) -> Tokenizer:
        n = len(spec.tokens)
        if (spec.token_types and len(spec.token_types) != n) or (spec.scores and len(spec.scores) != n):
            raise ValueError(f"token_types and scores must have one entry per token ({n} tokens)")
        if not spec.token_types:
            spec = dataclasses.replace(spec, token_types=[TOKEN_NORMAL] * n)
        if spec.kind == "gpt2":
            return cls(
                spec, _build_gpt2(spec), piece_style="byte-level", space_prefix=False, strip_first_space=False
            )
        if spec.kind == "llama":
            return cls(
                spec,
                _build_sentencepiece(spec),
                piece_style="sentencepiece",
                space_prefix=True,
                strip_first_space=True,
            )
        if spec.kind == "hf-json":
            if not spec.tokenizer_json or not spec.tokens:
                raise ValueError("an hf-json TokenizerSpec needs tokenizer_json and tokens")
            core = tokenizers.Tokenizer.from_str(spec.tokenizer_json)
            core.encode_special_tokens = True  # special tokens are split off by `encode`, per call
            style, strip = _hf_decoding(spec.tokenizer_json)
            return cls(spec, core, piece_style=style, space_prefix=False, strip_first_space=strip)
        raise ValueError(f"unknown tokenizer kind {spec.kind!r}")

    # -- properties ---------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def bos_id(self) -> int | None:
        return self.spec.bos_id

    @property
    def eos_id(self) -> int | None:
        return self.spec.eos_id

    @property
    def stop_ids(self) -> list[int]:
        return list(self.spec.stop_ids)

    @property
    def add_bos(self) -> bool:
        return self.spec.add_bos

    @property
    def chat_template(self) -> str | None:
        return self.spec.chat_template

    def token_bytes(self, token_id: int) -> bytes:
        self._check_ids((token_id,))
        return self._pieces[token_id]

    def token_text(self, token_id: int) -> str:
        """The token's own text (partial UTF-8 shows as U+FFFD), special tokens as written."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def token_id(self, text: str) -> int | None:
        """The id of a special or user-defined token by its text (e.g. "<|eot_id|>")."""
        return self._ids_by_text.get(text)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    # -- encoding -----------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = False) -> list[int]:
        """Token ids for `text`.

        add_bos: None follows the model (`spec.add_bos`). parse_special: recognise control tokens such
        as `<|eot_id|>` written in the text; off by default so user text cannot inject them.
        """
        ids: list[int] = []
        if self.spec.add_bos if add_bos is None else add_bos:
            if self.spec.bos_id is None:
                raise ValueError("this tokenizer has no BOS token")
            ids.append(self.spec.bos_id)
        pattern = self._special_split if parse_special else self._always_split
        after_special = True  # SentencePiece puts its dummy-prefix space after each special token
        position = 0
        for match in pattern.finditer(text) if pattern is not None else ():
            if match.start() > position:
                ids.extend(self._encode_plain(text[position : match.start()], after_special))
            ids.append(self._ids_by_text[match.group()])
            after_special = True
            position = match.end()
        if position < len(text):
            ids.extend(self._encode_plain(text[position:], after_special))
        return ids

    def _encode_plain(self, text: str, after_special: bool) -> list[int]:
        if self._space_prefix and after_special:
            text = " " + text
        return self._core.encode(text, add_special_tokens=False).ids

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """The prompt text for a conversation, rendered with the model's chat template."""
        if not self.spec.chat_template:
            raise chat_template.ChatTemplateError("this model has no chat template")
        bos = self.spec.bos_id
        eos = self.spec.eos_id
        return chat_template.render(
            self.spec.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._tokens[bos] if bos is not None else "",
            eos_token=self._tokens[eos] if eos is not None else "",
            **extra,
        )

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **extra: Any
    ) -> list[int]:
        """Token ids of the rendered conversation: its special tokens parsed, BOS exactly once at the
        start when the model wants one (whether or not the template writes it)."""
        ids = self.encode(
            self.apply_chat_template(messages, add_generation_prompt, **extra),
            add_bos=False,
            parse_special=True,
        )
        bos = self.spec.bos_id
        if self.spec.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    # -- decoding -----------------------------------------------------------------------------------

    def _check_ids(self, ids: Sequence[int]) -> None:
        if ids and (min(ids) < 0 or max(ids) >= len(self._pieces)):
            bad = next(i for i in ids if not 0 <= i < len(self._pieces))
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{len(self._pieces) - 1})")

    def decode_bytes(self, ids: Sequence[int], *, skip_special: bool = False, at_start: bool = True) -> bytes:
        ids = list(ids)
        self._check_ids(ids)
        out = bytearray()
        strip = self._strip_first_space and at_start
        for token_id in ids:
            if skip_special and token_id in self._special_ids:
                continue
            piece = self._pieces[token_id]
            if strip:
                strip = False
                if piece.startswith(b" "):
                    piece = piece[1:]
            out += piece
        return bytes(out)

    def decode(self, ids: Sequence[int], *, skip_special: bool = False, at_start: bool = True) -> str:
        """Text of `ids`. at_start: the ids begin a text, so SentencePiece's dummy-prefix space on the
        first token is dropped (pass False for a continuation). skip_special hides control tokens."""
        return self.decode_bytes(ids, skip_special=skip_special, at_start=at_start).decode(
            "utf-8", errors="replace"
        )

    def incremental_decoder(
        self, *, skip_special: bool = False, at_start: bool = False
    ) -> IncrementalDecoder:
        """A streaming decoder for generated tokens. at_start defaults to False: generated text continues
        a prompt, so its first space is real. Concatenated outputs equal `decode` with the same flags."""
        return IncrementalDecoder(self, skip_special=skip_special, at_start=at_start)


def _complete_utf8_length(buffer: bytearray) -> int:
    """Length of the longest prefix of `buffer` not ending inside an unfinished UTF-8 character.

    Only a trailing, still-possible multi-byte sequence is held back; invalid bytes pass through (they
    decode to U+FFFD) so nothing waits forever.
    """
    n = len(buffer)
    for back in range(1, min(4, n) + 1):
        byte = buffer[n - back]
        if byte & 0xC0 == 0x80:  # continuation byte: keep looking for the lead byte
            continue
        if 0xF0 <= byte <= 0xF4:
            needed = 4
        elif 0xE0 <= byte <= 0xEF:
            needed = 3
        elif 0xC2 <= byte <= 0xDF:
            needed = 2
        else:
            needed = 1  # ASCII, or a byte that can never start a character
        return n - back if back < needed else n
    return n


class IncrementalDecoder:
    """Turns a stream of token ids into text deltas that never split a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool, at_start: bool) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._strip_pending = at_start and tokenizer._strip_first_space
        self._buffer = bytearray()

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now complete (may be empty)."""
        tok = self._tokenizer
        if not 0 <= token_id < len(tok._pieces):
            tok._check_ids((token_id,))  # raises, naming the id
        if self._skip_special and token_id in tok._special_ids:
            return ""
        piece = tok._pieces[token_id]
        if self._strip_pending:
            self._strip_pending = False
            if piece.startswith(b" "):
                piece = piece[1:]
        self._buffer += piece
        cut = _complete_utf8_length(self._buffer)
        if cut == 0:
            return ""
        text = self._buffer[:cut].decode("utf-8", errors="replace")
        del self._buffer[:cut]
        return text

    def flush(self) -> str:
        """The held-back bytes of an unfinished character, as U+FFFD; the decoder is empty afterwards."""
        text = self._buffer.decode("utf-8", errors="replace")
        self._buffer.clear()
        return text

    @property
    def pending_bytes(self) -> int:
        return len(self._buffer)
