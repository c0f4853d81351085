"""Read a model's tokenizer description into a `TokenizerSpec`, repairing known defects on the way.

Two sources: GGUF metadata (`tokenizer.ggml.*` keys) and a Hugging Face folder (tokenizer.json and
tokenizer_config.json). The official BitNet b1.58 2B4T GGUF has three defects (BITNET.md section 3): no
`tokenizer.ggml.pre`, a placeholder chat template, and `<|eot_id|>` not declared as end of turn. Each
repair is returned as a sentence, so `inspect` and the logs can say what was changed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import chat_template
from .weights import TokenizerSpec

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

# `tokenizer.ggml.pre` values that mean the LLaMA-3 split; llama.cpp also adds BOS by default for them.
LLAMA3_PRE_NAMES = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"})
LLAMA3_VOCAB_SIZE = 128256
LLAMA3_BOS_TEXT = "<|begin_of_text|>"
EOT_TEXT = "<|eot_id|>"

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _require(meta: Mapping[str, Any], key: str) -> Any:
    if key not in meta:
        raise ValueError(f"GGUF tokenizer metadata lacks {key}")
    return meta[key]


def _checked_id(value: Any, n_tokens: int, what: str) -> int | None:
    if value is None:
        return None
    token_id = int(value)
    if not 0 <= token_id < n_tokens:
        raise ValueError(f"{what} {token_id} is outside the vocabulary (0..{n_tokens - 1})")
    return token_id


def _is_llama3_vocabulary(tokens: list[str]) -> bool:
    return len(tokens) == LLAMA3_VOCAB_SIZE or LLAMA3_BOS_TEXT in tokens


def _index_of(tokens: list[str], text: str) -> int | None:
    try:
        return tokens.index(text)
    except ValueError:
        return None


def _stop_ids(
    declared: list[int | None], tokens: list[str], corrections: list[str], origin: str
) -> tuple[list[int], int | None]:
    """EOS and declared end-of-turn ids, plus `<|eot_id|>` when the file forgot to declare it."""
    stop: list[int] = []
    for token_id in declared:
        if token_id is not None and token_id not in stop:
            stop.append(token_id)
    eot = _index_of(tokens, EOT_TEXT)
    if eot is not None and eot not in stop:
        stop.append(eot)
        corrections.append(
            f"{EOT_TEXT} (id {eot}) ends chat turns but {origin} does not declare it: "
            "added to the stop tokens"
        )
    return stop, eot


def _mark_control(
    ids: list[int | None], tokens: list[str], token_types: list[int], corrections: list[str]
) -> None:
    """BOS, EOS and end-of-turn tokens typed as normal text would never be recognised in a rendered
    chat prompt nor hidden from output: type them as control tokens."""
    for token_id in dict.fromkeys(i for i in ids if i is not None):
        if token_types[token_id] == TOKEN_NORMAL:
            token_types[token_id] = TOKEN_CONTROL
            corrections.append(
                f"special token {tokens[token_id]!r} (id {token_id}) is typed as normal text: "
                "treated as a control token"
            )


def spec_from_gguf_metadata(meta: Mapping[str, Any]) -> tuple[TokenizerSpec, list[str]]:
    """Build the spec from GGUF key/values (plain Python values); also return the corrections made."""
    model = meta.get("tokenizer.ggml.model")
    if model not in ("gpt2", "llama"):
        raise ValueError(
            f"unsupported tokenizer.ggml.model {model!r}: expected 'gpt2' (byte-level BPE) "
            "or 'llama' (SentencePiece)"
        )
    corrections: list[str] = []
    tokens = [str(t) for t in _require(meta, "tokenizer.ggml.tokens")]
    n = len(tokens)
    if n == 0:
        raise ValueError("tokenizer.ggml.tokens is empty")
    token_types = [int(t) for t in meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * n]
    if len(token_types) != n:
        raise ValueError(f"tokenizer.ggml.token_type has {len(token_types)} entries for {n} tokens")

    merges: list[str] = []
    scores: list[float] = []
    pre = meta.get("tokenizer.ggml.pre") or None
    if model == "gpt2":
        merges = [str(m) for m in _require(meta, "tokenizer.ggml.merges")]
        if pre is None:
            if _is_llama3_vocabulary(tokens):
                pre = "llama-bpe"
                corrections.append(
                    f"tokenizer.ggml.pre is missing on a LLaMA-3 vocabulary ({n} tokens): "
                    "using the LLaMA-3 split ('llama-bpe')"
                )
            else:
                pre = "default"
                corrections.append("tokenizer.ggml.pre is missing: using llama.cpp's 'default' split")
    else:
        raw_scores = meta.get("tokenizer.ggml.scores")
        if raw_scores:
            scores = [float(s) for s in raw_scores]
            if len(scores) != n:
                raise ValueError(f"tokenizer.ggml.scores has {len(scores)} entries for {n} tokens")
        else:
            scores = [-float(i) for i in range(n)]
            corrections.append("tokenizer.ggml.scores is missing: merging by token id order instead")

    bos = _checked_id(meta.get("tokenizer.ggml.bos_token_id"), n, "tokenizer.ggml.bos_token_id")
    eos = _checked_id(meta.get("tokenizer.ggml.eos_token_id"), n, "tokenizer.ggml.eos_token_id")
    declared = [eos] + [
        _checked_id(meta.get(key), n, key)
        for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    ]
    stop_ids, eot = _stop_ids(declared, tokens, corrections, "the file")
    _mark_control([bos, *stop_ids], tokens, token_types, corrections)

    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:  # llama.cpp's defaults
        add_bos = model == "llama" or pre in LLAMA3_PRE_NAMES
    add_bos = bool(add_bos) and bos is not None

    template, why = chat_template.resolve_template(
        meta.get("tokenizer.chat_template"), has_eot_token=eot is not None, origin="tokenizer.chat_template"
    )
    if why:
        corrections.append(why)

    spec = TokenizerSpec(
        kind=model,
        tokens=tokens,
        merges=merges,
        token_types=token_types,
        scores=scores,
        pre=pre,
        bos_id=bos,
        eos_id=eos,
        add_bos=add_bos,
        stop_ids=stop_ids,
        chat_template=template,
    )
    return spec, corrections


# ---------------------------------------------------------------------------------------------------
# Hugging Face folder


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _config_template(folder: Path, config: Mapping[str, Any]) -> Any:
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, Mapping)}
        source = named.get("default") or next(iter(named.values()), None)
    jinja_file = folder / "chat_template.jinja"
    if not source and jinja_file.is_file():
        source = jinja_file.read_text(encoding="utf-8")
    return source


def _json_contains(node: Any, predicate: Any) -> bool:
    if isinstance(node, Mapping):
        return predicate(node) or any(_json_contains(v, predicate) for v in node.values())
    if isinstance(node, list):
        return any(_json_contains(v, predicate) for v in node)
    return False


def _detect_pre(pre_tokenizer: Any) -> str | None:
    """The GGUF `.pre` name matching a tokenizer.json pre-tokenizer, for writers of GGUF files."""
    patterns: list[str] = []

    def collect(node: Mapping[str, Any]) -> bool:
        pattern = node.get("pattern")
        if node.get("type") == "Split" and isinstance(pattern, Mapping):
            patterns.append(str(pattern.get("Regex") or pattern.get("String") or ""))
        return False

    _json_contains(pre_tokenizer, collect)
    if any(r"\p{N}{1,3}" in p and r"[^\r\n\p{L}\p{N}]?\p{L}+" in p for p in patterns):
        return "llama-bpe"
    if not patterns and _json_contains(
        pre_tokenizer, lambda n: n.get("type") == "ByteLevel" and n.get("use_regex", True)
    ):
        return "gpt-2"
    return None


def _bpe_merges(model: Mapping[str, Any]) -> list[str]:
    merges = model.get("merges") or []
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def spec_from_hf_dir(path: str | Path) -> tuple[TokenizerSpec, list[str]]:
    """Build the spec from tokenizer.json (+ tokenizer_config.json, generation_config.json if present)."""
    folder = Path(path)
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ValueError(f"{folder}: no tokenizer.json")
    tokenizer_json = tokenizer_file.read_text(encoding="utf-8")
    data = json.loads(tokenizer_json)

    def read_optional(name: str) -> dict[str, Any]:
        file = folder / name
        return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}

    config = read_optional("tokenizer_config.json")
    generation = read_optional("generation_config.json")
    corrections: list[str] = []

    model = data.get("model") or {}
    vocab = model.get("vocab") or {}
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        pairs = {str(p[0]): i for i, p in enumerate(vocab)}
        scores_by_id = {i: float(p[1]) for i, p in enumerate(vocab)}
    else:
        pairs = {str(k): int(v) for k, v in vocab.items()}
        scores_by_id = {}
    added = data.get("added_tokens") or []
    n = max([*pairs.values(), *(int(t["id"]) for t in added)], default=-1) + 1
    tokens = [""] * n
    token_types = [TOKEN_NORMAL] * n
    for text, token_id in pairs.items():
        tokens[token_id] = text
        if model.get("byte_fallback") and _BYTE_TOKEN.fullmatch(text):
            token_types[token_id] = TOKEN_BYTE
    if isinstance(model.get("unk_token"), str) and model["unk_token"] in pairs:
        token_types[pairs[model["unk_token"]]] = TOKEN_UNKNOWN
    for token in added:
        token_id = int(token["id"])
        tokens[token_id] = str(token["content"])
        token_types[token_id] = TOKEN_CONTROL if token.get("special") else TOKEN_USER_DEFINED
    ids = {text: i for i, text in enumerate(tokens)}

    def config_id(key: str) -> int | None:
        content = _token_content(config.get(key))
        if content is None:
            return None
        if content not in ids:
            raise ValueError(f"{folder}: tokenizer_config.json {key} {content!r} is not in the vocabulary")
        return ids[content]

    bos = config_id("bos_token")
    eos = config_id("eos_token")
    extra_eos = generation.get("eos_token_id")
    declared = [eos] + [
        _checked_id(t, n, "generation_config.json eos_token_id")
        for t in (extra_eos if isinstance(extra_eos, list) else [extra_eos])
    ]
    stop_ids, eot = _stop_ids(declared, tokens, corrections, "the tokenizer config")
    if eos is None and stop_ids:
        eos = stop_ids[0]

    add_bos = config.get("add_bos_token")
    if add_bos is None:  # no explicit flag: the post-processor decides, as in transformers
        bos_text = tokens[bos] if bos is not None else None
        add_bos = bos_text is not None and _json_contains(
            data.get("post_processor"), lambda node: node.get("id") == bos_text
        )
    add_bos = bool(add_bos) and bos is not None

    template, why = chat_template.resolve_template(
        _config_template(folder, config),
        has_eot_token=eot is not None,
        origin="tokenizer_config.json chat_template",
    )
    if why:
        corrections.append(why)

    spec = TokenizerSpec(
        kind="hf-json",
        tokens=tokens,
        merges=_bpe_merges(model) if model.get("type") == "BPE" else [],
        token_types=token_types,
        scores=[scores_by_id.get(i, 0.0) for i in range(n)] if scores_by_id else [],
        pre=_detect_pre(data.get("pre_tokenizer")),
        tokenizer_json=tokenizer_json,
        bos_id=bos,
        eos_id=eos,
        add_bos=add_bos,
        stop_ids=stop_ids,
        chat_template=template,
    )
    return spec, corrections
