"""Gateway benchmark: what Parley costs in front of another server, and what prefix affinity buys.

    .venv/bin/python bench/gateway.py [--model models/X.gguf] [--requests 24] [--upstream llama-server|parley]

1. Overhead: one llama-server (or a Parley process with --upstream parley) and
   a Parley front door serving it as a remote model. The same streaming
   /v1/completions requests (greedy, EOS ignored, a fixed output length) go
   alternately straight to the upstream and through Parley, one at a time.
   Printed: TTFT and inter-token latency p50/p99 each way, and what Parley
   adds (the gateway's cost).
2. Shared prefixes over 2 replicas: requests built from a few long system
   prompts (~1,500 characters each) plus a short question, two at a time,
   through Parley with routing prefix_affinity and then least_outstanding.
   Each policy gets system prompts of its own, so neither finds the other's
   cache. Printed: TTFT p50/p99 per policy and how the requests spread.

Everything runs on loopback; run it on a quiet machine (the numbers are only
as steady as the CPU is free).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import MODEL_NAME, run_server  # noqa: E402
from tests.remote_fleet import front_door, llama_server, llama_server_binary  # noqa: E402

DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TOPICS = "orchard harbor glacier canyon meadow quarry prairie lantern compass beacon".split()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def stream_once(client: httpx.AsyncClient, url: str, body: dict, headers: dict) -> tuple[float, list[float]]:
    """(TTFT, inter-token gaps) of one streaming completion, in seconds, measured at the client. llama-server
    now and then closes a kept-alive connection after a stream: such a request is sent again (as Parley does)."""
    for _ in range(3):
        try:
            return await _stream_once(client, url, body, headers)
        except httpx.RemoteProtocolError:
            continue
    return await _stream_once(client, url, body, headers)


async def _stream_once(client: httpx.AsyncClient, url: str, body: dict, headers: dict) -> tuple[float, list[float]]:
    started = time.perf_counter()
    stamps: list[float] = []
    lines: list[str] = []
    async with client.stream("POST", url, json=body, headers=headers) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            lines.append(line)
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            data = json.loads(line[5:])
            choices = data.get("choices") or ()
            if choices and (choices[0].get("text") or ""):
                stamps.append(time.perf_counter())
    if not stamps:
        raise RuntimeError(f"no text came back from {url}: {lines[-4:]}")
    return stamps[0] - started, [b - a for a, b in zip(stamps, stamps[1:])]


async def overhead(direct: str, direct_headers: dict, front: str, front_headers: dict, model_direct: str,
                   n: int, max_tokens: int) -> dict[str, dict[str, list[float]]]:
    out = {"direct": {"ttft": [], "itl": []}, "parley": {"ttft": [], "itl": []}}
    async with httpx.AsyncClient(timeout=300) as client:
        for i in range(n + 2):
            ways = [("direct", direct, direct_headers, model_direct), ("parley", front, front_headers, "up")]
            for way, url, headers, model in ways if i % 2 else ways[::-1]:  # alternate who goes first
                # A prompt of its own per way and round, so neither finds the other's prompt cached.
                prompt = f"Note {i}{way[0]}: a short story about the {TOPICS[i % len(TOPICS)]}. Once upon a time"
                body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                        "stream": True, "ignore_eos": True}
                ttft, gaps = await stream_once(client, url + "/v1/completions", body, headers)
                if i >= 2:  # two warm-up rounds
                    out[way]["ttft"].append(ttft)
                    out[way]["itl"].extend(gaps)
    return out


def system_prompt(tag: str, k: int) -> str:
    rng = random.Random(f"{tag}-{k}")
    words = " ".join(rng.choice(TOPICS) for _ in range(220))
    return f"[{tag} shop {k}] You are the assistant of a shop. Inventory notes: {words}."


async def shared_prefix(front: str, headers: dict, model: str, tag: str, n: int) -> list[float]:
    systems = [system_prompt(tag, k) for k in range(4)]
    rng = random.Random(tag)
    order = [systems[rng.randrange(len(systems))] for _ in range(n)]
    ttfts: list[float] = []
    async with httpx.AsyncClient(timeout=300) as client:
        async def one(i: int) -> None:
            body = {"model": model, "prompt": f"{order[i]}\nQ: question {i}?\nA:", "max_tokens": 4,
                    "temperature": 0, "stream": True, "ignore_eos": True}
            ttft, _ = await stream_once(client, front + "/v1/completions", body, headers)
            ttfts.append(ttft)

        for i in range(0, n, 2):  # two at a time
            await asyncio.gather(*(one(j) for j in range(i, min(i + 2, n))))
    return ttfts


def replica_requests(front: str, headers: dict, model: str) -> dict[str, float]:
    text = httpx.get(front + "/metrics", headers=headers, timeout=10).text
    found = re.findall(rf'^parley_replica_requests_total{{model="{model}",replica="([^"]+)"}} ([0-9.e+]+)$', text, re.M)
    return {url: float(v) for url, v in found}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ms(x: float) -> str:
    return f"{x * 1000:7.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--upstream", choices=("llama-server", "parley"),
                    default="llama-server" if llama_server_binary() else "parley")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    model_dir = tmp / "models"
    model_dir.mkdir()
    (model_dir / args.model.name).symlink_to(args.model.resolve())
    print(f"upstream: {args.upstream}; model {args.model.name}; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.1f} at start")

    with ExitStack() as stack:
        def upstream(name: str) -> tuple[str, dict, str, str]:
            """(base URL, headers, model name, server kind) of one new upstream."""
            if args.upstream == "llama-server":
                base = stack.enter_context(llama_server(args.model, tmp / name, slots=2))
                return base, {}, args.model.stem, "llamacpp"
            (tmp / name).mkdir()
            if (tmp / "up1" / "api_tokens.yml").exists():  # one key for every upstream
                shutil.copy(tmp / "up1" / "api_tokens.yml", tmp / name / "api_tokens.yml")
            server = stack.enter_context(run_server(model_dir, MODEL_NAME, tmp / name))
            return server.base_url, server.keys.api_headers(), MODEL_NAME, "parley"

        base1, h1, name1, kind = upstream("up1")
        base2, _, _, _ = upstream("up2")
        key = h1.get("Authorization", "Bearer none").split()[-1]

        def model(name: str, replicas: list[str], routing: str) -> dict:
            return {"name": name, "kind": "openai", "server": kind, "replicas": replicas, "upstream_model": name1,
                    "api_key_env": "BENCH_UPSTREAM_KEY", "routing": routing, "affinity_prefix_chars": 400}

        (tmp / "front").mkdir()
        front = stack.enter_context(front_door(
            tmp / "front",
            [model("up", [base1], "least_outstanding"), model("aff", [base1, base2], "prefix_affinity"),
             model("lo", [base1, base2], "least_outstanding")],
            env={"BENCH_UPSTREAM_KEY": key}, limits={}))
        fh = front.keys.api_headers()

        print(f"\n1. Gateway overhead: {args.requests} streaming requests each way, {args.max_tokens} tokens, one at a time")
        cpu_before = cpu_seconds(front.proc.pid)
        res = asyncio.run(overhead(base1, h1, front.base_url, fh, name1, args.requests, args.max_tokens))
        cpu_used = cpu_seconds(front.proc.pid) - cpu_before
        print(f"{'':10} {'TTFT p50':>10} {'TTFT p99':>10} {'ITL p50':>10} {'ITL p99':>10}   (ms)")
        for way in ("direct", "parley"):
            r = res[way]
            print(f"{way:10} {ms(pct(r['ttft'], 50)):>10} {ms(pct(r['ttft'], 99)):>10} "
                  f"{ms(pct(r['itl'], 50)):>10} {ms(pct(r['itl'], 99)):>10}")
        d, p = res["direct"], res["parley"]
        print(f"{'added':10} {ms(pct(p['ttft'], 50) - pct(d['ttft'], 50)):>10} "
              f"{ms(pct(p['ttft'], 99) - pct(d['ttft'], 99)):>10} {ms(pct(p['itl'], 50) - pct(d['itl'], 50)):>10} "
              f"{ms(pct(p['itl'], 99) - pct(d['itl'], 99)):>10}")
        tokens = (args.requests + 2) * args.max_tokens
        print(f"Parley's own CPU time: {cpu_used * 1000 / tokens:.3f} ms per streamed token, "
              f"{cpu_used * 1000 / (args.requests + 2):.1f} ms per request (whole process, all threads; "
              "a figure CPU contention does not inflate the way it inflates wall-clock latency)")

        n = max(8, args.requests)
        print(f"\n2. Shared prefixes over 2 replicas: {n} requests from 4 system prompts (~1,500 chars), 2 at a time")
        for policy, name in (("prefix_affinity", "aff"), ("least_outstanding", "lo")):
            ttfts = asyncio.run(shared_prefix(front.base_url, fh, name, policy, n))
            spread = sorted(replica_requests(front.base_url, fh, name).values())
            print(f"{policy:18} TTFT p50 {ms(pct(ttfts, 50))} ms  p99 {ms(pct(ttfts, 99))} ms  "
                  f"mean {ms(statistics.fmean(ttfts))} ms  requests per replica {spread}")
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
