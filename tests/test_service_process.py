"""The server process: SIGTERM drain, startup errors, the CLI, and grpcurl through reflection."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import pytest
from bitnet_grpc.proto import generation_pb2 as pb
from bitnet_grpc.proto import generation_pb2_grpc as pb_grpc
from bitnet_grpc.server import cli
from bitnet_grpc.server.serve import ServeOptions, StartupError
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVE = [sys.executable, "-m", "bitnet_grpc.server.cli", "serve"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health_status(channel: grpc.Channel) -> int | None:
    try:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status
    except grpc.RpcError:
        return None


def test_sigterm_lets_running_streams_finish_refuses_new_calls_and_exits_0(service_model_path) -> None:
    port = free_port()
    # A long context keeps the 4 streams busy for a while even on a small, fast model.
    args = ["--model", service_model_path, "--port", str(port), "--metrics-port", "-1", "--max-batch", "4"]
    args += ["--ctx-size", "2048"]
    proc = subprocess.Popen([*SERVE, *args, "--grace", "60"], stderr=subprocess.PIPE, text=True)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        deadline = time.monotonic() + 120
        while health_status(channel) != health_pb2.HealthCheckResponse.SERVING:
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        stub = pb_grpc.TextGenerationStub(channel)
        ctx = stub.GetModelInfo(pb.GetModelInfoRequest()).context_size
        assert ctx == 2048
        request = pb.GenerateRequest(prompt="x", max_tokens=1500, temperature=0, ignore_eos=True)
        results: list[list] = [[] for _ in range(4)]
        errors: list[BaseException] = []
        started = threading.Barrier(5)

        def consume(i: int) -> None:
            try:
                stream = stub.Generate(request)
                results[i].append(next(stream))
                started.wait()
                results[i].extend(stream)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)
                started.abort()

        threads = [threading.Thread(target=consume, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        started.wait(timeout=60)  # all 4 are streaming
        proc.send_signal(signal.SIGTERM)
        while health_status(channel) == health_pb2.HealthCheckResponse.SERVING:
            time.sleep(0.01)
        assert health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(pb.GenerateRequest(prompt="late", max_tokens=2)))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert any(t.is_alive() for t in threads), "streams ended before the refusal was checked"
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        for messages in results:
            assert messages[-1].finish_reason == pb.FINISH_REASON_LENGTH
            assert sum(len(m.token_ids) for m in messages) == request.max_tokens
        assert proc.wait(timeout=60) == 0
        channel.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    log = proc.stderr.read()
    assert "SIGTERM received" in log and "all streams finished" in log


def test_port_in_use_is_a_startup_error() -> None:
    # The occupant keeps grpcio's default SO_REUSEPORT; ours turns it off, so the bind must fail.
    occupant = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = occupant.add_insecure_port("127.0.0.1:0")
    occupant.start()
    try:
        run = subprocess.run(
            [*SERVE, "--port", str(port), "--metrics-port", "-1"], capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 1
        assert f"cannot listen on 127.0.0.1:{port}" in run.stderr
    finally:
        occupant.stop(0)


def test_pool_arithmetic_is_checked() -> None:
    assert ServeOptions(max_batch=4, max_queue=8).pool_sizes() == (28, 56)
    with pytest.raises(StartupError, match="--workers 13 is too small"):
        ServeOptions(max_batch=4, max_queue=8, workers=13).pool_sizes()


def test_cli_dispatch(capsys) -> None:
    assert cli.main(["--help"]) == 0
    assert "serve" in capsys.readouterr().out
    assert cli.main(["no-such-command"]) == 2
    assert "unknown command" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--help"])
    assert exited.value.code == 0
    assert "--max-batch" in capsys.readouterr().out


def test_cli_names_a_missing_subcommand_module(monkeypatch, capsys) -> None:
    monkeypatch.setitem(cli.SUBCOMMANDS, "convert", ("bitnet_grpc.server.not_installed", "main", "x"))
    assert cli.main(["convert"]) == 2
    assert "bitnet_grpc.server.not_installed is missing" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("grpcurl") is None, reason="grpcurl is not installed")
def test_grpcurl_lists_describes_and_streams(server) -> None:
    def grpcurl(*args: str) -> str:
        run = subprocess.run(["grpcurl", "-plaintext", *args], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        return run.stdout

    assert "bitnet.v1.TextGeneration" in grpcurl(server.target, "list").split()
    described = grpcurl(server.target, "describe", "bitnet.v1.TextGeneration")
    assert (
        "rpc Generate ( .bitnet.v1.GenerateRequest ) returns ( stream .bitnet.v1.GenerateResponse );"
        in described
    )
    body = json.dumps({"prompt": "Hello", "max_tokens": 5, "temperature": 0, "ignore_eos": True})
    out = grpcurl("-d", body, server.target, "bitnet.v1.TextGeneration/Generate")
    messages = [json.loads(m) for m in out.replace("}\n{", "}\x00{").split("\x00")]
    assert messages[-1]["finish_reason"] == "FINISH_REASON_LENGTH"
    assert sum(len(m.get("token_ids", [])) for m in messages) == 5
