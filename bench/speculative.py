"""Speculative decoding: tokens/s with and without drafting, on a copy task and a free-writing task, same run.

    .venv/bin/python bench/speculative.py [--model models/X.gguf] [--tokens 160] [--runs 3] [--draft-max 8]
                                          [--concurrency 1 4]

Loads Parley's llama.cpp engine three times in this process (no drafting, n-gram
lookup, and the model as its own draft), all at once, and times them in turn
within each run (order flipping every run), so that a machine drifting in speed
shifts all three alike. Each engine runs two prompts greedily:
copying a paragraph (where guesses land) and writing a story (where they mostly
do not), at each concurrency (that many identical requests at once). It reports
aggregate generated tokens/s (prompt cached by a warm-up round), the speed-up
over no drafting (median of per-run ratios) and the acceptance rate. Outputs are checked to be identical.
Drafting should never be slower than no drafting: the engine turns guessing
down when it does not pay (draft_policy.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.base import GenerationRequest, LoadOptions, TextDelta, Usage  # noqa: E402
from backends.llamacpp.engine import LlamaCppEngine  # noqa: E402
from backends.sampling import SamplingParams  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PARAGRAPH = (
    "The harbour master keeps a ledger of every ship that enters the bay, noting its name, its cargo, the hour "
    "it docked and the berth it was given. When the fog rolls in from the north, he lights the second lamp on "
    "the pier and rings the bell twice, so that the fishing boats coming home can find the channel between the "
    "rocks. In winter the ledger fills slowly, and he spends the evenings mending nets for the families whose "
    "sons are at sea."
)
PROMPTS = {
    "copy": f"<|im_start|>user\nRepeat the following paragraph word for word.\n\n{PARAGRAPH}<|im_end|>\n"
    "<|im_start|>assistant\n",
    "story": "<|im_start|>user\nWrite a short story about a lighthouse keeper who finds a strange map.<|im_end|>\n"
    "<|im_start|>assistant\n",
}


MODES = ("none", "ngram", "model")


async def load(model: Path, mode: str, draft_max: int, threads: int, slots: int) -> LlamaCppEngine:
    options = LoadOptions(
        max_seq_len=2048, max_batch_size=slots, n_threads=threads, draft_mode=mode,
        draft_max_tokens=draft_max, draft_model_path=str(model) if mode == "model" else None,
    )
    return await asyncio.to_thread(LlamaCppEngine.load, model, mode, options)


async def one(engine: LlamaCppEngine, prompt: list[int], tokens: int) -> tuple[str, Usage]:
    out: list[str] = []
    usage = Usage()
    async for ev in engine.generate(GenerationRequest(list(prompt), SamplingParams(temperature=0.0,
                                                                                   max_tokens=tokens))):
        if isinstance(ev, TextDelta):
            out.append(ev.text)
        else:
            usage = ev.usage
    return "".join(out), usage


async def measure(model: Path, tokens: int, runs: int, draft_max: int, threads: int,
                  concurrency: list[int]) -> dict[tuple[str, int], dict[str, dict[str, object]]]:
    """Every engine loaded at once; each run times all of them in turn (order flipping every run), so a
    machine drifting in speed shifts them alike. Speed-ups are medians of the per-run ratios."""
    engines = {mode: await load(model, mode, draft_max, threads, max(concurrency)) for mode in MODES}
    results: dict[tuple[str, int], dict[str, dict[str, object]]] = {}
    try:
        for task, text in PROMPTS.items():
            prompt = engines["none"].tokenize(text, add_bos=False, special=True)
            for c in concurrency:
                speeds: dict[str, list[float]] = {m: [] for m in MODES}
                drafted = dict.fromkeys(MODES, 0)
                accepted = dict.fromkeys(MODES, 0)
                got: dict[str, list[tuple[str, Usage]]] = {}
                for run in range(runs + 1):  # the first run warms the prompt cache and the policies
                    for mode in (MODES if run % 2 else MODES[::-1]):
                        t0 = time.perf_counter()
                        got[mode] = list(await asyncio.gather(*(one(engines[mode], prompt, tokens)
                                                                for _ in range(c))))
                        elapsed = time.perf_counter() - t0
                        if run:
                            speeds[mode].append(sum(u.completion_tokens for _, u in got[mode]) / elapsed)
                            drafted[mode] += sum(u.draft_tokens for _, u in got[mode])
                            accepted[mode] += sum(u.accepted_draft_tokens for _, u in got[mode])
                results[(task, c)] = {
                    mode: {
                        "tok_s": statistics.median(speeds[mode]),
                        "ratio": statistics.median(s / b for s, b in zip(speeds[mode], speeds["none"])),
                        "ratios": [s / b for s, b in zip(speeds[mode], speeds["none"])],
                        "text": got[mode][0][0],
                        "acceptance": accepted[mode] / drafted[mode] if drafted[mode] else None,
                        "drafted": drafted[mode],
                        "tokens": got[mode][0][1].completion_tokens,
                    }
                    for mode in MODES
                }
    finally:
        for engine in engines.values():
            await engine.close()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--draft-max", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    args = ap.parse_args()
    results = asyncio.run(measure(args.model, args.tokens, args.runs, args.draft_max, args.threads,
                                  args.concurrency))
    print(f"greedy, up to {args.tokens} tokens, {args.threads} threads, aggregate tok/s, median of {args.runs} "
          "runs; speed-up = median of per-run ratios to no drafting (all engines loaded, timed in turn):")
    for (task, c), by_mode in results.items():
        base = by_mode["none"]
        print(f"  {task} task, concurrency {c}:")
        for mode, r in by_mode.items():
            acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.0%} of {r['drafted']}"
            same = "same output" if r["text"] == base["text"] else "OUTPUT DIFFERS"
            runs = "/".join(f"{x:.2f}" for x in r["ratios"])  # type: ignore[attr-defined]
            print(
                f"    draft {mode:5}: {r['tok_s']:6.1f} tok/s  speed-up {r['ratio']:.2f}x ({runs})  "
                f"acceptance {acc:>10}  {r['tokens']} tokens  {same}"
            )

if __name__ == "__main__":
    main()
