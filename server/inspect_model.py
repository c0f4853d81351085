"""`bitnet-grpc inspect MODEL`: what a model file holds and what the loader made of it.

The file's own listing (tensor types and sizes) is printed first, straight from the container, so a
file the loader refuses can still be looked at; then the loaded configuration, tokenizer, chat
template and every correction the loader made.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

from .file_errors import ModelFileError
from .gguf_file import GGUFFile
from .loader import detect_format, load_weights
from .safetensors_file import SafetensorsFile
from .weights import ModelWeights

TEMPLATE_LINES = 6


def _file_tensors(path: str, fmt: str) -> list[tuple[str, str, tuple[int, ...], int | None]]:
    """(name, stored type, shape, bytes) for every tensor in the file(s), in file order."""
    if fmt == "gguf":
        f = GGUFFile(path)
        return [(t.name, t.type_name, t.shape, t.nbytes) for t in f.tensors.values()]
    rows = []
    for file in sorted(Path(path).glob("*.safetensors")):
        st = SafetensorsFile(file)
        rows += [(t.name, t.dtype, t.shape, t.end - t.begin) for t in st.tensors.values()]
    return rows


def _size_of(path: str, fmt: str) -> int:
    if fmt == "gguf":
        return os.path.getsize(path)
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def _describe_weights(w: ModelWeights) -> list[str]:
    c = w.config
    ternary = sum(t.codes.size for t in w.ternary.values())
    floats = w.param_count() - ternary
    tok = w.tokenizer
    lines = [
        f"architecture: {c.arch}",
        f"layers: {c.n_layers}  d_model: {c.d_model}  d_ff: {c.d_ff}",
        f"heads: {c.n_heads}  kv heads: {c.n_kv_heads}  head_dim: {c.head_dim}",
        f"vocab: {c.vocab_size}  context: {c.context_length}",
        f"rope theta: {c.rope_theta:g}  rms eps: {c.rms_eps:g}  activation: {c.activation}",
        f"embeddings: {'tied' if c.tied_embeddings else 'separate output.weight'}",
        f"parameters: {w.param_count() / 1e6:.2f} M "
        f"({ternary / 1e6:.2f} M ternary, {floats / 1e6:.2f} M float)",
        f"ternary storage: {w.weight_format} "
        f"({', '.join(f'{k} {v}' for k, v in Counter(t.source_type for t in w.ternary.values()).items())})",
        f"tokenizer: {tok.kind}, {len(tok.tokens) or 'see tokenizer.json'} tokens, pre {tok.pre or '-'}, "
        f"bos {tok.bos_id}, eos {tok.eos_id}, stop {tok.stop_ids}, add_bos {tok.add_bos}",
    ]
    if tok.chat_template:
        template = tok.chat_template.splitlines()
        lines.append(f"chat template ({len(template)} lines):")
        lines += [f"  | {line}" for line in template[:TEMPLATE_LINES]]
        if len(template) > TEMPLATE_LINES:
            lines.append("  | ...")
    else:
        lines.append("chat template: none")
    lines.append(f"corrections: {len(w.corrections) or 'none'}")
    lines += [f"  - {line}" for line in w.corrections]
    return lines


def inspect_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="bitnet-grpc inspect", description="Describe a BitNet model file or folder."
    )
    p.add_argument("model", help="GGUF file or Hugging Face model folder")
    p.add_argument("--tensors", action="store_true", help="list every tensor with its type and shape")
    args = p.parse_args(argv)
    try:
        fmt = detect_format(args.model)
        tensors = _file_tensors(args.model, fmt)
    except ModelFileError as exc:
        print(f"bitnet-grpc inspect: {exc}", file=sys.stderr)
        return 1
    counts = Counter(kind for _, kind, _, _ in tensors)
    print(f"model: {args.model}")
    print(
        f"format: {'GGUF' if fmt == 'gguf' else 'Hugging Face folder'}, {_size_of(args.model, fmt):,} bytes"
    )
    print(f"tensors: {len(tensors)} ({', '.join(f'{k} {v}' for k, v in counts.most_common())})")
    if args.tensors:
        for name, kind, shape, nbytes in tensors:
            print(f"  {name:<40} {kind:<10} {str(list(shape)):<18} {nbytes if nbytes is not None else '?'} B")
    try:
        weights = load_weights(args.model)
    except ModelFileError as exc:
        print(f"cannot load: {exc}")
        return 1
    for line in _describe_weights(weights):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(inspect_main(sys.argv[1:]))
