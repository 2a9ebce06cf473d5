"""One engine contract, run against every engine: llama.cpp and transformers on the real SmolLM2 GGUF,
exllamav2 and exllamav3 through fake modules that follow each library's job/iterate semantics.

Then what only the real transformers engine can show: coherent answers, greedy agreement with llama.cpp
on the same prompt tokens up to the first near-tie, and a refusal of what it cannot do.

Engines are loaded once per module through the registry (as the model manager loads them) and kept
in a pool, so the transformers-vs-llama.cpp comparison reuses the contract's engines.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.base import Engine, Finished, FinishReason, GenerationRequest, LoadOptions, TextDelta
from backends.registry import detect_backend, load_engine
from backends.sampling import SamplingParams
from common.errors import BadRequestError
from tests.neartie import assert_agree, steps_from_engine

FAKES = Path(__file__).resolve().parent.parent / "fakes"
# tests/gpu/gpu_check.py runs this same contract against the real libraries: {"engine": "model folder", ...}
REAL = json.loads(os.environ.get("PARLEY_TEST_ENGINES", "{}"))
ENGINES = list(REAL) or ["llamacpp", "transformers", "exllamav2", "exllamav3"]
QUESTION = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
STORY = "<|im_start|>user\nWrite a long story about a dragon and a knight.<|im_end|>\n<|im_start|>assistant\n"
LIST = "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n"


class Pool:
    def __init__(self, model_path: Path, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.model_path = model_path
        self.tmp = tmp
        self.monkeypatch = monkeypatch
        self.engines: dict[str, Engine] = {}

    def get(self, name: str) -> Engine:
        if name not in self.engines:
            self.engines[name] = self._load(name)
        return self.engines[name]

    def _load(self, name: str) -> Engine:
        options = LoadOptions(max_seq_len=1024, cache_size=2048, max_batch_size=4)
        if name in REAL:
            return load_engine(detect_backend(Path(REAL[name]), name), Path(REAL[name]), f"real-{name}", options)
        if name in ("llamacpp", "transformers"):
            kind = detect_backend(self.model_path, name)
            return load_engine(kind, self.model_path, f"smollm2-{name}", options)
        from tests.fakes.tinylm import write_model_folder

        self.monkeypatch.syspath_prepend(str(FAKES))
        folder = write_model_folder(self.tmp / name, "exl2" if name == "exllamav2" else "exl3")
        kind = detect_backend(folder)  # auto: the folder's quant_method picks the engine
        assert kind == name
        return load_engine(kind, folder, f"tiny-{name}", options)

    def close(self) -> None:
        for engine in self.engines.values():
            asyncio.run(engine.close())
        for name in [m for m, mod in sys.modules.items() if str(getattr(mod, "__file__", "")).startswith(str(FAKES))]:
            del sys.modules[name]  # the fakes leave with this module: later tests see the real (absent) libraries


@pytest.fixture(scope="module")
def pool(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    with pytest.MonkeyPatch.context() as mp:
        p = Pool(model_path, tmp_path_factory.mktemp("engines"), mp)
        try:
            yield p
        finally:
            p.close()


@pytest.fixture(scope="module", params=ENGINES)
def engine(request: pytest.FixtureRequest, pool: Pool) -> Engine:
    return pool.get(request.param)


def prompt(engine: Engine, text: str) -> list[int]:
    return engine.tokenize(text, add_bos=engine.info.add_bos_token, special=True)


async def run(engine: Engine, tokens: list[int], **knobs: object) -> tuple[str, list[TextDelta], Finished]:
    knobs.setdefault("temperature", 0.0)
    deltas: list[TextDelta] = []
    finished: list[Finished] = []
    async for event in engine.generate(GenerationRequest(list(tokens), SamplingParams(**knobs))):  # type: ignore[arg-type]
        assert not finished, "an event came after Finished"
        if isinstance(event, Finished):
            finished.append(event)
        else:
            deltas.append(event)
    assert len(finished) == 1, "exactly one Finished ends every request"
    return "".join(d.text for d in deltas), deltas, finished[0]


async def wait_idle(engine: Engine, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats.slots_active == 0 and stats.queue_depth == 0 and stats.kv_cells_used == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the engine kept work after its requests ended: {engine.stats()}")


# -- the contract ---------------------------------------------------------------------------------
async def test_text_then_one_finished_with_usage(engine: Engine) -> None:
    tokens = prompt(engine, QUESTION)
    text, deltas, fin = await run(engine, tokens, max_tokens=8)
    assert text.strip()
    assert fin.reason in (FinishReason.STOP, FinishReason.LENGTH)
    assert fin.usage.prompt_tokens == len(tokens)
    delivered = sum(len(d.token_ids) for d in deltas)
    # An end-of-generation token is counted, never delivered.
    assert fin.usage.completion_tokens - delivered in ((0, 1) if fin.reason is FinishReason.STOP else (0,))
    assert engine.detokenize([t for d in deltas for t in d.token_ids]) == text


async def test_max_tokens_ends_with_length(engine: Engine) -> None:
    text, deltas, fin = await run(engine, prompt(engine, STORY), max_tokens=5)
    assert fin.reason is FinishReason.LENGTH
    assert fin.usage.completion_tokens == 5
    assert sum(len(d.token_ids) for d in deltas) == 5


async def test_stop_string_ends_before_it(engine: Engine) -> None:
    tokens = prompt(engine, STORY)
    full, _, _ = await run(engine, tokens, max_tokens=16)
    words = [w for w in re.findall(r"[A-Za-z]{3,}", full)][1:]
    assert words, f"no word to stop at in {full!r}"
    stop = words[0]
    text, _, fin = await run(engine, tokens, max_tokens=16, stop=(stop,))
    assert fin.reason is FinishReason.STOP and fin.stop_string == stop
    assert text == full[: full.index(stop)]


async def test_cancel_frees_the_slot(engine: Engine) -> None:
    stream = engine.generate(GenerationRequest(prompt(engine, STORY), SamplingParams(max_tokens=300, temperature=0)))
    first = await stream.__anext__()
    assert isinstance(first, TextDelta)
    await stream.aclose()
    await wait_idle(engine)
    text, _, fin = await run(engine, prompt(engine, QUESTION), max_tokens=3)
    assert fin.reason in (FinishReason.STOP, FinishReason.LENGTH) and text


async def test_concurrent_streams_match_each_alone(engine: Engine) -> None:
    prompts = [prompt(engine, p) for p in (QUESTION, STORY, LIST)]
    alone = [await run(engine, p, max_tokens=8, logprobs=2) for p in prompts]
    together = await asyncio.gather(*(run(engine, p, max_tokens=8, logprobs=2) for p in prompts))
    for (_, a_deltas, a_fin), (_, b_deltas, b_fin) in zip(alone, together, strict=True):
        a = steps_from_engine(lp for d in a_deltas for lp in d.logprobs)
        b = steps_from_engine(lp for d in b_deltas for lp in d.logprobs)
        assert a and all(len(s.top) == 2 for s in a)
        assert_agree(a, b, label=engine.info.backend)
    await wait_idle(engine)


async def test_regex_constraint(engine: Engine) -> None:
    from common.models.loaded import LoadedModel

    from common.formats.constraints import ConstraintSpec

    compiler = await LoadedModel("m", engine, None).constraint_compiler()
    constraint = compiler.compile(ConstraintSpec("regex", "[0-9]{3}"))
    request = GenerationRequest(prompt(engine, QUESTION), SamplingParams(max_tokens=10, temperature=0),
                                constraint=constraint)
    text = "".join([e.text async for e in engine.generate(request) if isinstance(e, TextDelta)])
    assert re.fullmatch("[0-9]{3}", text), text


async def test_banned_strings_are_avoided_or_refused(engine: Engine) -> None:
    tokens = prompt(engine, QUESTION)
    full, _, _ = await run(engine, tokens, max_tokens=16)
    banned = re.findall(r"[A-Za-z]{3,}", full)[0]
    if engine.info.backend == "transformers":
        with pytest.raises(BadRequestError) as refused:
            engine.submit(GenerationRequest(tokens, SamplingParams(max_tokens=8, banned_strings=(banned,))))
        assert refused.value.param == "banned_strings"
        return
    text, _, _ = await run(engine, tokens, max_tokens=16, banned_strings=(banned,))
    assert banned.lower() not in text.lower()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
async def test_constraints_that_leave_nothing_to_sample_end_only_that_request(engine: Engine, temperature: float) -> None:
    if engine.info.backend not in ("llamacpp", "transformers"):
        pytest.skip("exllama samples inside its library's generator, for every job at once: a failing step "
                    "cannot be pinned on one request there")
    tokens = prompt(engine, QUESTION)
    # The end of turn is the only token allowed, and min_tokens forbids ending: nothing is left.
    _, _, fin = await run(engine, tokens, max_tokens=4, min_tokens=2, allowed_tokens=(engine.info.eos_token_id,),
                          temperature=temperature)
    assert fin.reason is FinishReason.ERROR
    assert fin.error_status == 400 and fin.error_code == "nothing_to_sample"
    assert fin.error is not None and "min_tokens" in fin.error
    # The engine serves the next request.
    text, _, fin = await run(engine, tokens, max_tokens=4)
    assert fin.reason in (FinishReason.STOP, FinishReason.LENGTH) and engine.stats().failure is None
    await wait_idle(engine)


# -- the real transformers engine against llama.cpp ------------------------------------------------
needs_smollm2 = pytest.mark.skipif(bool(REAL), reason="the GPU check runs the contract only")


@needs_smollm2
async def test_transformers_answers_coherently(pool: Pool) -> None:
    tf = pool.get("transformers")
    text, _, fin = await run(tf, prompt(tf, QUESTION), max_tokens=16)
    assert "Paris" in text, text
    assert fin.reason is FinishReason.STOP


@needs_smollm2
async def test_transformers_agrees_with_llamacpp_up_to_a_near_tie(pool: Pool) -> None:
    tf, lc = pool.get("transformers"), pool.get("llamacpp")
    for text in (QUESTION, STORY):
        tokens = prompt(lc, text)
        assert prompt(tf, text) == tokens, "both engines must read the GGUF's vocabulary the same way"
        _, a, _ = await run(lc, tokens, max_tokens=12, logprobs=2)
        _, b, _ = await run(tf, tokens, max_tokens=12, logprobs=2)
        result = assert_agree(steps_from_engine(lp for d in a for lp in d.logprobs),
                              steps_from_engine(lp for d in b for lp in d.logprobs), label="transformers vs llama.cpp")
        assert result.compared >= 1, result.detail


@needs_smollm2
def test_transformers_model_facts_match_llamacpp(pool: Pool) -> None:
    tf, lc = pool.get("transformers").info, pool.get("llamacpp").info
    assert (tf.n_vocab, tf.bos_token_id, tf.eos_token_id) == (lc.n_vocab, lc.bos_token_id, lc.eos_token_id)
    assert lc.eos_token_id in tf.eog_token_ids and set(tf.eog_token_ids) <= set(lc.eog_token_ids)
    assert (tf.add_bos_token, tf.n_ctx) == (lc.add_bos_token, lc.n_ctx)
    assert tf.chat_template and "im_start" in tf.chat_template
    assert all(pool.get("transformers").token_piece(t) == pool.get("llamacpp").token_piece(t) for t in range(0, 49152, 97))
