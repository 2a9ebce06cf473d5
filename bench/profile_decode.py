"""Where the Python time goes per generated token at batch 16, measured without trusting the clock.

    .venv/bin/python bench/profile_decode.py [--streams 16] [--tokens 256] [--threads 1] [--top 25]

Drives Parley's llama.cpp engine in process: `--streams` concurrent requests
with ~20-token prompts, `--tokens` output tokens each (temperature 0.8, fixed
seeds, EOS ignored). Both the scheduler thread and the event loop run under
cProfile. It prints the functions with the most own time on each side, and
calls per generated token, which do not depend on how busy the machine is.
Time shares are taken over Python's own work: `llama_decode` is reported apart.

For instruction counts, which stay put under load, run it under
`perf stat -e instructions:u` or `perf record -e instructions:u` with
`--threads 1` (no spinning worker threads) and compare the interpreter's share.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llama_cpp as lc  # noqa: E402

from backends.base import GenerationRequest, LoadOptions  # noqa: E402
from backends.llamacpp import scheduler as scheduler_module  # noqa: E402
from backends.llamacpp.engine import LlamaCppEngine  # noqa: E402
from backends.sampling import SamplingParams  # noqa: E402

NATIVE = ("llama_decode", "llama_sampler_sample")
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TOPICS = ("rivers", "bread", "clocks", "owls", "glass", "maps", "tides", "bees",
          "salt", "bridges", "lamps", "kites", "moss", "wool", "bells", "ink")


def report(prof: cProfile.Profile, title: str, tokens: int, top: int) -> None:
    stats = pstats.Stats(prof)
    rows = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for (_, _, tt, _, _) in rows.values())
    native = {k: v for k, v in rows.items() if k[2] in NATIVE}
    native_tt = sum(v[2] for v in native.values())
    py_total = total - native_tt
    print(f"\n== {title}: {tokens} tokens; own time {total:.2f}s, of which llama_decode + native sampling "
          f"{native_tt:.2f}s, idle waits included below")
    ranked = sorted(rows.items(), key=lambda kv: kv[1][2], reverse=True)
    print(f"{'calls/tok':>9} {'share':>6} {'cum%':>6}  function")
    for (file, line, name), (_, nc, tt, ct, _) in ranked:
        if name in NATIVE:
            continue
        if top <= 0:
            break
        top -= 1
        where = f"{Path(file).name}:{line}" if line else file
        print(f"{nc / tokens:9.2f} {tt / py_total:6.1%} {ct / py_total:6.1%}  {name} ({where})")


async def drive(args: argparse.Namespace) -> None:
    options = LoadOptions(max_seq_len=args.streams * (args.tokens + 64), max_batch_size=args.streams, n_threads=args.threads,
                          draft_mode=args.draft, draft_max_tokens=8)
    engine = await asyncio.to_thread(LlamaCppEngine.load, args.model, "bench", options)
    try:
        prompts = [engine.tokenize(f"<|im_start|>user\nWrite a long story about {TOPICS[i % 16]} "
                                   f"and the people who love them.<|im_end|>\n<|im_start|>assistant\n",
                                   add_bos=False, special=True) for i in range(args.streams)]

        async def one(i: int) -> int:
            params = SamplingParams(temperature=0.8, max_tokens=args.tokens, ignore_eos=True, seed=1000 + i,
                                    top_k=args.top_k)
            n = 0
            async for ev in engine.generate(GenerationRequest(list(prompts[i]), params)):
                n = getattr(getattr(ev, "usage", None), "completion_tokens", n)
            return n

        loop_prof = cProfile.Profile(time.thread_time)
        loop_cpu = time.thread_time()
        if not args.no_profile:
            loop_prof.enable()
        counts = await asyncio.gather(*(one(i) for i in range(args.streams)))
        loop_cpu = time.thread_time() - loop_cpu
        loop_prof.disable()
    finally:
        await engine.close()
    tokens = sum(counts)
    print(f"{args.streams} streams, {tokens} tokens generated")
    if args.no_profile:
        other = CPU["run"] - CPU["llama_decode"] - CPU["llama_sampler_sample"]
        print(f"CPU time per token (thread clocks, not wall): scheduler thread {1e6 * CPU['run'] / tokens:.0f} us "
              f"= llama_decode {1e6 * CPU['llama_decode'] / tokens:.0f} + native sampling "
              f"{1e6 * CPU['llama_sampler_sample'] / tokens:.0f} + Python and the rest {1e6 * other / tokens:.1f}; "
              f"event loop {1e6 * loop_cpu / tokens:.1f} us")
        return
    report(SCHED_PROF, "scheduler thread", tokens, args.top)
    report(loop_prof, "event loop", tokens, args.top)
    if args.dump:
        SCHED_PROF.dump_stats(args.dump)


SCHED_PROF = cProfile.Profile(time.thread_time)
CPU = {"run": 0.0, "llama_decode": 0.0, "llama_sampler_sample": 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--draft", default="none")
    ap.add_argument("--top-k", type=int, default=0, help="40 is llama-server's default (0: the whole vocabulary)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--no-profile", action="store_true", help="run the workload only (for perf stat/record)")
    ap.add_argument("--dump", default="", help="write the scheduler thread's pstats here")
    args = ap.parse_args()
    run_pass = scheduler_module.Scheduler.run_pass

    def profiled(self: scheduler_module.Scheduler) -> bool:
        # the engine's scheduler runs one pass at a time on the shared compute thread: profile each pass
        t0 = time.thread_time()
        alive = run_pass(self) if args.no_profile else SCHED_PROF.runcall(run_pass, self)
        CPU["run"] += time.thread_time() - t0
        return alive

    scheduler_module.Scheduler.run_pass = profiled  # type: ignore[method-assign]
    # ctypes calls are invisible to cProfile: wrap the two native calls that do the model's work.
    decode, sample = lc.llama_decode, lc.llama_sampler_sample

    def llama_decode(ctx: object, batch: object) -> int:
        t0 = time.thread_time()
        rc = decode(ctx, batch)
        CPU["llama_decode"] += time.thread_time() - t0
        return rc

    def llama_sampler_sample(smpl: object, ctx: object, idx: int) -> int:
        t0 = time.thread_time()
        token = sample(smpl, ctx, idx)
        CPU["llama_sampler_sample"] += time.thread_time() - t0
        return token

    lc.llama_decode, lc.llama_sampler_sample = llama_decode, llama_sampler_sample
    asyncio.run(drive(args))


if __name__ == "__main__":
    main()
