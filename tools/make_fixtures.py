"""Build the parity fixtures: small random BitNet models, their files, and the oracles' golden logits.

Run by hand (needs torch, transformers, llama-cpp-python and gguf, none of which the tests need):

    TORCH_COMPILE_DISABLE=1 python tools/make_fixtures.py [--out tests/fixtures/parity]

Models (BITNET.md section 5 init; see tools/fixture_models.py):
- A, 2B4T-like: 4 layers, d_model 256, d_ff 768, 4 heads, 2 KV heads (GQA), relu², tied embeddings,
  theta 500000. Files: `a_packed/` (HF, packed uint8 + weight_scale, autobitlinear offline) and
  `a_i2_s.gguf` (arch `bitnet-b1.58`, I2_S, written with our own exporter).
- twin: A's tensors as a 1bitLLM-like model (arch `bitnet`, SiLU, theta 10000), which llama.cpp can run:
  `twin_tq2_0.gguf`, `twin_tq1_0.gguf`.
- B: 1 layer, d_model 256, d_ff 512, 4 heads (plain MHA), relu²; `b_online/` holds bf16 master weights
  (autobitlinear online: ternarised at load).

Seeds: the first seed (from a fixed start) whose BOS row is well conditioned (see `pick_seed`).

Goldens (`*.npz`, see tools/fixture_oracles.py for the layout): transformers on A (quantised and not), B
and the twin; llama.cpp on the twin's TQ2_0, TQ1_0 and F32 (ternary values, no activation quantisation)
files. The F32 file and the twin's HF folder live in a scratch folder only (too big / not needed).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import fixture_models as fm  # noqa: E402
import fixture_oracles as fo  # noqa: E402
import fixture_tokenizer as ft  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
VOCAB = 512
SEQ_LEN = 28
PROMPT_LEN = 10
N_NEW = 16
SHAPE_A = fm.Shape(n_layers=4, d_model=256, d_ff=768, n_heads=4, n_kv_heads=2, vocab_size=VOCAB,
                   activation="relu2", rope_theta=500000.0)  # fmt: skip
SHAPE_TWIN = fm.Shape(n_layers=4, d_model=256, d_ff=768, n_heads=4, n_kv_heads=2, vocab_size=VOCAB,
                      activation="silu", rope_theta=10000.0)  # fmt: skip
SHAPE_B = fm.Shape(n_layers=1, d_model=256, d_ff=512, n_heads=4, n_kv_heads=4, vocab_size=VOCAB,
                   activation="relu2", rope_theta=500000.0)  # fmt: skip
FIRST_SEED_A, FIRST_SEED_B, SEED_IDS = 1158, 2158, 3158
BOS_MARGIN = 1e-4  # int8 steps; implementations differ by ~1e-5 steps (float32 last bits)
TEXTS = (
    "The quick brown fox jumps over the lazy dog, and then it returns a new ordered dictionary of results.",
    "def parse_args(argv):\n    parser = argparse.ArgumentParser(description='Convert it.')\n    return",
    "Logging handlers send the log records to the appropriate destination: files, streams and sockets.",
    "In 1905, 3 of the 17 paths were relative; the other 42 were absolute (see the PurePath class).",
)


def token_sequences(tokenizer) -> list[list[int]]:
    """Four encoded texts and one sequence of random ids, each BOS + SEQ_LEN - 1 tokens."""
    seqs = []
    for text in TEXTS:
        ids = tokenizer.encode(text).ids  # the post-processor puts BOS first
        if len(ids) < SEQ_LEN:
            raise RuntimeError(f"text too short for {SEQ_LEN} tokens: {text!r}")
        seqs.append(ids[:SEQ_LEN])
    rng = np.random.default_rng(SEED_IDS)
    bos = tokenizer.token_to_id(ft.BOS)
    seqs.append([bos] + [int(i) for i in rng.integers(0, VOCAB, SEQ_LEN - 1)])
    return seqs


def full_logits(fn: fo.LogitsFn, seqs: list[list[int]]) -> np.ndarray:
    return np.stack([fn(s) for s in seqs])


def agreement(ours: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Argmax agreement and |diff| in units of the reference row's std, over every position."""
    std = ref.std(axis=-1, keepdims=True)
    rel = np.abs(ours - ref) / std
    return {
        "argmax_agree": float((ours.argmax(-1) == ref.argmax(-1)).mean()),
        "median_rel_diff": float(np.median(rel)),
        "max_rel_diff": float(rel.max()),
    }


def save_golden(out: pathlib.Path, name: str, data: dict[str, np.ndarray]) -> None:
    np.savez_compressed(out / f"{name}.npz", **data)
    print(f"  wrote {name}.npz", flush=True)


def write_i2s(out: pathlib.Path) -> str | None:
    """a_i2_s.gguf with our own exporter, from the HF packed folder through our loader; None when written."""
    try:
        from bitnet_grpc.server import gguf_export
        from bitnet_grpc.server.loader import load_weights
    except ImportError as exc:
        return f"I2_S not written: our GGUF exporter is not importable ({exc})"
    weights = load_weights(str(out / "a_packed"))
    name = "bitnet-grpc parity fixture A (I2_S)"
    gguf_export.write_gguf(weights, str(out / "a_i2_s.gguf"), "i2_s", arch="bitnet-b1.58", name=name)
    return None


def bos_margin(model: fm.RandomModel, packed: bool, tokenizer, folder: pathlib.Path) -> float:
    """The BOS row's quantisation margin in transformers' forward (see fixture_oracles)."""
    shutil.rmtree(folder, ignore_errors=True)
    fm.write_hf_folder(model, folder, tokenizer, packed=packed)
    hf_model = fo.transformers_from_folder(folder)
    return float(fo.quantisation_margins(hf_model, [tokenizer.token_to_id(ft.BOS)])[0])


def pick_seed(shapes: list[fm.Shape], packed: bool, first: int, tokenizer, scratch: pathlib.Path) -> int:
    """The first seed whose BOS row is well conditioned in every variant (A and its SiLU twin share one).

    Every sequence starts with BOS, so a BOS activation within float noise of a rounding boundary would
    let an implementation's last-bit differences flip it and perturb every position of every golden;
    elsewhere such spots are rare and stay local. Seeds are tried in order; the choice is recorded.
    """
    for seed in range(first, first + 500):
        model = fm.random_model(shapes[0], seed)
        margins = [
            bos_margin(model.with_shape(shape), packed, tokenizer, scratch / "screen") for shape in shapes
        ]
        print(f"  seed {seed}: BOS margins {', '.join(f'{m:.1e}' for m in margins)}", flush=True)
        if min(margins) >= BOS_MARGIN:
            return seed
    raise RuntimeError(f"no seed from {first} gives BOS margins >= {BOS_MARGIN}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=REPO / "tests" / "fixtures" / "parity")
    parser.add_argument("--keep-scratch", action="store_true", help="keep the F32 GGUF and twin HF folder")
    args = parser.parse_args(argv)
    out: pathlib.Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="bitnet-fixtures-"))

    tokenizer = ft.train_tokenizer(VOCAB)
    seqs = token_sequences(tokenizer)
    prompts = [s[:PROMPT_LEN] for s in seqs]
    print("choosing seeds", flush=True)
    seed_a = pick_seed([SHAPE_A, SHAPE_TWIN], True, FIRST_SEED_A, tokenizer, scratch)
    seed_b = pick_seed([SHAPE_B], False, FIRST_SEED_B, tokenizer, scratch)
    model_a = fm.random_model(SHAPE_A, seed_a)
    twin = model_a.with_shape(SHAPE_TWIN)
    model_b = fm.random_model(SHAPE_B, seed_b)

    print("writing model files", flush=True)
    for folder in ("a_packed", "b_online"):
        shutil.rmtree(out / folder, ignore_errors=True)
    fm.write_hf_folder(model_a, out / "a_packed", tokenizer, packed=True)
    fm.write_hf_folder(model_b, out / "b_online", tokenizer, packed=False)
    fm.write_hf_folder(twin, scratch / "twin_packed", tokenizer, packed=True)
    for qtype in ("TQ2_0", "TQ1_0"):
        fm.write_gguf(twin, out / f"twin_{qtype.lower()}.gguf", "bitnet", qtype, tokenizer)
    fm.write_gguf(twin, scratch / "twin_f32.gguf", "bitnet", "F32", tokenizer)
    f32_size = f"{(scratch / 'twin_f32.gguf').stat().st_size / 1e6:.1f} MB"
    i2s_gap = write_i2s(out)
    if i2s_gap:
        print(f"  {i2s_gap}", flush=True)

    import torch
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    common = {"seq_len": SEQ_LEN, "prompt_len": PROMPT_LEN, "n_new": N_NEW, "top_k": fo.TOP_K}
    tok = ft.gguf_tokenizer_fields(tokenizer)

    print("running transformers", flush=True)
    hf_runs = {
        "hf_a_packed": ("a_packed", fo.transformers_from_folder(out / "a_packed")),
        "hf_b_online": ("b_online", fo.transformers_from_folder(out / "b_online")),
        "hf_twin": ("twin_*.gguf", fo.transformers_from_folder(scratch / "twin_packed")),
        "hf_a_unquantised": (
            "a_packed",
            fo.transformers_unquantised(unquantised_state(model_a), fm.hf_config(SHAPE_A, tok, "offline")),
        ),
    }
    hf_twin_unquantised = fo.transformers_unquantised(
        unquantised_state(twin), fm.hf_config(SHAPE_TWIN, tok, "offline")
    )
    full: dict[str, np.ndarray] = {}
    margins: dict[str, np.ndarray] = {}
    for name, (model_file, hf_model) in hf_runs.items():
        fn = fo.transformers_logits_fn(hf_model)
        quantised = name != "hf_a_unquantised"
        meta = {"oracle": "transformers BitNetForCausalLM float32", "model": model_file, **versions, **common}
        meta["activation_quantisation"] = quantised
        data = fo.golden(fn, seqs, prompts, N_NEW, meta)
        if quantised:
            data["margin"] = np.stack([fo.quantisation_margins(hf_model, s) for s in seqs])
            margins[name] = data["margin"]
        save_golden(out, name, data)
        full[name] = full_logits(fn, seqs)
    full["hf_twin_unquantised"] = full_logits(fo.transformers_logits_fn(hf_twin_unquantised), seqs)

    print("running llama.cpp", flush=True)
    import llama_cpp

    for qtype, path in (
        ("tq2_0", out / "twin_tq2_0.gguf"),
        ("tq1_0", out / "twin_tq1_0.gguf"),
        ("f32", scratch / "twin_f32.gguf"),
    ):
        fn, llm = fo.llama_cpp_logits_fn(path)
        meta = {"oracle": "llama.cpp (llama-cpp-python)", "llama_cpp_python": llama_cpp.__version__}
        meta.update({"model": path.name, "kv_cache": "f32", "n_threads": 2, **common})
        save_golden(out, f"llama_twin_{qtype}", fo.golden(fn, seqs, prompts, N_NEW, meta))
        full[f"llama_twin_{qtype}"] = full_logits(fn, seqs)
        llm.close()

    checks = {
        "llama.cpp F32 vs transformers twin, both unquantised": agreement(
            full["llama_twin_f32"], full["hf_twin_unquantised"]
        ),
        "llama.cpp TQ2_0 vs transformers twin": agreement(full["llama_twin_tq2_0"], full["hf_twin"]),
        "llama.cpp TQ1_0 vs transformers twin": agreement(full["llama_twin_tq1_0"], full["hf_twin"]),
        "transformers A unquantised vs quantised": agreement(full["hf_a_unquantised"], full["hf_a_packed"]),
    }
    conditioning = {
        name: {"positions_below_1e-5": int((m < 1e-5).sum()), "positions_below_1e-4": int((m < 1e-4).sum())}
        for name, m in margins.items()
    }
    report = {"seeds": {"A": seed_a, "B": seed_b}, "checks": checks, "conditioning": conditioning}
    report["i2s_gap"] = i2s_gap
    report["f32_size"] = f32_size
    (out / "checks.json").write_text(json.dumps(report, indent=2) + "\n")
    write_readme(out, report)
    for what, stats in checks.items():
        print(f"  {what}: " + ", ".join(f"{k} {v:.4g}" for k, v in stats.items()))
    if args.keep_scratch:
        print(f"scratch kept in {scratch}")
    else:
        shutil.rmtree(scratch)
    return 0


README = """# Parity fixtures (generated: do not edit by hand)

Small random BitNet b1.58 models and what the reference implementations compute on them; the tests
`tests/test_parity_hf.py` and `tests/test_parity_gguf.py` compare our engine with these goldens.

Regenerate (needs torch 2.13.0, transformers, llama-cpp-python 0.3.36, gguf; about 5 minutes, 2 threads):

    cd /work/main && TORCH_COMPILE_DISABLE=1 python tools/make_fixtures.py

## Models
{models}

## Goldens (`.npz`)
Each holds `tokens` [5, {seq_len}] (teacher-forced sequences: four texts, one of random ids, BOS first),
`top_ids`/`top_logits` [5, {seq_len}, {top_k}] (best first), `std` (std of the full logit row),
`greedy_prompts` [5, {prompt_len}], `greedy_tokens` [5, {n_new}] (the oracle's greedy continuation) with
`greedy_top_ids`/`greedy_top_logits`/`greedy_std` for each continuation step, `meta` (json), and for the
quantised transformers runs `margin` [5, {seq_len}]: per position, the distance in int8 steps of the
activation nearest to a rounding boundary (float noise of any other implementation flips roundings
closer than ~1e-5 steps, and a flip cascades).

{goldens}

## Checks made while generating (full logits, |diff| in units of the reference row's std)
{checks}

Seeds: A {seed_a}, B {seed_b} (first seeds whose BOS row has every activation at least {bos_margin:g} int8
steps from a rounding boundary, in transformers, for A and its SiLU twin: a BOS flip would perturb every
position of every sequence). Positions with margin below 1e-5 / 1e-4: {conditioning}.
"""
MODELS = """- `a_packed/`: A, 2B4T-like (4 layers, d_model 256, d_ff 768, 4 heads, 2 KV heads, head_dim 64,
  relu², tied embeddings, vocab 512 byte-level BPE, theta 500000); HF packed uint8 + weight_scale,
  autobitlinear offline, bf16 norms and embeddings.
- `a_i2_s.gguf`: A as GGUF I2_S, arch `bitnet-b1.58`, written by our exporter (server/gguf_export.py).
- `twin_tq2_0.gguf`, `twin_tq1_0.gguf`: A's tensors as a 1bitLLM-like model (arch `bitnet`, SiLU,
  theta 10000), written with the `gguf` package (its TQ quantisers); F16 token_embd, F32 norms.
- `b_online/`: B (1 layer, d_model 256, d_ff 512, 4 heads MHA, relu²), bf16 master weights, autobitlinear
  online (ternarised with absmean at load). Master weights keep clear of the absmean rounding boundary.
All floats are bf16 values that f16 also holds and all scales are f16-exact: every file stores the same
values."""
GOLDENS = """- `hf_a_packed`: transformers on `a_packed/` (BitNet quantisation active, float32).
- `hf_a_unquantised`: transformers on A with plain float linears holding codes·scale (no activation
  quantisation): the reference for the numpy forward in the tests' teeth check.
- `hf_b_online`: transformers on `b_online/`.
- `hf_twin`: transformers on the twin (packed, SiLU, theta 10000): same math as ours on the twin GGUFs.
- `llama_twin_tq2_0`, `llama_twin_tq1_0`: llama.cpp on the twin GGUFs (f32 KV cache, logits_all, 2 threads).
- `llama_twin_f32`: llama.cpp on the twin with F32 ternary weights (file not kept, {f32_size}): llama.cpp runs
  F32 weights with unquantised activations."""


def write_readme(out: pathlib.Path, report: dict) -> None:
    sizes = {p.name: p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    checks = "\n".join(
        f"- {what}: " + ", ".join(f"{k} {v:.3g}" for k, v in stats.items())
        for what, stats in report["checks"].items()
    )
    total = sum(sizes.values())
    checks += f"\n\nTotal size of this folder: {total / 1e6:.2f} MB."
    text = README.format(
        models=MODELS,
        goldens=GOLDENS.format(f32_size=report.get("f32_size", "about 13 MB")),
        checks=checks,
        seed_a=report["seeds"]["A"],
        seed_b=report["seeds"]["B"],
        bos_margin=BOS_MARGIN,
        conditioning=json.dumps(report["conditioning"]),
        seq_len=SEQ_LEN,
        top_k=fo.TOP_K,
        prompt_len=PROMPT_LEN,
        n_new=N_NEW,
    )
    if report.get("i2s_gap"):
        text += f"\nGap: {report['i2s_gap']}\n"
    (out / "README.md").write_text(text)


def unquantised_state(model: fm.RandomModel) -> dict[str, np.ndarray]:
    """HF tensor names -> float32 arrays, projections as dequantised ternary matrices codes·scale."""
    state = {}
    for name, (array, kind) in fm.hf_state_dict(model, packed=True).items():
        if name.endswith(".weight_scale"):
            continue
        if kind == "u8":
            layer = int(name.split(".")[2])
            gguf_name = next(g for g, h in fm.HF_LAYER_NAMES.items() if name.endswith(f".{h}.weight"))
            array = model.ternary_weight(f"blk.{layer}.{gguf_name}.weight")
        state[name] = array
    return state


if __name__ == "__main__":
    raise SystemExit(main())
