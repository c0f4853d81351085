"""Byte-level BPE for the default model, trained on the corpus with the `tokenizers` library.

It is built the way the LLaMA-3 tokenizer of BitNet b1.58 2B4T is (GGUF `tokenizer.ggml.pre =
llama-bpe`): the LLaMA-3 split regex, then the GPT-2 byte-to-unicode mapping, BPE with whole-word
lookup before merges (`ignore_merges`), and the special tokens appended after the learned vocabulary.
So a reader that handles the 2B4T tokenizer handles this one, and llama.cpp tokenises it identically.
"""

from __future__ import annotations

import json

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

# The LLaMA-3 pre-tokenizer split (llama.cpp's `llama-bpe`).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GGUF_PRE = "llama-bpe"
BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
SPECIAL_TOKENS = (BOS, EOS)

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """BPE with `vocab_size` entries in total, the last ones BOS and EOS."""
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # The trainer may not set ignore_merges on its result: rebuild the model from its JSON with it.
    spec = json.loads(tok.to_str())
    spec["model"]["ignore_merges"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    return tok


def gguf_vocab(tok: Tokenizer) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, token types, merges as "left right") in the form GGUF stores them."""
    spec = json.loads(tok.to_str())
    vocab: dict[str, int] = dict(spec["model"]["vocab"])
    for added in spec["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [""] * len(vocab)
    for text, idx in vocab.items():
        tokens[idx] = text
    if any(t == "" for t in tokens):
        raise RuntimeError("token ids are not contiguous")
    special = set(SPECIAL_TOKENS)
    types = [TOKEN_TYPE_CONTROL if t in special else TOKEN_TYPE_NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else f"{m[0]} {m[1]}" for m in spec["model"]["merges"]]
    return tokens, types, merges


def encode(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of `text` without any special token."""
    return tok.encode(text, add_special_tokens=False).ids
