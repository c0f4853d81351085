"""Client subcommands of `bitnet-grpc`: generate, chat, info, tokenize, health, bench.

`main(argv)` takes the subcommand as argv[0] (server/cli.py passes it through). Text goes to stdout as
it arrives; status lines, progress and errors go to stderr so stdout stays pipeable. Exit status: 0 on
success, 1 when the server or the connection failed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from bitnet_grpc.client.base import DEFAULT_TARGET
from bitnet_grpc.client.bench import BenchConfig, run_bench
from bitnet_grpc.client.bench_stats import format_report
from bitnet_grpc.client.errors import BitnetError
from bitnet_grpc.client.results import Chunk, CompletionBuilder
from bitnet_grpc.client.sync_client import Client

# Flags that map one to one onto GenerateRequest fields: (flag, type, help).
SAMPLING_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("max_tokens", int, "new tokens at most (server default 128)"),
    ("temperature", float, "0 = greedy (server default 1.0)"),
    ("top_k", int, "keep the k most likely tokens (0 = off)"),
    ("top_p", float, "nucleus mass in (0, 1]"),
    ("min_p", float, "drop tokens below min_p x the best one's probability"),
    ("repetition_penalty", float, "> 0; 1 = off"),
    ("presence_penalty", float, "in [-2, 2]"),
    ("frequency_penalty", float, "in [-2, 2]"),
    ("seed", int, "seed of the request's own random generator"),
    ("logprobs", int, "return logprobs with this many alternatives (0..20)"),
)


def _targets(values: list[str] | None) -> str | list[str]:
    """--target may repeat or hold a comma-separated list; several addresses use round_robin."""
    parts = [p.strip() for v in values or [DEFAULT_TARGET] for p in v.split(",") if p.strip()]
    if any(":" in p and p.split(":", 1)[0] in ("ipv4", "ipv6", "dns", "unix") for p in parts):
        return ",".join(parts)  # an explicit gRPC URI: pass it through whole
    return parts[0] if len(parts) == 1 else parts


def _connection_flags(parser: argparse.ArgumentParser, timeout: float, retries: int) -> None:
    parser.add_argument(
        "--target",
        action="append",
        help=f"server address host:port (default {DEFAULT_TARGET}); repeat or comma-separate for round_robin",
    )
    parser.add_argument(
        "--timeout", type=float, default=timeout, help=f"call deadline in seconds ({timeout:g})"
    )
    parser.add_argument(
        "--retries", type=int, default=retries, help=f"retries on UNAVAILABLE, 0..4 ({retries})"
    )


def _sampling_flags(parser: argparse.ArgumentParser) -> None:
    for name, kind, help_ in SAMPLING_FLAGS:
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, help=help_)
    parser.add_argument("--stop", action="append", help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence tokens")
    parser.add_argument("--request-id", default="", help="echoed in the server's logs and the last message")


def _sampling_params(args: argparse.Namespace) -> dict:
    params = {name: getattr(args, name) for name, _, _ in SAMPLING_FLAGS if getattr(args, name) is not None}
    if args.stop:
        params["stop"] = args.stop
    if args.ignore_eos:
        params["ignore_eos"] = True
    if args.request_id:
        params["request_id"] = args.request_id
    return params


def _client(args: argparse.Namespace) -> Client:
    return Client(_targets(args.target), timeout=args.timeout, retries=args.retries)


def _summary(chunk: Chunk | None) -> str:
    if chunk is None or chunk.usage is None:
        return ""
    line = (
        f"[{chunk.finish_reason}: {chunk.usage.prompt_tokens} prompt + {chunk.usage.completion_tokens} tokens"
    )
    if chunk.timings is not None:
        t = chunk.timings
        ttft_ms = t.time_to_first_token_seconds * 1000
        line += f", first token {ttft_ms:.0f} ms, {t.decode_tokens_per_second:.1f} tok/s"
    return line + "]"


def _stream_out(chunks, as_json: bool) -> Chunk | None:
    """Write chunks to stdout as they arrive; returns the last one."""
    last = None
    for chunk in chunks:
        if as_json:
            sys.stdout.write(json.dumps(chunk.to_dict(), ensure_ascii=False) + "\n")
        else:
            sys.stdout.write(chunk.text)
        sys.stdout.flush()
        last = chunk
    return last


# -- subcommands ------------------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.token_ids:
        prompt = [int(t) for t in prompt.replace(",", " ").split()]
    with _client(args) as client:
        last = _stream_out(client.generate(prompt, **_sampling_params(args)), args.json)
    if not args.json:
        sys.stdout.write("\n")
        if not args.quiet and last is not None:
            print(_summary(last), file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Read user lines from stdin, stream each reply, keep the whole conversation."""
    interactive = sys.stdin.isatty()
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    params = _sampling_params(args)
    if interactive:
        print("chat: type a message; /reset forgets the conversation, /exit quits.", file=sys.stderr)
    with _client(args) as client:
        while True:
            if interactive:
                sys.stderr.write("> ")
                sys.stderr.flush()
            line = sys.stdin.readline()
            if not line:
                break
            text = line.rstrip("\n")
            if text.strip() in ("/exit", "/quit"):
                break
            if text.strip() == "/reset":
                history = history[:1] if args.system else []
                continue
            if not text.strip():
                continue
            turn = history + [{"role": "user", "content": text}]
            builder = CompletionBuilder()
            try:
                for chunk in client.chat_stream(turn, **params):
                    builder.add(chunk)
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
            except BitnetError as exc:  # the turn is dropped; the conversation goes on
                sys.stdout.write("\n")
                print(f"error: {exc}", file=sys.stderr)
                continue
            sys.stdout.write("\n")
            sys.stdout.flush()
            history = turn + [{"role": "assistant", "content": builder.build().text}]
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.model_info().to_dict()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            shown = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            print(f"{key:<{width}}  {shown}")
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    with _client(args) as client:
        result = client.tokenize(text, add_special_tokens=not args.no_special)
    if args.json:
        print(json.dumps({"token_ids": result.token_ids, "tokens": result.tokens}, ensure_ascii=False))
    elif args.ids_only:
        print(" ".join(map(str, result.token_ids)))
    else:
        tokens = (
            result.tokens if len(result.tokens) == len(result.token_ids) else [""] * len(result.token_ids)
        )
        for token_id, token in zip(result.token_ids, tokens, strict=True):
            print(f"{token_id:>8}  {token!r}")
        print(f"{len(result.token_ids)} tokens", file=sys.stderr)
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.health(args.service)
    print(status)
    return 0 if status == "SERVING" else 1


def cmd_bench(args: argparse.Namespace) -> int:
    duration, requests = args.duration, args.requests
    if duration is None and requests is None:
        duration = 20.0
    concurrency = args.concurrency if args.concurrency is not None else (0 if args.rate else 8)
    config = BenchConfig(
        target=_targets(args.target),
        concurrency=concurrency,
        rate=args.rate,
        duration=duration,
        requests=requests,
        prompts_file=args.prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        ignore_eos=not args.no_ignore_eos,
        temperature=args.temperature,
        seed=args.seed,
        request_timeout=args.timeout,
        retries=args.retries,
        progress_interval=args.progress_interval,
    )
    report = run_bench(config, progress_stream=None if args.quiet else sys.stderr)
    print(format_report(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 0


# -- parser -----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitnet-grpc", description="Client commands for a bitnet-grpc server."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("generate", help="stream a completion to the terminal")
    p.add_argument("prompt", help='prompt text ("-" reads stdin)')
    p.add_argument(
        "--token-ids", action="store_true", help="the prompt is token ids (space or comma separated)"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per streamed message")
    p.add_argument("-q", "--quiet", action="store_true", help="no summary line on stderr")
    _sampling_flags(p)
    _connection_flags(p, timeout=600.0, retries=3)
    p.set_defaults(run=cmd_generate)

    p = commands.add_parser("chat", help="interactive chat: one user message per stdin line")
    p.add_argument("--system", default="", help="system message opening the conversation")
    _sampling_flags(p)
    _connection_flags(p, timeout=600.0, retries=3)
    p.set_defaults(run=cmd_chat)

    p = commands.add_parser("info", help="the server's model and settings")
    p.add_argument("--json", action="store_true")
    _connection_flags(p, timeout=10.0, retries=3)
    p.set_defaults(run=cmd_info)

    p = commands.add_parser("tokenize", help="token ids of a text, by the server's tokenizer")
    p.add_argument("text", help='text ("-" reads stdin)')
    p.add_argument("--no-special", action="store_true", help="do not add BOS")
    p.add_argument("--json", action="store_true")
    p.add_argument("--ids-only", action="store_true", help="print the ids on one line")
    _connection_flags(p, timeout=10.0, retries=3)
    p.set_defaults(run=cmd_tokenize)

    p = commands.add_parser("health", help="grpc.health.v1 status; exit 0 only when SERVING")
    p.add_argument("--service", default="", help='service name ("" = the whole server)')
    _connection_flags(p, timeout=5.0, retries=0)
    p.set_defaults(run=cmd_health)

    p = commands.add_parser("bench", help="load-test a running server and report latency and throughput")
    load = p.add_argument_group("load")
    load.add_argument("--concurrency", type=int, help="streams in flight (default 8); with --rate, a cap")
    load.add_argument("--rate", type=float, help="Poisson arrivals, requests per second (open loop)")
    load.add_argument("--duration", type=float, help="seconds to issue requests (default 20)")
    load.add_argument("--requests", type=int, help="number of requests (instead of or with --duration)")
    work = p.add_argument_group("workload")
    work.add_argument("--prompts", help="prompt file: one per line, or .jsonl with a 'prompt' field")
    work.add_argument("--input-len", type=int, default=32, help="synthetic prompt length in tokens (32)")
    work.add_argument("--output-len", type=int, default=64, help="max_tokens of every request (64)")
    work.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at end-of-sequence")
    work.add_argument("--temperature", type=float, help="sampling temperature (server default)")
    work.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts and arrivals")
    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", help="write the report as JSON to PATH")
    out.add_argument("--progress-interval", type=float, default=1.0, help="seconds between progress lines")
    out.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    _connection_flags(p, timeout=600.0, retries=0)
    p.set_defaults(run=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one client subcommand; argv starts with its name (e.g. ["generate", "Hello"])."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return int(args.run(args))
    except BitnetError as exc:
        print(f"bitnet-grpc {args.command}: {exc}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:
        print(f"bitnet-grpc {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
