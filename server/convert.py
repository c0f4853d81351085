"""`bitnet-grpc convert SRC OUT.gguf --type i2_s|tq2_0|tq1_0|f16|f32`: write any loadable model as GGUF.

SRC is a Hugging Face folder or a GGUF file (so an official I2_S file can become TQ2_0 for llama.cpp).
The weights go through the same loader the server uses, so the file written holds exactly the ternary
codes and scales the server would run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .file_errors import ModelFileError
from .gguf_export import EMBED_TYPES, WEIGHT_TYPES, write_gguf
from .gguf_weights import SUPPORTED_ARCHS
from .loader import load_weights


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bitnet-grpc convert",
        description="Convert a BitNet b1.58 model (Hugging Face folder or GGUF) to a GGUF file.",
    )
    p.add_argument("source", help="Hugging Face model folder or GGUF file")
    p.add_argument("output", help="GGUF file to write")
    p.add_argument(
        "--type",
        dest="weight_type",
        choices=sorted(WEIGHT_TYPES),
        default="i2_s",
        help="storage of the ternary projections (default i2_s, bitnet.cpp's x86 layout)",
    )
    p.add_argument(
        "--embed-type",
        choices=sorted(EMBED_TYPES),
        help="token embedding storage (default f16; f32 for --type f32)",
    )
    p.add_argument(
        "--arch",
        choices=SUPPORTED_ARCHS,
        help="architecture string to write (default: the model's; llama.cpp only knows 'bitnet')",
    )
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    return p


def _llama_cpp_notes(weights, arch: str, weight_type: str) -> list[str]:
    """What stops llama.cpp from running the file as we would (it is a common second consumer)."""
    cfg = weights.config
    notes = []
    if arch != "bitnet":
        notes.append(f"llama.cpp does not know arch {arch!r} (only 'bitnet', which it runs with SiLU)")
    elif cfg.activation != "silu":
        notes.append("llama.cpp's bitnet graph hard-codes SiLU: it will not run this relu2 model as intended")
    if weight_type == "i2_s":
        notes.append("I2_S (type 36) loads in bitnet.cpp, not in upstream llama.cpp")
    if not cfg.tied_embeddings:
        notes.append("llama.cpp's bitnet graph ignores output.weight (it always uses token_embd)")
    if cfg.q_dim != cfg.d_model:
        notes.append("llama.cpp's bitnet graph expects n_heads * head_dim == embedding_length")
    return notes


def convert_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if os.path.exists(args.output) and not args.force:
        print(f"bitnet-grpc convert: {args.output} exists (use --force to overwrite)", file=sys.stderr)
        return 2
    if os.path.abspath(args.output) == os.path.abspath(args.source):
        print("bitnet-grpc convert: output and source are the same file", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        weights = load_weights(args.source)
        arch = args.arch or weights.config.arch
        notes = write_gguf(weights, args.output, args.weight_type, embed_type=args.embed_type, arch=arch)
    except (ModelFileError, ValueError) as exc:
        print(f"bitnet-grpc convert: {exc}", file=sys.stderr)
        return 1
    cfg = weights.config
    size = os.path.getsize(args.output)
    print(
        f"wrote {args.output}: {arch}, {cfg.n_layers} layers, d_model {cfg.d_model}, "
        f"{len(weights.ternary)} {args.weight_type.upper()} projections, {size / 1e6:.1f} MB "
        f"in {time.perf_counter() - started:.1f} s"
    )
    for line in weights.corrections:
        print(f"  loader: {line}")
    for line in notes:
        print(f"  writer: {line}")
    for line in _llama_cpp_notes(weights, arch, args.weight_type):
        print(f"  llama.cpp: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(convert_main(sys.argv[1:]))
