"""Ternary BitLinear kernel against numpy float32 `x @ W.T` on BitNet shapes; run by hand, prints tables.

    python benchmarks/kernels.py                     # 2B4T and 0.7B shapes, M = 1 8 32 128, threads 1 and 2
    python benchmarks/kernels.py --m 1,32 --threads 2 --seconds 0.5 --json /tmp/kernels.json
    python benchmarks/kernels.py --layout 2bit --threads 1 --clock cpu   # the 2-bit kernels instead
    python benchmarks/kernels.py --models small --m 1,4,16,32 --stat p10  # the default model's matrices

The ternary call is bitlinear_into with preallocated scratch (quantise + matmul, as the model runs
it), on the weight layout the model would pick (--layout auto: the LUT layout on AVX-512BW CPUs).

Each thread count runs in its own child process whose OPENBLAS_NUM_THREADS / OMP_NUM_THREADS are set
before numpy is imported (and threadpoolctl, when installed, pins the BLAS pool too), so numpy and
our kernel use the same number of threads. Each timing is the median of single calls (see
per_call_seconds for why); --stat p10 prints the 10th percentiles, --json keeps all three statistics.

"hot" times one weight matrix over and over: its packed form (4.4 MB for 2560x6912) stays in the
last-level cache, as in a micro-benchmark. "cold" cycles through enough copies to overflow the cache,
as a forward pass over a whole model does (30 layers x 7 matrices never fit), so weights stream from
DRAM. numpy gets the same treatment with its float32 copies.
Columns: ternary time per call (bitlinear = quantise + matmul), effective GOPS (2*M*N*K operations),
packed weight bytes streamed per second, numpy time and the speed-up (numpy time / ternary time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = {  # (N out, K in): the BitLinear matrices of each model
    "2B4T": [(2560, 2560), (640, 2560), (6912, 2560), (2560, 6912)],
    "0.7B": [(1536, 1536), (4096, 1536), (1536, 4096)],
    # the built-in default model (server/data/default-model.gguf): qkv, attn_output, gate_up, ffn_down,
    # where per-call costs (argument checks, quantisation, tables, thread hand-off) weigh most
    "small": [(512, 256), (256, 256), (1536, 256), (256, 768)],
}
COLD_BYTES = 96 << 20  # 3x a 32 MB L3: enough copies that each call finds its weights in DRAM


def per_call_seconds(fn, seconds: float, clock, min_calls: int = 15) -> dict[str, float]:
    """Median, 10th and 90th percentile of single-call times. Not the mean: on a shared machine a
    parallel call now and then waits whole scheduler slices (milliseconds) for a thread whose CPU is
    busy with another process, and a few of those swamp the mean of short calls. When the machine is
    saturated even the median is hit; the 10th percentile then shows the uncontended speed."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < seconds:
        t0 = clock()
        fn()
        times.append(clock() - t0)
    times.sort()
    return {
        "median": statistics.median(times),
        "p10": times[int(0.1 * (len(times) - 1))],
        "p90": times[int(0.9 * (len(times) - 1))],
    }


def aligned_copy(a):
    """A copy whose data starts at a 64-byte boundary, as pack_ternary/pack_lut return theirs (numpy's
    own copies are only 16-byte aligned, and 64-byte loads that straddle cache lines are slower)."""
    import numpy as np

    buf = np.empty(a.nbytes + 64, np.uint8)
    start = (-buf.ctypes.data) % 64
    out = buf[start : start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def cycling(make_call, copies):
    """A zero-argument function that calls make_call(copy) on the next copy each time."""
    state = {"i": 0}

    def call():
        i = state["i"]
        state["i"] = (i + 1) % len(copies)
        make_call(copies[i])

    return call


def child(
    lib: str, threads: int, ms: list[int], models: list[str], seconds: float, clock_name: str, layout: str
) -> None:
    """Measure one library at one thread count; print one JSON object per case. The two libraries
    run in separate processes because each one's idle threads spin for a while after a call and
    would steal the cores from the other."""
    import numpy as np
    from bitnet_grpc.cyext import ternary

    blas_control = "env OPENBLAS_NUM_THREADS/OMP_NUM_THREADS"
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads)
        blas_control = "threadpoolctl"
    except ImportError:
        pass
    ternary.set_num_threads(threads)
    clock = time.thread_time if clock_name == "cpu" else time.perf_counter
    rng = np.random.default_rng(0)
    for model in models:
        for n, k in SHAPES[model]:
            w = rng.standard_normal((n, k)).astype(np.float32)
            if lib == "ternary":
                codes, scale = ternary.ternarize(w)
                hot = ternary.pack_ternary(codes)
                if layout == "lut":
                    hot = ternary.pack_lut(hot)
                w_scale = np.full(n, scale, np.float32)
            else:
                hot = w
            copies = [aligned_copy(hot) for _ in range(max(2, -(-COLD_BYTES // hot.nbytes)))]
            for m in ms:
                x = rng.standard_normal((m, k)).astype(np.float32)
                out = np.empty((m, n), np.float32)
                if lib == "ternary":
                    scratch = (
                        np.empty((m, ternary.padded_k(k)), np.int8),
                        np.empty(m, np.float32),
                        np.empty(m, np.int32),
                    )

                    def call(p, x=x, out=out, w_scale=w_scale, scratch=scratch):
                        ternary.bitlinear_into(x, p, w_scale, *scratch, out)
                else:

                    def call(wf, x=x, out=out):
                        np.matmul(x, wf.T, out=out)

                row = {
                    "lib": lib,
                    "model": model,
                    "n": n,
                    "k": k,
                    "m": m,
                    "threads": threads,
                    "weight_bytes": hot.nbytes,
                    "hot": per_call_seconds(lambda f=call, h=hot: f(h), seconds, clock),
                    "cold": per_call_seconds(cycling(call, copies), seconds, clock),
                    "path": ternary.get_kernel_path() if layout == "2bit" else "lut",
                    "blas_control": blas_control,
                }
                print(json.dumps(row), flush=True)
            del copies


def run_children(args) -> list[dict]:
    """One child per (library, thread count); returns rows that pair both libraries' timings."""
    rows = {}
    for threads in args.threads:
        for lib in ("ternary", "numpy"):
            env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
            cmd = [sys.executable, __file__, "--child", lib, str(threads), "--m", ",".join(map(str, args.m))]
            cmd += ["--models", ",".join(args.models), "--seconds", str(args.seconds), "--clock", args.clock]
            cmd += ["--layout", args.layout]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"benchmark child ({lib}, {threads} threads) failed:\n{done.stderr}")
            for line in done.stdout.splitlines():
                r = json.loads(line)
                key = (r["model"], r["n"], r["k"], r["m"], r["threads"])
                row = rows.setdefault(key, {k: r[k] for k in ("model", "n", "k", "m", "threads")})
                prefix = "tern" if lib == "ternary" else "np"
                row[f"{prefix}_hot"], row[f"{prefix}_cold"] = r["hot"], r["cold"]
                if lib == "ternary":
                    row["packed_bytes"], row["path"] = r["weight_bytes"], r["path"]
                row["blas_control"] = r["blas_control"]
    return list(rows.values())


def print_tables(rows: list[dict], stat: str) -> None:
    print(
        f"{'model':5} {'N x K':>11} {'M':>4} {'thr':>3} | {'hot us':>8} {'GOPS':>6} {'GB/s':>6} {'np us':>8} "
        f"{'x np':>6} | {'cold us':>8} {'GOPS':>6} {'GB/s':>6} {'np us':>8} {'x np':>6}"
    )
    for r in rows:
        ops = 2.0 * r["m"] * r["n"] * r["k"]
        cols = []
        for mode in ("hot", "cold"):
            t, tn = r[f"tern_{mode}"][stat], r[f"np_{mode}"][stat]
            gbs = r["packed_bytes"] / t / 1e9
            cols.append(f"{t * 1e6:8.1f} {ops / t / 1e9:6.0f} {gbs:6.1f} {tn * 1e6:8.1f} {tn / t:6.1f}")
        shape = f"{r['n']}x{r['k']}"
        print(f"{r['model']:5} {shape:>11} {r['m']:4} {r['threads']:3} | {cols[0]} | {cols[1]}")

    print("\nBatching gain: time per row at M=1 divided by time per row at M=32 (and M=128)")
    head = f"{'hot 32':>7} {'hot 128':>7} | {'cold 32':>7} {'cold 128':>8}"
    print(f"{'model':5} {'N x K':>11} {'thr':>3} | {head}")
    by_key = {(r["n"], r["k"], r["threads"], r["m"]): r for r in rows}
    for r in rows:
        if r["m"] != 1:
            continue
        gains = []
        for mode in ("hot", "cold"):
            for m in (32, 128):
                other = by_key.get((r["n"], r["k"], r["threads"], m))
                one, many = r[f"tern_{mode}"][stat], other[f"tern_{mode}"][stat] if other else float("nan")
                gains.append(one / (many / m))
        shape = f"{r['n']}x{r['k']}"
        print(
            f"{r['model']:5} {shape:>11} {r['threads']:3} | {gains[0]:7.2f} {gains[1]:7.2f} | "
            f"{gains[2]:7.2f} {gains[3]:8.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--m", default="1,8,32,128", help="comma-separated activation row counts")
    parser.add_argument("--models", default="2B4T,0.7B", help=f"comma-separated subset of {list(SHAPES)}")
    parser.add_argument("--seconds", type=float, default=0.15, help="time spent on each measurement")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: CPU time of the calling thread (only with --threads 1): what a call costs while it has "
        "a core, unaffected by other processes taking the CPU away on a shared machine",
    )
    parser.add_argument(
        "--stat", choices=("median", "p10"), default="median", help="which single-call statistic to print"
    )
    parser.add_argument(
        "--layout",
        choices=("auto", "lut", "2bit"),
        default="auto",
        help="weight layout: auto = what the model uses (LUT on AVX-512BW CPUs, else 2-bit)",
    )
    parser.add_argument("--json", help="also write the raw rows (with 90th percentiles) to this file")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.m = [int(v) for v in args.m.split(",")]
    args.models = args.models.split(",")
    if args.layout == "auto":
        from bitnet_grpc.cyext import ternary

        args.layout = "lut" if getattr(ternary, "lut_preferred", lambda: False)() else "2bit"
    if args.child:
        child(args.child[0], int(args.child[1]), args.m, args.models, args.seconds, args.clock, args.layout)
        return
    args.threads = [int(v) for v in args.threads.split(",")]
    if args.clock == "cpu" and args.threads != [1]:
        parser.error("--clock cpu measures one thread: use it with --threads 1")
    load_before = os.getloadavg()
    rows = run_children(args)
    load_after = os.getloadavg()
    print(
        f"kernel path {rows[0]['path']}, {args.stat} of {args.clock}-clock call times, "
        f"numpy threads via {rows[0]['blas_control']}, "
        f"load average {load_before[0]:.1f} -> {load_after[0]:.1f} on {os.cpu_count()} CPUs\n"
    )
    print_tables(rows, args.stat)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
