"""The Node.js example client (client/node/generate.js) streams a completion from a real server.

Needs `node` and the client's packages: `npm ci --prefix client/node` (CI does this). Skipped with a
message saying which is missing otherwise.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from bitnet_grpc.client import Client
from test_client import address, running_server

NODE_DIR = Path(__file__).resolve().parents[1] / "client" / "node"
SCRIPT = NODE_DIR / "generate.js"
NODE = shutil.which("node")

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not installed; the Node.js client test needs it"),
    pytest.mark.skipif(
        not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir(),
        reason="client/node/node_modules is missing: run `npm ci --prefix client/node`",
    ),
]


@pytest.fixture(scope="module")
def server():
    with running_server() as service:
        yield service


def run_node(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [NODE, str(SCRIPT), *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_node_client_streams_the_same_completion(server):
    with Client(address(server), timeout=120) as c:
        expected = c.complete("The weather today", temperature=0.0, max_tokens=8, seed=7)
    done = run_node(
        "--target",
        address(server),
        "--temperature",
        "0",
        "--max-tokens",
        "8",
        "--seed",
        "7",
        "The weather today",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected.text + "\n"
    assert "[length: " in done.stderr and "8 tokens]" in done.stderr


def test_node_client_json_lines_carry_tokens_and_finish_reason(server):
    # 48 tokens: enough that the stream arrives in several messages even from a fast model.
    done = run_node("--target", address(server), "--max-tokens", "48", "--ignore-eos", "--json", "Hello")
    assert done.returncode == 0, done.stderr
    messages = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(messages) >= 2
    assert sum(len(m["token_ids"]) for m in messages) == 48
    assert messages[-1]["finish_reason"] == "FINISH_REASON_LENGTH"
    assert messages[-1]["usage"]["completion_tokens"] == 48
    assert all(m["finish_reason"] == "FINISH_REASON_UNSPECIFIED" for m in messages[:-1])


def test_node_client_reports_server_errors(server):
    done = run_node("--target", address(server), "--top-p", "1.5", "Hello")
    assert done.returncode == 1
    assert "INVALID_ARGUMENT" in done.stderr and "top_p" in done.stderr
