"""The client CLI against a real server: `generate` as a subprocess (streamed text and JSON lines), the
console script's dispatch, `chat` keeping the conversation, and info / tokenize / health in-process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from bitnet_grpc.client import Client
from bitnet_grpc.client.cli import main
from test_client import address, free_port, running_server

GREEDY_FLAGS = ["--temperature", "0", "--max-tokens", "8"]
GREEDY = {"temperature": 0.0, "max_tokens": 8}


@pytest.fixture(scope="module")
def server():
    with running_server() as service:
        yield service


@pytest.fixture(scope="module")
def client(server):
    with Client(address(server), timeout=120) as c:
        yield c


def run_cli(
    *args: str, stdin: str | None = None, command: list[str] | None = None
) -> subprocess.CompletedProcess:
    base = command or [sys.executable, "-m", "bitnet_grpc.client"]
    return subprocess.run(
        [*base, *args], input=stdin, capture_output=True, text=True, timeout=180, check=False
    )


def test_generate_streams_the_completion_to_stdout(server, client):
    expected = client.complete("The weather today", **GREEDY)
    done = run_cli("generate", "The weather today", "--target", address(server), *GREEDY_FLAGS)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected.text + "\n"
    assert "length" in done.stderr and "8 tokens" in done.stderr  # the summary line


def test_generate_json_prints_one_object_per_chunk(server, client):
    # 48 tokens: enough that the stream arrives in several messages even from a fast model.
    expected = client.complete("The weather today", temperature=0.0, max_tokens=48, ignore_eos=True)
    flags = ["--temperature", "0", "--max-tokens", "48", "--ignore-eos", "--json"]
    done = run_cli("generate", "The weather today", "--target", address(server), *flags)
    assert done.returncode == 0, done.stderr
    chunks = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(chunks) >= 2
    assert "".join(c["text"] for c in chunks) == expected.text
    assert [t for c in chunks for t in c["token_ids"]] == list(expected.token_ids)
    assert chunks[-1]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 48
    assert all(c["finish_reason"] is None for c in chunks[:-1])


def test_console_script_dispatches_generate(server, client):
    script = shutil.which("bitnet-grpc")
    if script is None:
        pytest.skip("the bitnet-grpc console script is not on PATH")
    expected = client.complete("Hello", **GREEDY)
    done = run_cli("generate", "Hello", "--target", address(server), "-q", *GREEDY_FLAGS, command=[script])
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected.text + "\n"


def test_generate_reports_errors_with_exit_status(server):
    bad = run_cli("generate", "Hi", "--target", address(server), "--top-p", "1.5")
    assert bad.returncode == 2 and "top_p" in bad.stderr
    refused = run_cli("generate", "Hi", "--target", address(server), "--max-tokens", "100000000")
    assert refused.returncode == 1 and "INVALID_ARGUMENT" in refused.stderr and "max_tokens" in refused.stderr
    down = run_cli("generate", "Hi", "--target", f"127.0.0.1:{free_port()}", "--retries", "0")
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr


def test_chat_keeps_the_conversation(server, client):
    if not client.model_info().has_chat_template:
        pytest.skip("the test model has no chat template")
    done = run_cli(
        "chat", "--target", address(server), *GREEDY_FLAGS, stdin="Hello\n\nHow are you?\n/exit\nignored\n"
    )
    assert done.returncode == 0, done.stderr
    first = client.chat([{"role": "user", "content": "Hello"}], **GREEDY).text
    second = client.chat(
        [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "How are you?"},
        ],
        **GREEDY,
    ).text
    assert done.stdout == f"{first}\n{second}\n"


def test_info_tokenize_health_in_process(server, client, capsys):
    target = ["--target", address(server)]
    assert main(["info", "--json", *target]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["vocab_size"] == client.model_info().vocab_size
    assert main(["info", *target]) == 0
    assert "context_size" in capsys.readouterr().out

    assert main(["tokenize", "Hello world", "--json", *target]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == client.tokenize("Hello world").token_ids
    assert main(["tokenize", "Hello world", "--ids-only", "--no-special", *target]) == 0
    ids = client.tokenize("Hello world", add_special_tokens=False).token_ids
    assert capsys.readouterr().out.split() == [str(t) for t in ids]

    assert main(["health", *target]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    assert main(["health", "--target", f"127.0.0.1:{free_port()}", "--timeout", "2"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
