"""The one way to start a generation: fit, admit, constrain, queue; then read, collect or fail.

Dialects differ only in how they map their request into a prompt and
`SamplingParams` (their mapping.py) and how they frame the events (their
serving.py). Between the two every route calls `start_generation`, which owns
the context checks, the caller's caps and admission (through its
`GenerationHooks`), the output constraint, the `n` choices and their
cancellation; the `Generation` it returns owns the one mapping from a
finish to an error.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

from backends.base import (
    Event,
    Finished,
    FinishReason,
    GenerationHandle,
    GenerationRequest,
    TextDelta,
    TokenLogprob,
    Usage,
)
from backends.sampling import SamplingParams
from common.errors import (
    APIError,
    BadRequestError,
    ContextLengthExceededError,
    EngineError,
    ModelNotLoadedError,
    ServiceUnavailableError,
)
from common.formats.constraints import Constraint, ConstraintSpec
from common.generation.hooks import GenerationHooks
from common.generation.prompts import Prompt, tokenize_images
from common.models.manager import LoadedModel


@dataclass
class ChoiceResult:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: Finished | None = None


class Generation:
    """The queued choices of one prompt. Read them once: `events()` as they come, or `collect()`."""

    def __init__(self, handles: Sequence[GenerationHandle]) -> None:
        if not handles:
            raise ValueError("A Generation needs at least one handle; start one with start_generation.")
        self.handles = list(handles)

    @property
    def params(self) -> SamplingParams:
        """The fitted parameters the first choice runs with (max_tokens settled, template stops added)."""
        return self.handles[0].request.params

    @property
    def prompt_tokens(self) -> list[int]:
        return self.handles[0].request.prompt_tokens

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) as they come, interleaved; leaving early cancels every choice."""
        if len(self.handles) == 1:
            async with aclosing(self.handles[0].events()) as events:
                async for ev in events:
                    yield 0, ev
            return
        queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

        async def pump(i: int, h: GenerationHandle) -> None:
            async with aclosing(h.events()) as events:
                async for ev in events:
                    queue.put_nowait((i, ev))

        tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(self.handles)]
        remaining = len(self.handles)
        try:
            while remaining:
                i, ev = await queue.get()
                if isinstance(ev, Finished):
                    remaining -= 1
                yield i, ev
        finally:
            for t in tasks:
                t.cancel()
            self.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def collect(self, *, keep_logprobs: bool = False) -> list[ChoiceResult]:
        """Every choice's whole output, each with its finish. A choice that failed raises its
        `failure` instead: a non-streaming answer is an error, never a silently truncated text."""
        results = [ChoiceResult(i) for i in range(len(self.handles))]
        parts: list[list[str]] = [[] for _ in self.handles]
        async with aclosing(self.events()) as events:
            async for i, ev in events:
                if isinstance(ev, TextDelta):
                    parts[i].append(ev.text)
                    results[i].token_ids.extend(ev.token_ids)
                    if keep_logprobs:
                        results[i].logprobs.extend(ev.logprobs)
                else:
                    results[i].finish = ev
        for r, p in zip(results, parts):
            r.text = "".join(p)
            failure = self.failure(r.finish)
            if failure is not None:
                raise failure
        return results

    @staticmethod
    def failure(finish: Finished | None) -> APIError | None:
        """The error a finish stands for (None: the choice ended normally, cancelled included)."""
        if finish is None:
            return EngineError("The generation ended without a result. Retry the request.")
        if finish.reason is FinishReason.ERROR and finish.error_status == 503:
            return ServiceUnavailableError(finish.error or "The engine is busy. Retry shortly.", retry_after=2)
        if finish.reason is FinishReason.ERROR and finish.error_status is not None:
            return APIError(finish.error or "The request was refused.", status=finish.error_status,
                            code=finish.error_code or "upstream_refused")
        if finish.reason is FinishReason.ERROR:
            return EngineError(
                finish.error or "The engine failed while generating. Retry the request; reload the model if it persists."
            )
        if finish.reason is FinishReason.UNLOAD:
            return ModelNotLoadedError("The model was unloaded while generating. Load it again and retry.")
        return None


async def start_generation(
    model: LoadedModel,
    prompt: Prompt,
    params: SamplingParams,
    *,
    hooks: GenerationHooks,
    n: int = 1,
    constraint: ConstraintSpec | Constraint | None = None,
    loras: tuple[tuple[str, float], ...] | None = None,
    default_max_tokens: int | None = None,
) -> Generation:
    """Queue `n` choices of `prompt`, or raise an APIError with nothing left queued.

    In order: the token ids in `params` must exist; the prompt must fit the
    context and the caller's caps (`hooks.fit`), which settles max_tokens
    (`default_max_tokens` when the request sent none, else the room left) and
    adds the template's stop strings; the caller admits the request
    (`hooks.admit`); the constraint is compiled off the event loop; the choices
    are queued (seeds counting up from `params.seed`) and handed to
    `hooks.observe`. A refusal while queuing (busy, unloading) cancels the
    choices already queued. `loras` picks adapters and scales for these
    choices only (None: the model's active set).
    """
    if n < 1:
        raise BadRequestError(f"n is {n}; ask for at least one choice.", param="n")
    if getattr(model.engine, "is_embedding", False):
        model.engine.submit(GenerationRequest(list(prompt.tokens), params))  # refuses with a 400 naming `model`
    prompt = await tokenize_images(model, prompt)
    fitted = _fit(model, prompt, params, default_max_tokens, hooks)
    await hooks.admit(n)
    engine = model.engine
    spec = constraint if isinstance(constraint, ConstraintSpec) and not getattr(engine, "compiles_constraints", True) else None
    compiled = None if spec is not None else await _compile(model, constraint)
    handles: list[GenerationHandle] = []
    try:
        for i in range(n):
            p = fitted if (n == 1 or fitted.seed is None) else fitted.with_updates(seed=fitted.seed + i)
            handles.append(engine.submit(GenerationRequest(
                list(prompt.tokens), p, constraint=compiled, loras=loras, prompt_text=prompt.text,
                chat=prompt.chat, constraint_spec=spec, affinity_key=prompt.affinity_key, media=prompt.media,
            )))
            handles[-1] = hooks.observe(handles[-1], model.name, counts_prompt=i == 0)
    except BaseException:
        for h in handles:
            h.cancel()
        raise
    return Generation(handles)


def _check_token_ids(params: SamplingParams, n_vocab: int, known: bool = True) -> None:
    """Token ids in sampling fields must exist: an unknown id would be silently ignored (or, in
    allowed_tokens, leave nothing to sample), and allowed_tokens must not all be banned.
    `known` False: the vocabulary is another server's."""
    fields = (
        ("logit_bias", tuple(params.logit_bias)),
        ("banned_tokens", params.banned_tokens),
        ("allowed_tokens", params.allowed_tokens),
        ("stop_token_ids", params.stop_token_ids),
    )
    for name, ids in fields:
        if ids and not known:
            raise BadRequestError(
                f"'{name}' names token ids, and this model is served by a remote server whose vocabulary "
                "Parley does not hold. Drop the field, or use banned_strings / stop strings instead.",
                param=name,
            )
        bad = next((t for t in ids if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise BadRequestError(
                f"'{name}' has token id {bad}, outside the vocabulary (0..{n_vocab - 1}); "
                "look ids up with /v1/token/encode.",
                param=name,
            )
    if params.allowed_tokens and set(params.allowed_tokens) <= set(params.banned_tokens):
        raise BadRequestError(
            "Every token in 'allowed_tokens' is also in 'banned_tokens', so nothing could be sampled. "
            "Remove the overlap from one of them.",
            param="allowed_tokens",
        )


def _fit(
    model: LoadedModel, prompt: Prompt, params: SamplingParams, default_max_tokens: int | None, hooks: GenerationHooks
) -> SamplingParams:
    """Check the token ids exist and the prompt fits the context and the caps; settle max_tokens and stop strings."""
    _check_token_ids(params, model.info.n_vocab, getattr(model.engine, "knows_vocabulary", True))
    n_ctx = model.info.n_ctx
    n_prompt = len(prompt.tokens)
    if n_prompt == 0:
        raise BadRequestError("The prompt is empty after tokenization; send some text.", param="prompt")
    ceiling = hooks.fit(n_prompt, prompt.param, params.max_tokens)
    if n_prompt >= n_ctx:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {n_ctx} tokens, but the prompt has {n_prompt} tokens. "
            "Shorten the prompt or the conversation, or load the model with a larger max_seq_len.",
            param=prompt.param,
        )
    room = n_ctx - n_prompt
    max_tokens = min(params.max_tokens or default_max_tokens or room, room, ceiling or room)
    stop = params.stop + tuple(s for s in prompt.stop if s not in params.stop)
    fitted = params.with_updates(max_tokens=max_tokens, stop=stop)
    hooks.record_prompt(model.name, n_prompt, prompt.text, fitted)
    return fitted


async def _compile(model: LoadedModel, constraint: ConstraintSpec | Constraint | None) -> Constraint | None:
    """Compile a request's output constraint off the event loop (cached per model)."""
    if not isinstance(constraint, ConstraintSpec):
        return constraint
    compiler = await model.constraint_compiler()
    return await asyncio.to_thread(compiler.compile, constraint)


def total_usage(finishes: list[Finished]) -> Usage:
    """The usage of one prompt's choices: the prompt counted once, the completions summed."""
    usage = Usage()
    for f in finishes:
        usage.completion_tokens += f.usage.completion_tokens
        usage.generation_seconds = max(usage.generation_seconds, f.usage.generation_seconds)
        usage.prompt_seconds = max(usage.prompt_seconds, f.usage.prompt_seconds)
        usage.draft_tokens += f.usage.draft_tokens
        usage.accepted_draft_tokens += f.usage.accepted_draft_tokens
    if finishes:
        usage.prompt_tokens = finishes[0].usage.prompt_tokens
        usage.cached_tokens = min(f.usage.cached_tokens for f in finishes)
    return usage
