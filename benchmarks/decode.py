"""Single-stream prefill and decode speed of our engine against llama.cpp on the same GGUF file.

    python tools/make_bench_model.py /tmp/bench                       # ~730M random model, not committed
    python benchmarks/decode.py /tmp/bench/bench-large-tq2_0.gguf --i2s /tmp/bench/bench-large-i2_s.gguf

For each thread count (default 1 and 2) each implementation runs in its own child process (OMP and BLAS
pools sized before anything is imported, no two measurements at once): a prompt of --prompt random ids
as one prefill call, then --decode greedy tokens one call each; the median of --repeat runs after a
warm-up. That is repeated for --rounds rounds in alternating order; the table shows medians over rounds
and ratios taken within each round (the machine may be shared: load changes hit both sides alike).
"ours" times `Model.forward` plus the argmax, as llama.cpp is timed through llama-cpp-python's `eval`
plus the argmax; "engine" times `Engine.generate` (greedy, detokenising, stop handling) for the same work.
Under contention for cores (more busy threads than cores) llama.cpp's spinning thread pool slows down far
more than ours: compare figures taken on an otherwise idle machine. llama.cpp runs with its default f16
KV cache; it is skipped when llama-cpp-python is not installed. Ratios are ours / llama.cpp (above 1:
we are faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _prompt(n: int, vocab: int) -> list[int]:
    import numpy as np

    return [int(t) for t in np.random.default_rng(0).integers(0, min(vocab, 500), n)]


def run_ours(path: str, threads: int, n_prompt: int, n_decode: int, repeat: int) -> dict[str, float]:
    import numpy as np
    from bitnet_grpc.server.loader import load_weights
    from bitnet_grpc.server.model import Model

    weights = load_weights(path)
    model = Model(weights, n_slots=1, ctx_size=n_prompt + n_decode + 1, threads=threads)
    prompt = np.array(_prompt(n_prompt, weights.config.vocab_size), np.int32)

    def once() -> tuple[float, float]:
        start = time.perf_counter()
        zeros = np.zeros(n_prompt, np.int32)
        logits = model.forward(zeros, prompt, np.arange(n_prompt, dtype=np.int32), [n_prompt - 1])
        token = int(np.argmax(logits[0]))
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(n_decode):
            logits = model.forward([0], [token], [n_prompt + i], [0])
            token = int(np.argmax(logits[0]))
        return n_prompt / prefill, n_decode / (time.perf_counter() - start)

    return _medians(once, repeat)


def run_engine(path: str, threads: int, n_prompt: int, n_decode: int, repeat: int) -> dict[str, float]:
    from bitnet_grpc.server.engine import Engine
    from bitnet_grpc.server.sampling import SamplingParams

    engine = Engine.load(path, ctx_size=n_prompt + n_decode + 1, threads=threads)
    prompt = _prompt(n_prompt, engine.model.config.vocab_size)
    params = SamplingParams(max_tokens=n_decode + 1, temperature=0.0, ignore_eos=True, seed=0)

    def once() -> tuple[float, float]:
        start = time.perf_counter()
        events = engine.generate(prompt, params)
        next(events)  # prefill and the first token
        first = time.perf_counter()
        n = sum(1 for _ in events)
        return n_prompt / (first - start), n / (time.perf_counter() - first)

    return _medians(once, repeat)


def run_llama(path: str, threads: int, n_prompt: int, n_decode: int, repeat: int) -> dict[str, float]:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=n_prompt + n_decode + 8, n_batch=n_prompt, n_ubatch=n_prompt,
                n_threads=threads, n_threads_batch=threads, verbose=False)  # fmt: skip
    prompt = _prompt(n_prompt, llm.n_vocab())
    n_vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))

    def once() -> tuple[float, float]:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        token = int(np.argmax(last_logits()))
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(n_decode):
            llm.eval([token])
            token = int(np.argmax(last_logits()))
        return n_prompt / prefill, n_decode / (time.perf_counter() - start)

    return _medians(once, repeat)


def _medians(once, repeat: int) -> dict[str, float]:
    once()  # warm-up: page in the weights, size the scratch buffers
    runs = [once() for _ in range(repeat)]
    return {"prefill": statistics.median(r[0] for r in runs), "decode": statistics.median(r[1] for r in runs)}


WORKERS = {"ours": run_ours, "engine": run_engine, "llama": run_llama}


def measure(kind: str, path: str, threads: int, args) -> dict[str, float] | None:
    """One measurement in a child process with its thread pools sized from the start."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--worker", kind, path, "--threads", str(threads)]
    cmd += ["--prompt", str(args.prompt), "--decode", str(args.decode), "--repeat", str(args.repeat)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        print(f"  {kind} at {threads} threads failed:\n{proc.stderr.strip()[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(value: object, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a GGUF file both can read (TQ2_0)")
    parser.add_argument("--i2s", help="the same model as I2_S (ours only; llama.cpp cannot read it)")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per child process (median)")
    parser.add_argument("--rounds", type=int, default=3, help="child processes per implementation")
    parser.add_argument("--no-engine", action="store_true", help="skip the Engine.generate measurement")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        result = WORKERS[args.worker](args.model, int(args.threads), args.prompt, args.decode, args.repeat)
        print(json.dumps(result))
        return 0

    try:
        import llama_cpp  # noqa: F401

        have_llama = True
    except ImportError:
        have_llama = False
        print("llama-cpp-python is not installed: llama.cpp columns stay empty", file=sys.stderr)

    print(
        f"prompt {args.prompt} tokens, decode {args.decode} tokens; tokens/s, median of {args.rounds} rounds"
    )
    columns = ("threads", 7), ("file", 6), ("impl", 7), ("prefill", 8), ("decode", 8), ("prefill/llama", 14)
    print(" ".join(f"{name:>{width}}" for name, width in columns) + f" {'decode/llama':>13}")
    rows = [("TQ2_0", "llama", args.model)] if have_llama else []
    rows.append(("TQ2_0", "ours", args.model))
    if not args.no_engine:
        rows.append(("TQ2_0", "engine", args.model))
    if args.i2s:
        rows.append(("I2_S", "ours", args.i2s))
    results = []
    for threads in [int(t) for t in args.threads.split(",")]:
        # Rounds alternate the order of the implementations, and ratios are taken within a round, so a
        # change in the machine's load (it is shared) hits both sides of a ratio alike.
        per_round = []
        for r in range(args.rounds):
            order = rows if r % 2 == 0 else rows[::-1]
            per_round.append({(f, k): measure(k, path, threads, args) for f, k, path in order})
        for file_kind, kind, _ in rows:
            pairs = [(rnd[(file_kind, kind)], rnd.get(("TQ2_0", "llama"))) for rnd in per_round]
            row: dict[str, object] = {"threads": threads, "file": file_kind, "impl": kind}
            for key in ("prefill", "decode"):
                mine = [m[key] for m, _ in pairs if m]
                row[key] = statistics.median(mine) if mine else None
                ratios = [m[key] / ll[key] for m, ll in pairs if m and ll]
                row[f"{key}_ratio"] = statistics.median(ratios) if ratios and kind != "llama" else None
            results.append(row)
            cells = [_fmt(row["prefill"], ".1f"), _fmt(row["decode"], ".1f")]
            cells += [_fmt(row["prefill_ratio"], ".2f", "x"), _fmt(row["decode_ratio"], ".2f", "x")]
            widths = (8, 8, 14, 13)
            line = f"{threads:>7} {file_kind:>6} {kind:>7} " + " ".join(
                f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)
            )
            print(line, flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"prompt": args.prompt, "decode": args.decode, "rounds": args.rounds, "results": results},
                fh,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
