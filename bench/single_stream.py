"""One stream, one prompt: Parley's API against a direct llama-cpp-python call.

    .venv/bin/python bench/single_stream.py [--model models/X.gguf] [--tokens 128] [--runs 3]

Both decode the same prompt greedily with EOS banned so lengths match, with
the same thread count. Decode speed counts tokens after the first one over the
time after the first one (prompt processing excluded), medians over runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import DEFAULT_MODEL, Server, make_servers  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def parley_decode(base: str, n: int) -> float:
    body = {"prompt": PROMPT, "max_tokens": n, "temperature": 0, "stream": True, "ignore_eos": True}
    times: list[float] = []
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                times.append(time.perf_counter())
    return (len(times) - 1) / (times[-1] - times[0])


def direct_decode(model: Path, n: int, threads: int) -> float:
    from llama_cpp import Llama

    llm = Llama(str(model), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    eos = {llm.token_eos(), 0, 2}
    times: list[float] = []
    for _ in llm.create_completion(PROMPT, max_tokens=n, temperature=0, stream=True,
                                   logit_bias={t: -100.0 for t in eos}):
        times.append(time.perf_counter())
    return (len(times) - 1) / (times[-1] - times[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="parley-single-"))
    srv: Server = make_servers(args.model, args.threads, 16, 16384, ["parley"], tmp)[0]
    srv.start(tmp)
    try:
        api = [parley_decode(srv.base, args.tokens) for _ in range(args.runs)]
    finally:
        srv.stop()
    direct = [direct_decode(args.model, args.tokens, args.threads) for _ in range(args.runs)]
    a, d = statistics.median(api), statistics.median(direct)
    print(f"single stream decode, {args.tokens} tokens, {args.threads} threads, median of {args.runs}:")
    print(f"  Parley API (streaming /v1/completions): {a:.1f} tok/s")
    print(f"  llama-cpp-python direct (Llama.create_completion): {d:.1f} tok/s")
    print(f"  ratio Parley/direct: {a / d:.2f}x")


if __name__ == "__main__":
    main()
