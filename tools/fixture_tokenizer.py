"""A small real byte-level BPE tokenizer for the parity fixture models.

The goldens are in token ids, so the tokenizer only has to be a valid one that every reader loads: a
LLaMA-3 style byte-level BPE (the 2B4T tokenizer's family) with a few hundred tokens, trained with
`tokenizers` on text taken from the Python standard library's docstrings, specials at the end of the
vocabulary like LLaMA-3's.
"""

from __future__ import annotations

import json
import pathlib

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# LLaMA-3's pre-tokenizer split (GGUF `tokenizer.ggml.pre = "llama-bpe"`).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
SPECIALS = (BOS, EOS, EOT)
# The 2B4T chat format (BITNET.md section 3): "Role: content<|eot_id|>", generation prompt "Assistant: ".
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}"
)


def training_text() -> list[str]:
    """Docstrings of a fixed set of standard-library modules: real English, no download needed."""
    import argparse
    import collections
    import json as json_module
    import logging
    import pathlib as pathlib_module
    import textwrap

    texts = []
    for module in (argparse, collections, json_module, logging, pathlib_module, textwrap):
        texts.append(module.__doc__ or "")
        for name in sorted(dir(module)):
            doc = getattr(getattr(module, name), "__doc__", None)
            if isinstance(doc, str):
                texts.append(doc)
    return texts


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """Train the byte-level BPE; the three specials take the last three ids."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_text(), trainer=trainer)
    if tokenizer.get_vocab_size() != vocab_size - len(SPECIALS):
        raise RuntimeError(
            f"trained {tokenizer.get_vocab_size()} tokens, wanted {vocab_size - len(SPECIALS)}"
        )
    tokenizer.add_special_tokens(list(SPECIALS))
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def write_hf_tokenizer(tokenizer: Tokenizer, folder: pathlib.Path) -> None:
    """tokenizer.json plus the tokenizer_config.json fields readers look at (specials, chat template)."""
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOT,
        "add_bos_token": True,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOT}) + "\n")


def gguf_tokenizer_fields(tokenizer: Tokenizer) -> dict[str, object]:
    """The `tokenizer.ggml.*` values for the same vocabulary (gpt2 model, llama-bpe split)."""
    spec = json.loads(tokenizer.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    for added in spec["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [""] * len(vocab)
    for text, index in vocab.items():
        tokens[index] = text
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    types = [3 if text in SPECIALS else 1 for text in tokens]  # 3 = control, 1 = normal
    return {
        "tokens": tokens,
        "merges": merges,
        "token_types": types,
        "bos_id": vocab[BOS],
        "eos_id": vocab[EOS],
        "eot_id": vocab[EOT],
        "chat_template": CHAT_TEMPLATE,
    }
