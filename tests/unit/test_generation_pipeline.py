"""start_generation without HTTP: its steps in order, refusals leave nothing queued, one finish -> error mapping."""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from backends.base import Event, Finished, FinishReason, GenerationHandle, GenerationRequest, TextDelta, Usage
from backends.sampling import SamplingParams
from common.errors import (
    BadRequestError,
    ContextLengthExceededError,
    EngineError,
    ModelNotLoadedError,
    RateLimitError,
    ServiceUnavailableError,
)
from common.generation.hooks import NO_HOOKS, GenerationHooks
from common.generation.pipeline import Generation, start_generation
from common.generation.prompts import Prompt
from tests.fake_engine import ScriptedHandle


class ScriptedEngine:
    def __init__(self, events: list[Event] | None = None, refuse_at: int | None = None) -> None:
        self.events = events if events is not None else [TextDelta("Hi", (5,)), Finished(FinishReason.STOP, Usage(3, 1))]
        self.refuse_at = refuse_at
        self.handles: list[ScriptedHandle] = []

    def submit(self, request: GenerationRequest) -> ScriptedHandle:
        if self.refuse_at is not None and len(self.handles) == self.refuse_at:
            raise ServiceUnavailableError("The server is busy. Retry shortly.", retry_after=1)
        handle = ScriptedHandle(request, self.events)
        self.handles.append(handle)
        return handle


def model(engine: ScriptedEngine, n_ctx: int = 64) -> Any:
    return SimpleNamespace(name="m", info=SimpleNamespace(n_ctx=n_ctx, n_vocab=100), engine=engine)


class RecordingHooks(GenerationHooks):
    def __init__(self, ceiling: int | None = None, refuse: bool = False) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.ceiling = ceiling
        self.refuse = refuse

    def fit(self, n_prompt: int, prompt_param: str, requested: int | None) -> int | None:
        self.calls.append(("fit", n_prompt, prompt_param, requested))
        return self.ceiling

    def record_prompt(self, model: str, n_prompt: int, text: str | None, params: SamplingParams) -> None:
        self.calls.append(("record_prompt", model, n_prompt, params.max_tokens))

    async def admit(self, n: int) -> None:
        self.calls.append(("admit", n))
        if self.refuse:
            raise RateLimitError("Too many requests; retry after the Retry-After seconds.")

    def observe(self, handle: GenerationHandle, model: str, *, counts_prompt: bool) -> GenerationHandle:
        self.calls.append(("observe", model, counts_prompt))
        return handle


PROMPT = Prompt([1, 2, 3], "abc", stop=("<end>",), param="messages")


async def test_hooks_must_be_passed() -> None:
    with pytest.raises(TypeError):
        await start_generation(model(ScriptedEngine()), PROMPT, SamplingParams())  # type: ignore[call-arg]


async def test_steps_run_in_order_and_settle_the_parameters() -> None:
    engine, hooks = ScriptedEngine(), RecordingHooks(ceiling=10)
    generation = await start_generation(model(engine), PROMPT, SamplingParams(seed=7, stop=("x",)), hooks=hooks, n=3,
                                        default_max_tokens=50)
    assert hooks.calls == [
        ("fit", 3, "messages", None), ("record_prompt", "m", 3, 10), ("admit", 3),
        ("observe", "m", True), ("observe", "m", False), ("observe", "m", False),
    ]
    assert [h.request.params.seed for h in engine.handles] == [7, 8, 9]
    assert generation.params.max_tokens == 10 and generation.params.stop == ("x", "<end>")
    assert generation.prompt_tokens == [1, 2, 3]
    # Without a ceiling: the request's length, else the default, never past the context's room.
    plain = await start_generation(model(ScriptedEngine()), PROMPT, SamplingParams(), hooks=NO_HOOKS,
                                   default_max_tokens=500)
    assert plain.params.max_tokens == 61


async def test_refusals_leave_nothing_queued() -> None:
    engine = ScriptedEngine(refuse_at=2)
    with pytest.raises(ServiceUnavailableError):
        await start_generation(model(engine), PROMPT, SamplingParams(), hooks=NO_HOOKS, n=3)
    assert len(engine.handles) == 2 and all(h.cancelled for h in engine.handles)
    engine = ScriptedEngine()
    with pytest.raises(RateLimitError):
        await start_generation(model(engine), PROMPT, SamplingParams(), hooks=RecordingHooks(refuse=True))
    assert engine.handles == []


async def test_prompt_and_token_checks_come_first() -> None:
    engine, hooks = ScriptedEngine(), RecordingHooks()
    with pytest.raises(BadRequestError) as bad:
        await start_generation(model(engine), PROMPT, SamplingParams(banned_tokens=(100,)), hooks=hooks)
    assert bad.value.param == "banned_tokens" and hooks.calls == []
    with pytest.raises(ContextLengthExceededError) as long:
        await start_generation(model(engine, n_ctx=3), PROMPT, SamplingParams(), hooks=hooks)
    assert long.value.param == "messages"
    with pytest.raises(BadRequestError):
        await start_generation(model(engine), Prompt([]), SamplingParams(), hooks=hooks)
    assert engine.handles == [] and ("admit", 1) not in hooks.calls


def test_one_mapping_from_finish_to_error() -> None:
    failure = Generation.failure
    assert failure(Finished(FinishReason.STOP, Usage())) is None
    assert failure(Finished(FinishReason.LENGTH, Usage())) is None
    assert failure(Finished(FinishReason.CANCELLED, Usage())) is None
    err = failure(Finished(FinishReason.ERROR, Usage(), error="decode failed"))
    assert isinstance(err, EngineError) and err.message == "decode failed"
    assert isinstance(failure(Finished(FinishReason.ERROR, Usage())), EngineError)
    assert isinstance(failure(Finished(FinishReason.UNLOAD, Usage())), ModelNotLoadedError)
    assert isinstance(failure(None), EngineError)


async def test_collect_returns_every_choice_or_raises_its_failure() -> None:
    generation = await start_generation(model(ScriptedEngine()), PROMPT, SamplingParams(), hooks=NO_HOOKS, n=2)
    results = await generation.collect()
    assert [(r.index, r.text, r.token_ids) for r in results] == [(0, "Hi", [5]), (1, "Hi", [5])]
    failing = ScriptedEngine([TextDelta("Hel"), Finished(FinishReason.ERROR, Usage(), error="decode failed")])
    generation = await start_generation(model(failing), PROMPT, SamplingParams(), hooks=NO_HOOKS)
    with pytest.raises(EngineError, match="decode failed"):
        await generation.collect()
    silent = await start_generation(model(ScriptedEngine([TextDelta("Hel")])), PROMPT, SamplingParams(),
                                    hooks=NO_HOOKS)
    with pytest.raises(EngineError, match="without a result"):
        await silent.collect()
