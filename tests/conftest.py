"""Shared fixtures: the real SmolLM2 model, configs, in-process apps and a live server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parent.parent
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1"


@pytest.fixture(scope="session")
def model_path() -> Path:
    path = ROOT / "models" / MODEL_FILE
    if not path.exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "fetch_default_model.py"), str(path.parent)], check=True)
    return path


@pytest.fixture(scope="session")
def model_dir(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private model directory holding (a link to) the real model only."""
    d = tmp_path_factory.mktemp("models")
    (d / MODEL_FILE).symlink_to(model_path)
    return d


def make_config(tmp: Path, model_dir: Path, **sections: dict[str, Any]) -> Any:
    from common.config.loader import load_config

    overrides: dict[str, dict[str, Any]] = {
        "network": {"api_tokens_file": str(tmp / "api_tokens.yml")},
        "model": {"model_dir": str(model_dir), "model_name": MODEL_NAME, "max_seq_len": 2048},
        "store": {"data_dir": str(tmp / "data")},
    }
    for section, values in sections.items():
        overrides.setdefault(section, {}).update(values)
    empty = tmp / "config.yml"
    empty.touch()
    return load_config(config_path=empty, environ={}, cli_overrides=overrides)


def wait_loaded(client: TestClient, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/health").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError("the model did not load in time")


class Keys:
    def __init__(self, tokens_file: Path) -> None:
        from ruamel.yaml import YAML

        data = YAML(typ="safe").load(tokens_file.read_text())
        api = data["api_key"]
        self.api = api[0] if isinstance(api, list) else api
        self.admin = data["admin_key"]

    def api_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api}"}

    def admin_headers(self) -> dict[str, str]:
        return {"X-Admin-Key": self.admin}


@pytest.fixture(scope="module")
def app_env(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Keys]]:
    """One in-process app with the real model for a test module, with auth on."""
    from endpoints.app import create_app

    tmp = tmp_path_factory.mktemp("app")
    config = make_config(tmp, model_dir)
    app = create_app(config)
    with TestClient(app) as client:
        wait_loaded(client)
        yield client, Keys(tmp / "api_tokens.yml")


@pytest.fixture(scope="module")
def client(app_env: tuple[TestClient, Keys]) -> TestClient:
    """The module's app with the admin key sent by default."""
    c, keys = app_env
    c.headers.update({"Authorization": f"Bearer {keys.admin}"})
    return c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, base_url: str, proc: subprocess.Popen[bytes], keys: Keys) -> None:
        self.base_url = base_url
        self.proc = proc
        self.keys = keys


@contextmanager
def run_server(
    model_dir: Path, model_name: str, tmp: Path, max_seq_len: int = 2048, extra_args: tuple[str, ...] = (),
) -> Iterator[LiveServer]:
    """Parley started as users start it (python main.py), on a free port; stopped on exit.
    `extra_args` go to main.py after the others (e.g. ("--url", "postgresql://...") for the store)."""
    port = free_port()
    (tmp / "config.yml").touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
    log_path = tmp / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable, str(ROOT / "main.py"),
                "--host", "127.0.0.1", "--port", str(port),
                "--model-dir", str(model_dir), "--model-name", model_name,
                "--max-seq-len", str(max_seq_len),
                "--api-tokens-file", str(tmp / "api_tokens.yml"),
                "--config", str(tmp / "config.yml"),
                *extra_args,
            ],
            cwd=tmp, stdout=log, stderr=subprocess.STDOUT, env=env,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 90
            while True:
                if proc.poll() is not None:
                    raise AssertionError(f"server exited: {log_path.read_text()[-3000:]}")
                try:
                    if httpx.get(base + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"server did not become healthy: {log_path.read_text()[-3000:]}")
                time.sleep(0.1)
            yield LiveServer(base, proc, Keys(tmp / "api_tokens.yml"))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="session")
def live_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("live")
    with run_server(model_dir, MODEL_NAME, tmp) as server:
        yield server
    shutil.rmtree(tmp, ignore_errors=True)
