"""The physical limit of a serving workload: llama.cpp's own `llama-batched-bench` on the same model and shapes.

For a closed loop of B clients, each sending a P-token prompt and reading G
tokens, no server can beat the time llama.cpp itself needs to prefill B*P
tokens and then decode G steps of B sequences. `llama-batched-bench` measures
exactly those two times (T_PP and T_TG) for each B, so the limit in output
tokens/s is B*G / (T_PP + T_TG), and a server's figure divided by it is the
fraction of the machine it uses. Prefill tokens/s (S_PP at B=1) bounds cold
TTFT the same way.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from harness import llama_cpp_tool


@dataclass(frozen=True)
class LimitRow:
    batch: int
    prompt_tokens: int
    gen_tokens: int
    t_pp: float  # seconds to prefill batch * prompt_tokens
    s_pp: float  # prefill tokens/s
    t_tg: float  # seconds to decode gen_tokens steps at this batch
    s_tg: float  # decode tokens/s

    @property
    def output_tok_s(self) -> float:
        """The best aggregate output rate a server can reach on this workload at this concurrency."""
        return self.batch * self.gen_tokens / (self.t_pp + self.t_tg)


def parse(text: str) -> list[LimitRow]:
    """Rows of llama-batched-bench's markdown table: |PP|TG|B|N_KV|T_PP s|S_PP t/s|T_TG s|S_TG t/s|T s|S t/s|."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 8 or not re.fullmatch(r"\d+", cells[0]):
            continue
        pp, tg, b = int(cells[0]), int(cells[1]), int(cells[2])
        rows.append(LimitRow(b, pp, tg, float(cells[4]), float(cells[5]), float(cells[6]), float(cells[7])))
    return rows


def measure(model: Path, threads: int, ctx: int, prompt_tokens: int, gen_tokens: int,
            batches: list[int]) -> dict[int, LimitRow]:
    """Run llama-batched-bench once for all batch sizes, with the servers' thread count and a unified KV cache."""
    argv = [str(llama_cpp_tool("llama-batched-bench")), "-m", str(model), "-c", str(ctx), "-b", "2048", "-ub", "512",
            "-npp", str(prompt_tokens), "-ntg", str(gen_tokens), "-npl", ",".join(map(str, batches)),
            "-t", str(threads), "-tb", str(threads), "--kv-unified", "-fa", "on"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"llama-batched-bench failed ({done.returncode}): {done.stderr[-2000:]}")
    return {row.batch: row for row in parse(done.stdout + done.stderr)}
