"""bench/raw_limit.py: reading llama-batched-bench's table and turning it into a serving limit."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import raw_limit  # noqa: E402

TABLE = """
main: n_kv_max = 16384, n_batch = 2048, n_ubatch = 512, flash_attn = 1, is_pp_shared = 0, n_gpu_layers = -1

|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|   200 |    128 |    1 |    328 |    0.650 |   307.69 |    1.120 |   114.29 |    1.770 |   185.31 |
|   200 |    128 |   16 |   5248 |   10.700 |   299.07 |   11.500 |   178.09 |   22.200 |   236.40 |

llama_perf_context_print:        load time =      95.12 ms
"""


def test_parse_reads_every_row_and_skips_the_rest():
    rows = raw_limit.parse(TABLE)
    assert [r.batch for r in rows] == [1, 16]
    assert rows[1].t_pp == pytest.approx(10.7) and rows[1].s_tg == pytest.approx(178.09)


def test_limit_is_output_tokens_over_prefill_plus_decode_time():
    row = raw_limit.parse(TABLE)[1]
    # 16 clients x 128 tokens in 22.2 s of llama.cpp's own compute
    assert row.output_tok_s == pytest.approx(16 * 128 / 22.2)
