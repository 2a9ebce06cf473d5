"""Speculative decoding: tokens/s with and without drafting, on a copy task and a free-writing task, same run.

    .venv/bin/python bench/speculative.py [--model models/X.gguf] [--tokens 160] [--runs 3] [--draft-max 8]
                                          [--concurrency 1 4]

Loads Parley's llama.cpp engine three times in this process (no drafting, n-gram
lookup, and the model as its own draft). Each engine runs two prompts greedily:
copying a paragraph (where guesses land) and writing a story (where they mostly
do not), at each concurrency (that many identical requests at once). It reports
aggregate generated tokens/s (prompt cached by a warm-up round), the speed-up
over no drafting and the acceptance rate. Outputs are checked to be identical.
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


async def measure(model: Path, mode: str, tokens: int, runs: int, draft_max: int, threads: int,
                  concurrency: list[int]) -> dict[tuple[str, int], dict[str, object]]:
    options = LoadOptions(
        max_seq_len=2048, max_batch_size=max(concurrency), n_threads=threads, draft_mode=mode,
        draft_max_tokens=draft_max, draft_model_path=str(model) if mode == "model" else None,
    )
    engine = await asyncio.to_thread(LlamaCppEngine.load, model, mode, options)
    params = SamplingParams(temperature=0.0, max_tokens=tokens)

    async def one(prompt: list[int]) -> tuple[str, Usage]:
        out: list[str] = []
        async for ev in engine.generate(GenerationRequest(list(prompt), params)):
            if isinstance(ev, TextDelta):
                out.append(ev.text)
            else:
                usage = ev.usage
        return "".join(out), usage

    results: dict[tuple[str, int], dict[str, object]] = {}
    try:
        for task, text in PROMPTS.items():
            prompt = engine.tokenize(text, add_bos=False, special=True)
            for c in concurrency:
                speeds, drafted, accepted = [], 0, 0
                for _ in range(runs + 1):  # the first run warms the prompt cache
                    t0 = time.perf_counter()
                    got = await asyncio.gather(*(one(prompt) for _ in range(c)))
                    elapsed = time.perf_counter() - t0
                    speeds.append(sum(u.completion_tokens for _, u in got) / elapsed)
                    drafted += sum(u.draft_tokens for _, u in got)
                    accepted += sum(u.accepted_draft_tokens for _, u in got)
                results[(task, c)] = {
                    "tok_s": statistics.median(speeds[1:]),
                    "text": got[0][0],
                    "acceptance": accepted / drafted if drafted else None,
                    "drafted": drafted,
                    "tokens": got[0][1].completion_tokens,
                }
    finally:
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
    results = {
        mode: asyncio.run(
            measure(args.model, mode, args.tokens, args.runs, args.draft_max, args.threads, args.concurrency)
        )
        for mode in ("none", "ngram", "model")
    }
    print(f"greedy, up to {args.tokens} tokens, {args.threads} threads, aggregate tok/s, median of {args.runs}:")
    for key, base in results["none"].items():
        task, c = key
        print(f"  {task} task, concurrency {c}:")
        for mode, by_key in results.items():
            r = by_key[key]
            acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.0%} of {r['drafted']}"
            same = "same output" if r["text"] == base["text"] else "OUTPUT DIFFERS"
            print(
                f"    draft {mode:5}: {r['tok_s']:6.1f} tok/s  speed-up {r['tok_s'] / base['tok_s']:.2f}x  "
                f"acceptance {acc:>10}  {r['tokens']} tokens  {same}"
            )


if __name__ == "__main__":
    main()
