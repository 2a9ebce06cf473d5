"""transformers' continuous batching beside llama.cpp on the same model, same run: 1 and 16 streams.

    .venv/bin/python bench/engines.py [--model models/X.gguf] [--tokens 32]

Loads SmolLM2 (GGUF) in-process with the llama.cpp engine and with the
transformers engine (the GGUF de-quantized to float32), then for each engine
decodes greedily with 1 stream and with 16 concurrent streams and prints the
aggregate generated tokens/s (first token to last, prompt excluded), and
transformers' rate as a share of llama.cpp's. The engines run one after the
other, never together; on a shared machine the other tenants' load moves
every figure, so the ratio from one run is the number to read.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.base import Engine, Finished, GenerationRequest, LoadOptions, TextDelta  # noqa: E402
from backends.registry import load_engine  # noqa: E402
from backends.sampling import SamplingParams  # noqa: E402

PROMPTS = [
    f"<|im_start|>user\nTell me fact number {i} about the sea, in detail.<|im_end|>\n<|im_start|>assistant\n"
    for i in range(16)
]


async def stream(engine: Engine, text: str, n: int, stamps: list[float]) -> int:
    tokens = engine.tokenize(text, add_bos=engine.info.add_bos_token, special=True)
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    count = 0
    async for ev in engine.generate(GenerationRequest(tokens, params)):
        if isinstance(ev, TextDelta):
            stamps.extend(time.perf_counter() for _ in ev.token_ids)
            count += len(ev.token_ids)
        elif isinstance(ev, Finished):
            break
    return count


async def rate(engine: Engine, streams: int, n: int) -> float:
    stamps: list[float] = []
    t0 = time.perf_counter()
    counts = await asyncio.gather(*(stream(engine, PROMPTS[i], n, stamps) for i in range(streams)))
    stamps.sort()
    first = min(stamps) if stamps else t0
    return (sum(counts) - streams) / max(1e-9, stamps[-1] - first) if len(stamps) > streams else 0.0


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    results: dict[str, dict[int, float]] = {}
    for kind in ("llamacpp", "transformers"):
        options = LoadOptions(max_seq_len=512, cache_size=16 * 512, max_batch_size=16)
        engine = await asyncio.to_thread(load_engine, kind, args.model, f"bench-{kind}", options)
        await rate(engine, 1, 4)  # warm-up
        results[kind] = {s: await rate(engine, s, args.tokens) for s in (1, 16)}
        await engine.close()
    load = os.getloadavg()[0]
    print(f"SmolLM2-135M Q4_1, {args.tokens} tokens per stream, greedy; load average {load:.1f} "
          f"on {os.cpu_count()} CPUs (other tenants share them)")
    print(f"{'streams':>8} {'llama.cpp tok/s':>16} {'transformers tok/s':>19} {'ratio':>7}")
    for s in (1, 16):
        lc, tf = results["llamacpp"][s], results["transformers"][s]
        print(f"{s:>8} {lc:>16.1f} {tf:>19.1f} {tf / lc if lc else 0:>7.2f}")


if __name__ == "__main__":
    asyncio.run(main())
