"""`load_weights(path)`: one entry point for every model source, dispatching on what the path is.

A folder is a Hugging Face checkpoint; a file is recognised by its magic bytes (GGUF), not its name.
"""

from __future__ import annotations

import os
from pathlib import Path

from .file_errors import ModelFileError
from .weights import ModelWeights

GGUF_MAGIC = b"GGUF"


def detect_format(path: str | os.PathLike[str]) -> str:
    """ "gguf" or "hf" for a loadable path; ModelFileError saying what the path is otherwise."""
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelFileError(f"{p}: folder without config.json: not a Hugging Face model folder")
        return "hf"
    if not p.exists():
        raise ModelFileError(f"{p}: no such file or folder")
    with open(p, "rb") as fh:
        magic = fh.read(4)
    if magic == GGUF_MAGIC:
        return "gguf"
    if p.suffix == ".safetensors" or p.name == "config.json":
        raise ModelFileError(f"{p}: give the Hugging Face folder ({p.parent}), not one of its files")
    raise ModelFileError(
        f"{p}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r}) nor a model folder"
    )


def load_weights(path: str | os.PathLike[str]) -> ModelWeights:
    """Load a BitNet model from a GGUF file or a Hugging Face folder (see BITNET.md section 3)."""
    if detect_format(path) == "gguf":
        from .gguf_weights import load_gguf

        return load_gguf(path)
    from .hf_files import load_hf_dir

    return load_hf_dir(path)
