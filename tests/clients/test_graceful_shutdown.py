"""SIGTERM drains a real server: running streams finish (or are cut after shutdown_timeout), new work is refused."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import MODEL_NAME, LiveServer, run_server


@pytest.fixture
def server_with(model_dir: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    (tmp_path / "config.yml").write_text(f"network:\n  shutdown_timeout: {request.param}\n")
    with run_server(model_dir, MODEL_NAME, tmp_path) as server:
        yield server


def stream_body(max_tokens: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "Tell me a very long story about a lighthouse."}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}


def wait_draining(server: LiveServer) -> httpx.Response:
    deadline = time.monotonic() + 30
    while True:
        r = httpx.get(server.base_url + "/health", timeout=5)
        if r.status_code == 503 or time.monotonic() > deadline:
            return r
        time.sleep(0.02)


def data_frames(lines: Iterator[str]) -> list[str]:
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


@pytest.mark.parametrize("server_with", [300], indirect=True)
def test_sigterm_refuses_new_work_while_running_streams_finish(server_with: LiveServer) -> None:
    server = server_with
    headers = {"Authorization": f"Bearer {server.keys.api}"}
    # The stream is long enough to outlast the checks below (milliseconds each), short enough to end soon.
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=300) as client, \
            client.stream("POST", "/v1/chat/completions", json=stream_body(200)) as stream:
        lines = stream.iter_lines()
        first = [next(lines) for _ in range(3)]  # the role chunk and the first tokens are out
        server.proc.send_signal(signal.SIGTERM)

        health = wait_draining(server)
        assert health.status_code == 503 and health.json()["status"] == "draining"

        chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        refused = client.post("/v1/chat/completions", json=chat)
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "server_draining"
        assert "shutting down" in refused.json()["error"]["message"]
        kobold = client.post("/api/v1/generate", json={"prompt": "Hi", "max_length": 2})
        assert kobold.status_code == 503 and kobold.json()["detail"]["type"] == "server_draining"
        ollama = client.post("/api/chat", json={"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}],
                                                "stream": False})
        assert ollama.status_code == 503 and "shutting down" in ollama.json()["error"]
        assert client.get("/v1/models").status_code == 200  # only new generations are refused

        frames = data_frames(iter(first)) + data_frames(lines)
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    assert not any("error" in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert len(text) > 200  # the whole stream arrived
    assert server.proc.wait(timeout=60) == 0


@pytest.mark.parametrize("server_with", [0.5], indirect=True)
def test_streams_outliving_the_shutdown_timeout_end_with_an_error_frame(server_with: LiveServer) -> None:
    server = server_with
    headers = {"Authorization": f"Bearer {server.keys.api}"}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=300) as client, \
            client.stream("POST", "/v1/chat/completions", json=stream_body(1600)) as stream:
        lines = stream.iter_lines()
        first = [next(lines) for _ in range(3)]
        server.proc.send_signal(signal.SIGTERM)
        frames = data_frames(iter(first)) + data_frames(lines)
    assert frames[-1] == "[DONE]"
    error = json.loads(frames[-2])["error"]
    assert error["type"] == "server_error" and "shutting down" in error["message"]
    generated = [json.loads(f) for f in frames[:-2]]
    assert all("error" not in c for c in generated)
    assert all(c["choices"][0]["finish_reason"] is None for c in generated)  # cut, not finished
    assert server.proc.wait(timeout=60) == 0  # the process exits on its own, in bounded time
