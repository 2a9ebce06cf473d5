"""Cost of constrained decoding: tokens/s with and without a JSON schema, same run.

    .venv/bin/python bench/constraints.py [--model models/X.gguf] [--runs 5]

Loads the model in-process (no HTTP), decodes one sequence at a time with
and without a schema that keeps the output going (an array of up to 60
bounded integers), and prints decode tokens/s for both and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from contextlib import aclosing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.base import Finished, GenerationRequest, LoadOptions, TextDelta  # noqa: E402
from backends.llamacpp.engine import LlamaCppEngine  # noqa: E402
from common.formats.constraints import ConstraintSpec  # noqa: E402
from common.models.manager import LoadedModel  # noqa: E402
from backends.sampling import SamplingParams  # noqa: E402

SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 60, "maxItems": 60}
PROMPT = "<|im_start|>user\nList sixty numbers as a JSON array.<|im_end|>\n<|im_start|>assistant\n"


async def decode_rate(engine: LlamaCppEngine, constraint: object, n: int, seed: int) -> float:
    tokens = engine.tokenize(PROMPT, add_bos=False, special=True)
    params = SamplingParams(temperature=0.7, seed=seed, max_tokens=n, ignore_eos=constraint is None)
    stamps: list[float] = []
    async with aclosing(engine.generate(GenerationRequest(tokens, params, constraint=constraint))) as events:
        async for ev in events:
            if isinstance(ev, TextDelta):
                stamps.extend(time.perf_counter() for _ in ev.token_ids)
            elif isinstance(ev, Finished):
                break
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=120)
    args = ap.parse_args()
    engine = await asyncio.to_thread(LlamaCppEngine.load, args.model, "bench", LoadOptions(max_seq_len=1024))
    model = LoadedModel("bench", engine, None)
    compiler = await model.constraint_compiler()
    constraint = compiler.compile(ConstraintSpec.from_request(json_schema=SCHEMA))
    free, constrained = [], []
    for i in range(args.runs):  # interleaved, so drift hits both alike
        free.append(await decode_rate(engine, None, args.tokens, i))
        constrained.append(await decode_rate(engine, constraint, args.tokens, i))
    await engine.close()
    f, c = statistics.median(free), statistics.median(constrained)
    print(f"decode tokens/s, one sequence, median of {args.runs}: unconstrained {f:.1f}, JSON schema {c:.1f}, "
          f"ratio {c / f:.2f} ({(1 / c - 1 / f) * 1e3:.2f} ms per token for the mask)")


if __name__ == "__main__":
    asyncio.run(main())
