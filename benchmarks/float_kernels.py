"""Float kernels (output head, attention, RMSNorm) at the default model's shapes, timed per kernel path
in one run with the paths interleaved, so a shared machine's noise hits every path alike.

    python benchmarks/float_kernels.py [--rows 1 4 16] [--threads 2] [--repeats 200]

Prints milliseconds per call of each kernel and path: the median of --repeats calls, the best such
median of --rounds rounds (paths interleaved). Attention: all 6 layers' worth.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from bitnet_grpc.cyext import floatops


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def cases(rows: int, rng: np.random.Generator, position: int) -> dict:
    d, vocab, n_heads, n_kv, head_dim, ctx, layers = 256, 4096, 4, 2, 64, 512, 6
    x = rng.standard_normal((rows, d)).astype(np.float32)
    w = (rng.standard_normal((vocab, d)) * 0.05).astype(np.float32)
    w16, wbf = w.astype(np.float16).view(np.uint16), (w.view(np.uint32) >> 16).astype(np.uint16)
    out = np.empty((rows, vocab), np.float32)
    slots = np.arange(rows, dtype=np.int32) % 16  # the 16 cache slots below, shared beyond 16 rows
    k_cache = rng.standard_normal((16, n_kv, ctx, head_dim)).astype(np.float32)
    v_cache = rng.standard_normal((16, n_kv, ctx, head_dim)).astype(np.float32)
    q = rng.standard_normal((rows, n_heads * head_dim)).astype(np.float32)
    attn = np.empty_like(q)
    positions = np.full(rows, position, np.int32)
    scratch = np.empty((2, ctx), np.float32)
    norm_x = rng.standard_normal((rows, 768)).astype(np.float32)
    norm_w = np.ones(768, np.float32)

    def attention_6_layers():
        for _ in range(layers):
            floatops.attention(q, k_cache, v_cache, slots, positions, attn, scratch)

    def rmsnorm_13_calls():
        for width in (256,) * 12 + (768,):
            floatops.rmsnorm(norm_x[:, :width], norm_w[:width], 1e-5, norm_x[:, :width])

    return {
        "head f32": lambda: floatops.matmul_rows(x, w, out),
        "head f16": lambda: floatops.matmul_rows_f16(x, w16, out),
        "head bf16": lambda: floatops.matmul_rows_bf16(x, wbf, out),
        "attention x6": attention_6_layers,
        "rmsnorm x13": rmsnorm_13_calls,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--position", type=int, default=64)
    parser.add_argument("--only", default="", help="run only kernels whose name contains this")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per path (best is kept)")
    args = parser.parse_args()
    floatops.set_num_threads(args.threads)
    paths = floatops.kernel_paths()[1:] or floatops.kernel_paths()
    rng = np.random.default_rng(0)
    for rows in args.rows:
        best: dict = {}
        kernels = {k: f for k, f in cases(rows, rng, args.position).items() if args.only in k}
        for _ in range(args.rounds):
            for path in paths:
                floatops.set_kernel_path(path)
                for name, fn in kernels.items():
                    fn()
                    ms = median_ms(fn, args.repeats)
                    best[name, path] = min(best.get((name, path), ms), ms)
        for name in kernels:
            cells = "  ".join(f"{path} {best[name, path]:.3f}" for path in paths)
            print(f"rows {rows:>2}  {name:<13} ms: {cells}", flush=True)
    floatops.set_kernel_path(floatops.kernel_paths()[-1])


if __name__ == "__main__":
    main()
