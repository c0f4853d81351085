"""Tokenizer specs for the file loaders: delegate to the tokenizer module, which owns the corrections.

`server/tokenizer.py` (tokenizer engineer) knows the defects of real files (missing pre-tokenizer,
placeholder chat template, undeclared end-of-turn token). Until that module is installed, a minimal
reading of the same fields keeps the loaders usable; it copies what the file says and corrects nothing.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .file_errors import ModelFileError
from .weights import TokenizerSpec

_TOKENIZER_MODULE = "bitnet_grpc.server.tokenizer"


def _tokenizer_module():
    if importlib.util.find_spec(_TOKENIZER_MODULE) is None:
        return None
    import bitnet_grpc.server.tokenizer as module

    return module


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return int(value) if isinstance(value, int) else None


def tokenizer_from_gguf(meta: Mapping[str, Any]) -> tuple[TokenizerSpec, list[str]]:
    """(spec, corrections) from GGUF metadata."""
    module = _tokenizer_module()
    if module is not None and hasattr(module, "spec_from_gguf_metadata"):
        spec, corrections = module.spec_from_gguf_metadata(meta)
        return spec, list(corrections)
    if not meta.get("tokenizer.ggml.tokens"):
        raise ValueError("no tokenizer.ggml.tokens in the metadata")
    eos = _int_or_none(meta.get("tokenizer.ggml.eos_token_id"))
    eot = _int_or_none(meta.get("tokenizer.ggml.eot_token_id"))
    spec = TokenizerSpec(
        kind=str(meta.get("tokenizer.ggml.model", "gpt2")),
        tokens=list(meta.get("tokenizer.ggml.tokens", [])),
        merges=list(meta.get("tokenizer.ggml.merges", [])),
        token_types=list(meta.get("tokenizer.ggml.token_type", [])),
        scores=list(meta.get("tokenizer.ggml.scores", [])),
        pre=meta.get("tokenizer.ggml.pre"),
        bos_id=_int_or_none(meta.get("tokenizer.ggml.bos_token_id")),
        eos_id=eos,
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
        stop_ids=[i for i in dict.fromkeys([eos, eot]) if i is not None],
        chat_template=meta.get("tokenizer.chat_template"),
    )
    return spec, []


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path}: cannot read JSON: {exc}") from None


def tokenizer_from_hf_dir(path: str | Path) -> tuple[TokenizerSpec, list[str]]:
    """(spec, corrections) of a Hugging Face folder (tokenizer.json + tokenizer_config.json + config.json)."""
    module = _tokenizer_module()
    if module is not None and hasattr(module, "spec_from_hf_dir"):
        result = module.spec_from_hf_dir(path)
        return (result[0], list(result[1])) if isinstance(result, tuple) else (result, [])
    folder = Path(path)
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ModelFileError(f"{folder}: missing tokenizer.json")
    text = tokenizer_file.read_text(encoding="utf-8")
    added = {t["content"]: t["id"] for t in json.loads(text).get("added_tokens", [])}
    tok_config = (
        _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    )
    config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}

    def token_id(name: str) -> int | None:
        content = tok_config.get(name)
        if isinstance(content, dict):
            content = content.get("content")
        if isinstance(content, str) and content in added:
            return int(added[content])
        return _int_or_none(config.get(f"{name}_id"))

    eos = token_id("eos_token")
    config_eos = config.get("eos_token_id")
    extra = config_eos if isinstance(config_eos, list) else [config_eos]
    spec = TokenizerSpec(
        kind="hf-json",
        tokenizer_json=text,
        bos_id=token_id("bos_token"),
        eos_id=eos,
        add_bos=bool(tok_config.get("add_bos_token", True)),
        stop_ids=[i for i in dict.fromkeys([eos, *extra]) if isinstance(i, int)],
        chat_template=tok_config.get("chat_template"),
    )
    return spec, []
