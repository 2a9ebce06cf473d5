"""What the caller of a generation (or of an embedding) decides: caps, admission, accounting.

`start_generation` calls a `GenerationHooks` at fixed points, and
`embeddings.embed` / `embeddings.rerank` an `EmbeddingHooks`; the HTTP layer's
`RequestContext` implements both (per-request caps, the `n` cap, draining,
rate limits, metrics and token accounting). Callers outside HTTP (tests,
benchmarks, scripts) pass `NO_HOOKS` explicitly: `hooks` is a required
argument, so nothing is skipped by omission.
"""

from __future__ import annotations

from typing import Protocol, final

from backends.base import GenerationHandle
from backends.sampling import SamplingParams


class GenerationHooks(Protocol):
    """The points where `start_generation` asks its caller; each may raise an APIError to refuse."""

    def fit(self, n_prompt: int, prompt_param: str, requested: int | None) -> int | None:
        """Check the caller's caps on the prompt length and the requested max_tokens (None: not sent);
        return the ceiling for max_tokens, or None for none."""
        ...

    def record_prompt(self, model: str, n_prompt: int, text: str | None, params: SamplingParams) -> None:
        """The prompt and the fitted parameters, once they are settled (for the request log)."""
        ...

    async def admit(self, n: int) -> None:
        """Just before `n` choices are queued: refuse when the caller may not start them now (it may
        await a limit store shared by several servers)."""
        ...

    def observe(self, handle: GenerationHandle, model: str, *, counts_prompt: bool) -> GenerationHandle:
        """Wrap a queued choice to watch its events; `counts_prompt` is true for one choice per prompt."""
        ...


class EmbeddingHooks(Protocol):
    """The points where an embedding or rerank request asks its caller; `admit` may raise an APIError."""

    async def admit(self, n: int) -> None:
        """Once the inputs are checked, before they are embedded: refuse when the caller may not run
        the request now (as for a generation of `n` choices)."""
        ...

    def embedded(self, model: str, input_tokens: int) -> None:
        """The inputs were embedded (or ranked) by `model`: count the request and the tokens it read."""
        ...


@final
class OfflineHooks(GenerationHooks, EmbeddingHooks):
    """No caps, no admission, no accounting: for callers outside HTTP (tests, benchmarks, scripts)."""

    __slots__ = ()

    def fit(self, n_prompt: int, prompt_param: str, requested: int | None) -> int | None:
        return None

    def record_prompt(self, model: str, n_prompt: int, text: str | None, params: SamplingParams) -> None:
        return None

    async def admit(self, n: int) -> None:
        return None

    def observe(self, handle: GenerationHandle, model: str, *, counts_prompt: bool) -> GenerationHandle:
        return handle

    def embedded(self, model: str, input_tokens: int) -> None:
        return None


NO_HOOKS = OfflineHooks()  # stateless, so one instance serves every caller
