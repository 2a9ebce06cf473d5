"""Speculative decoding: tokens/s with and without drafting on an input-copying task, same run.

    .venv/bin/python bench/speculative.py [--model models/X.gguf] [--tokens 160] [--runs 3] [--draft-max 8]

Loads Parley's llama.cpp engine three times in this process (no drafting, n-gram
lookup, and the model as its own draft), asks each to copy a paragraph
greedily, and reports decode tokens/s (after the first token), the speed-up
over no drafting and the acceptance rate. Outputs are checked to be identical.
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

from backends.base import GenerationRequest, LoadOptions, TextDelta  # noqa: E402
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
PROMPT = (
    f"<|im_start|>user\nRepeat the following paragraph word for word.\n\n{PARAGRAPH}<|im_end|>\n"
    "<|im_start|>assistant\n"
)


async def measure(model: Path, mode: str, tokens: int, runs: int, draft_max: int, threads: int) -> dict[str, object]:
    options = LoadOptions(
        max_seq_len=2048, max_batch_size=4, n_threads=threads, draft_mode=mode, draft_max_tokens=draft_max,
        draft_model_path=str(model) if mode == "model" else None,
    )
    engine = await asyncio.to_thread(LlamaCppEngine.load, model, mode, options)
    prompt = engine.tokenize(PROMPT, add_bos=False, special=True)
    params = SamplingParams(temperature=0.0, max_tokens=tokens)
    speeds, texts, drafted, accepted = [], [], 0, 0
    try:
        for _ in range(runs + 1):  # the first run warms the prompt cache
            stamps: list[float] = []
            out: list[str] = []
            async for ev in engine.generate(GenerationRequest(list(prompt), params)):
                if isinstance(ev, TextDelta):
                    stamps.extend([time.perf_counter()] * max(1, len(ev.token_ids)))
                    out.append(ev.text)
                else:
                    usage = ev.usage
            speeds.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
            texts.append("".join(out))
            drafted += usage.draft_tokens
            accepted += usage.accepted_draft_tokens
    finally:
        await engine.close()
    return {
        "tok_s": statistics.median(speeds[1:]),
        "text": texts[-1],
        "acceptance": accepted / drafted if drafted else None,
        "tokens": usage.completion_tokens,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--draft-max", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    results = {
        mode: asyncio.run(measure(args.model, mode, args.tokens, args.runs, args.draft_max, args.threads))
        for mode in ("none", "ngram", "model")
    }
    base = results["none"]
    print(f"copy task, greedy, up to {args.tokens} tokens, {args.threads} threads, median of {args.runs}:")
    for mode, r in results.items():
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.0%}"
        same = "same output" if r["text"] == base["text"] else "OUTPUT DIFFERS"
        print(
            f"  draft {mode:5}: {r['tok_s']:6.1f} tok/s  speed-up {r['tok_s'] / base['tok_s']:.2f}x  "
            f"acceptance {acc:>4}  {r['tokens']} tokens  {same}"
        )


if __name__ == "__main__":
    main()
