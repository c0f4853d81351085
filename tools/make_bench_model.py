"""Write a ~730M-parameter random BitNet GGUF shaped like 1bitLLM/bitnet_b1_58-large, for speed runs.

    python tools/make_bench_model.py OUT_DIR [--types tq2_0,i2_s]

writes OUT_DIR/bench-large-tq2_0.gguf (and -i2_s.gguf): arch `bitnet`, hidden 1536, intermediate 4096,
24 layers, 16 heads (plain MHA), vocab 32002, SiLU, theta 10000. About 200 MB each: not committed.
Speed does not depend on the values, so codes are drawn directly with the zero fraction a Gaussian weight
gets under absmean ternarisation (~31%), one scale per tensor; the files go through our own exporter
(server/gguf_export.py). The vocabulary is the fixtures' 512-token BPE, padded by the exporter with unused
tokens to the embedding's 32002 rows, so llama.cpp and our engine both load it.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

LARGE = {"n_layers": 24, "d_model": 1536, "d_ff": 4096, "n_heads": 16, "n_kv_heads": 16, "vocab_size": 32002}
ZERO_FRACTION = 0.31  # P(|w| < 0.5·mean|w|) for Gaussian w
SCALE = 0.080078125  # exact in f16 and bf16: the mean|W| of N(0, 0.1) weights


def random_codes(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    u = rng.random(shape, dtype=np.float32)
    half_nonzero = (1.0 - ZERO_FRACTION) / 2
    return ((u >= 1.0 - half_nonzero).astype(np.int8) - (u < half_nonzero).astype(np.int8)).astype(np.int8)


def bench_weights(seed: int = 0):
    """ModelWeights of the random 1bitLLM-large-shaped model."""
    import fixture_tokenizer as ft
    from bitnet_grpc.server.weights import (
        LAYER_NORMS,
        TERNARY_PROJECTIONS,
        ModelConfig,
        ModelWeights,
        TernaryTensor,
        TokenizerSpec,
    )

    s = LARGE
    head_dim = s["d_model"] // s["n_heads"]
    config = ModelConfig(arch="bitnet", **s, head_dim=head_dim, context_length=2048, rope_theta=10000.0,
                         rms_eps=1e-5, activation="silu")  # fmt: skip
    rng = np.random.default_rng(seed)
    embedding = (rng.standard_normal((s["vocab_size"], s["d_model"]), dtype=np.float32) * 0.5).astype(
        np.float16
    )
    floats = {"token_embd.weight": embedding.astype(np.float32)}
    floats["output_norm.weight"] = (1 + 0.1 * rng.standard_normal(s["d_model"])).astype(np.float32)
    kv = s["n_kv_heads"] * head_dim
    shapes = {
        "attn_q": (s["d_model"], s["d_model"]),
        "attn_k": (kv, s["d_model"]),
        "attn_v": (kv, s["d_model"]),
        "attn_output": (s["d_model"], s["d_model"]),
        "ffn_gate": (s["d_ff"], s["d_model"]),
        "ffn_up": (s["d_ff"], s["d_model"]),
        "ffn_down": (s["d_model"], s["d_ff"]),
    }
    ternary = {}
    for layer in range(s["n_layers"]):
        for norm in LAYER_NORMS:
            size = s["d_ff"] if norm == "ffn_sub_norm" else s["d_model"]
            floats[f"blk.{layer}.{norm}.weight"] = (1 + 0.1 * rng.standard_normal(size)).astype(np.float32)
        for proj in TERNARY_PROJECTIONS:
            codes = random_codes(rng, shapes[proj])
            ternary[f"blk.{layer}.{proj}.weight"] = TernaryTensor(
                codes=codes, scale=SCALE, source_type="random"
            )
    tok = ft.gguf_tokenizer_fields(ft.train_tokenizer(512))
    spec = TokenizerSpec(
        kind="gpt2",
        tokens=list(tok["tokens"]),
        merges=list(tok["merges"]),
        token_types=list(tok["token_types"]),
        pre="llama-bpe",
        bos_id=tok["bos_id"],
        eos_id=tok["eos_id"],
        stop_ids=[tok["eos_id"], tok["eot_id"]],
        chat_template=tok["chat_template"],
    )
    return ModelWeights(config, floats, ternary, spec, source="random", file_format="gguf")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--types", default="tq2_0,i2_s", help="comma-separated: tq2_0, tq1_0, i2_s")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from bitnet_grpc.server.gguf_export import write_gguf

    args.out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    weights = bench_weights(args.seed)
    print(
        f"drew {weights.param_count() / 1e6:.0f}M parameters in {time.perf_counter() - start:.1f}s",
        flush=True,
    )
    for kind in args.types.split(","):
        path = args.out_dir / f"bench-large-{kind}.gguf"
        start = time.perf_counter()
        notes = write_gguf(weights, path, kind, name=f"random bitnet_b1_58-large shape ({kind})")
        size = path.stat().st_size / 1e6
        print(f"wrote {path} ({size:.0f} MB) in {time.perf_counter() - start:.1f}s", flush=True)
        for note in notes:
            print(f"  note: {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
