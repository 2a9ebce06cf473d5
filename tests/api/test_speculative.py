"""Speculative decoding on the real model: n-gram lookup and a draft model (the model itself).

Equivalence is checked one request at a time: with several sequences in the
unified KV cache, rejected guesses leave holes that later tokens fill, which
changes the order attention sums over cells and can flip a near-tie token by
float rounding (the same holds for plain batching when sequences end and free
cells). The concurrent test checks completion and cache bookkeeping instead.
Even alone, checking guesses decodes several tokens per pass where plain
decoding does one, so outputs are compared up to the first near-tie that came
out differently (tests/neartie.py), not exactly.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from backends.base import Finished, GenerationRequest, LoadOptions, TextDelta
from backends.llamacpp.engine import LlamaCppEngine
from backends.sampling import SamplingParams
from tests.conftest import MODEL_NAME, Keys, make_config, wait_loaded
from tests.neartie import Step, assert_agree, steps_from_engine

COPY = (
    "<|im_start|>user\nCopy this text exactly: The harbour master keeps a ledger of every ship that enters "
    "the bay, noting its name, its cargo, the hour it docked and the berth it was given.<|im_end|>\n"
    "<|im_start|>assistant\nThe harbour master keeps a ledger"
)
PROMPTS = [
    COPY,
    "<|im_start|>user\nName three colours of the rainbow.<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a small village by the sea,",
]


async def _run(engine: LlamaCppEngine, text: str, params: SamplingParams) -> tuple[str, Finished]:
    out, _, finish = await _run_steps(engine, text, params)
    return out, finish


async def _run_steps(engine: LlamaCppEngine, text: str, params: SamplingParams) -> tuple[str, list[Step], Finished]:
    tokens = engine.tokenize(text, add_bos=False, special=True)
    out: list[str] = []
    logprobs = []
    finish = None
    async for ev in engine.generate(GenerationRequest(tokens, params)):
        if isinstance(ev, TextDelta):
            out.append(ev.text)
            logprobs.extend(ev.logprobs)
        else:
            finish = ev
    assert finish is not None
    return "".join(out), steps_from_engine(logprobs), finish


Output = tuple[list[Step], Finished]


def _outputs(model_path: Path, params: SamplingParams, **draft: object) -> list[Output]:
    async def main() -> list[Output]:
        options = LoadOptions(max_seq_len=1024, max_batch_size=4, n_threads=2, **draft)  # type: ignore[arg-type]
        engine = await asyncio.to_thread(LlamaCppEngine.load, model_path, "m", options)
        try:
            results = []
            for text in PROMPTS:
                await _run(engine, text, params)  # the compared run starts from a cached prompt, as plain runs do
                _, steps, finish = await _run_steps(engine, text, params)
                results.append((steps, finish))
            engine.check_consistency()
            return results
        finally:
            await engine.close()

    return asyncio.run(main())


GREEDY = SamplingParams(temperature=0.0, max_tokens=48, logprobs=2)
# Sampled: a difference is accepted only where both runs had the same distribution (weaker than greedy).
SEEDED = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=48, logprobs=20)


@pytest.fixture(scope="module")
def plain(model_path: Path) -> dict[str, list[Output]]:
    return {"greedy": _outputs(model_path, GREEDY), "seeded": _outputs(model_path, SEEDED)}


def _assert_plain_output(spec: list[Output], plain: list[Output], *, sampled: bool) -> None:
    for prompt, (s, _), (p, _) in zip(PROMPTS, spec, plain, strict=True):
        assert_agree(s, p, sampled=sampled, label=f"{prompt[-40:]!r} speculative vs plain")


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_ngram_drafting_gives_the_plain_output(model_path: Path, plain, kind: str) -> None:
    params = GREEDY if kind == "greedy" else SEEDED
    # Guessing at full length every step: batch shapes (and so rounding) then do not depend on step timings.
    spec = _outputs(model_path, params, draft_mode="ngram", draft_max_tokens=6, draft_adaptive=False)
    _assert_plain_output(spec, plain[kind], sampled=kind == "seeded")
    copy_usage = spec[0][1].usage
    assert copy_usage.draft_tokens > 0 and copy_usage.accepted_draft_tokens > 0
    if spec[0][0] == plain[kind][0][0]:  # counts match when no near-tie came out differently
        assert copy_usage.completion_tokens == plain[kind][0][1].usage.completion_tokens


def test_draft_model_gives_the_plain_output_and_mostly_agrees(model_path: Path, plain) -> None:
    # Guessing at full length every step: the adaptive policy rightly turns a drafter as slow as the model off
    # (and its choices would make batch shapes depend on step timings).
    spec = _outputs(model_path, GREEDY, draft_mode="model", draft_model_path=str(model_path), draft_max_tokens=4,
                    draft_adaptive=False)
    _assert_plain_output(spec, plain["greedy"], sampled=False)
    drafted = sum(f.usage.draft_tokens for _, f in spec)
    accepted = sum(f.usage.accepted_draft_tokens for _, f in spec)
    assert drafted > 0 and accepted / drafted > 0.8  # the same model guesses its own greedy choices


def test_concurrent_speculative_streams_finish_and_leave_a_clean_cache(model_path: Path) -> None:
    async def main() -> None:
        options = LoadOptions(max_seq_len=512, max_batch_size=4, draft_mode="ngram", draft_max_tokens=8)
        engine = await asyncio.to_thread(LlamaCppEngine.load, model_path, "m", options)
        try:
            params = SamplingParams(temperature=0.0, max_tokens=40)
            results = await asyncio.gather(*[_run(engine, COPY, params) for _ in range(3)], _run(engine, PROMPTS[1], params))
            for text, finish in results:
                assert text and finish.reason.value in ("stop", "length")
                assert finish.usage.completion_tokens > 0
            stats = engine.stats()
            assert stats.slots_active == 0 and stats.kv_cells_used == 0
            assert stats.draft_tokens >= stats.accepted_draft_tokens > 0
            engine.check_consistency()
        finally:
            await engine.close()

    asyncio.run(main())


def test_speculation_through_the_api_reports_acceptance(model_dir: Path, tmp_path: Path) -> None:
    from endpoints.app import create_app

    config = make_config(tmp_path, model_dir, draft_model={"draft_mode": "ngram", "draft_max_tokens": 6})
    with TestClient(create_app(config)) as client:
        wait_loaded(client)
        keys = Keys(tmp_path / "api_tokens.yml")
        r = client.post(
            "/v1/completions",
            json={"model": MODEL_NAME, "prompt": COPY, "max_tokens": 32, "temperature": 0},
            headers=keys.api_headers(),
        )
        assert r.status_code == 200, r.text
        spec = r.json()["usage"]["speculative"]
        assert spec["draft_tokens"] >= spec["accepted_tokens"] > 0
        assert spec["acceptance_rate"] == round(spec["accepted_tokens"] / spec["draft_tokens"], 4)
        health = client.get("/health").json()["models"][MODEL_NAME]
        assert health["draft_tokens"] >= spec["draft_tokens"]
        metrics = client.get("/metrics", headers=keys.api_headers()).text
        assert f'parley_accepted_draft_tokens_total{{model="{MODEL_NAME}"}}' in metrics
        assert "parley_draft_acceptance_rate" in metrics
        # A load naming a draft model that is not there is refused before anything unloads.
        r = client.post(
            "/v1/model/load",
            json={"model_name": MODEL_NAME, "draft_model": {"draft_model_name": "no-such-draft"}},
            headers=keys.admin_headers(),
        )
        assert r.status_code == 404 and r.json()["error"]["param"] == "draft_model_name"


def test_a_load_can_ask_for_guesses_at_full_length(model_dir: Path, tmp_path: Path) -> None:
    """`draft_adaptive: false` through the admin load: a draft model the policy would turn off guesses every step."""
    from endpoints.app import create_app
    from tests.api.test_core_api import load_events

    config = make_config(tmp_path, model_dir, draft_model={"draft_model_dir": str(model_dir)})
    with TestClient(create_app(config)) as client:
        wait_loaded(client)
        keys = Keys(tmp_path / "api_tokens.yml")
        status, events = load_events(client, {"model_name": MODEL_NAME, "draft_model": {
            "draft_model_name": MODEL_NAME, "draft_max_tokens": 3, "draft_adaptive": False}}, keys.admin_headers())
        assert status == 200 and events[-1]["status"] == "finished", events
        r = client.post(
            "/v1/completions",
            json={"model": MODEL_NAME, "prompt": PROMPTS[2], "max_tokens": 24, "temperature": 0, "ignore_eos": True},
            headers=keys.api_headers(),
        )
        assert r.status_code == 200, r.text
        spec = r.json()["usage"]["speculative"]
        # Every decode step carried 3 guesses (or fewer near the end); the model agrees with itself.
        assert spec["draft_tokens"] >= 15 and spec["accepted_tokens"] >= 0.8 * spec["draft_tokens"]
