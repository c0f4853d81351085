"""The `bitnet-grpc` console script: one entry point, each subcommand owned by the module that does it.

Subcommands are imported lazily so `bitnet-grpc health` does not load numpy kernels, and a missing or
broken module fails only its own subcommand, with a message saying which.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module, function, one-line help); each function takes the remaining argv, returns an int.
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "serve": ("bitnet_grpc.server.serve", "serve_main", "run the gRPC server"),
    "convert": ("bitnet_grpc.server.convert", "convert_main", "convert a model to GGUF"),
    "inspect": ("bitnet_grpc.server.inspect_model", "inspect_main", "describe a model file"),
    "generate": ("bitnet_grpc.client.cli", "main", "stream a completion from a server"),
    "chat": ("bitnet_grpc.client.cli", "main", "chat with a server"),
    "info": ("bitnet_grpc.client.cli", "main", "show a server's model info"),
    "tokenize": ("bitnet_grpc.client.cli", "main", "tokenize text on a server"),
    "health": ("bitnet_grpc.client.cli", "main", "check a server's health"),
    "bench": ("bitnet_grpc.client.cli", "main", "load-test a server"),
}
# The client CLI parses its own subcommand, so it gets the full argv; server-side ones get the rest.
_PASS_SUBCOMMAND = {"bitnet_grpc.client.cli"}


def _usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = ["usage: bitnet-grpc COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in SUBCOMMANDS.items()]
    lines += ["", "`bitnet-grpc COMMAND --help` describes a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in SUBCOMMANDS:
        print(f"bitnet-grpc: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, function_name, _ = SUBCOMMANDS[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            print(
                f"bitnet-grpc {command}: not available in this install ({module_name} is missing)",
                file=sys.stderr,
            )
            return 2
        raise
    function = getattr(module, function_name, None)
    if function is None:
        print(f"bitnet-grpc {command}: {module_name} has no {function_name}()", file=sys.stderr)
        return 2
    result = function([command, *rest] if module_name in _PASS_SUBCOMMAND else rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
