"""A scripted engine for tests that need the serving stack but not llama.cpp.

`FakeEngine` keeps `backends/base.py`'s contract with a tiny deterministic
vocabulary and answers from scripts instead of a model:

    engine = FakeEngine(default=["Hello", " world", "!"])
    engine.scripts["capital"] = ["Paris", "."]           # a prompt containing "capital"
    engine.scripts["boom"] = ["Half an answer", fail("GPU on fire")]

A script is a sequence of steps:
- a string: text the model "generates", tokenized with the fake vocabulary and
  released one token at a time through `backends.text_stream.TokenTextStream`
  (so stop strings, held-back partial stops and whole UTF-8 work as in a real
  engine); `max_tokens` ends it with LENGTH;
- `Pause(seconds)`: wait (a slow model);
- `HANG`: wait until the request is cancelled or the engine closed;
- `End(reason, error)` (`fail(...)`, `UNLOADED`): finish now with that reason.
A script that runs out finishes with STOP (the model's EOS).

The vocabulary: 4 special tokens (`<s>`, `</s>`, `<|im_start|>`, `<|im_end|>`),
the 256 bytes, then a few whole words (longest match first), so "Hello world"
is two tokens and any text still round-trips. Banned strings are not supported
(the fake never rewinds).

`install_fake_loader(monkeypatch, factory)` makes the model manager build
FakeEngines instead of loading files (the seam: every module-level reference to
`backends.registry.load_engine`), and `fake_app(...)` serves a real app
(`endpoints.app.create_app`) over one.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends.base import (
    Engine,
    EngineStats,
    Event,
    Finished,
    FinishReason,
    GenerationHandle,
    GenerationRequest,
    ModelInfo,
    TextDelta,
    TokenLogprob,
    Usage,
)
from backends.text_stream import Release, Rewind, StopHit, TokenTextStream
from common.errors import ModelNotLoadedError, ServiceUnavailableError

SPECIALS = ("<s>", "</s>", "<|im_start|>", "<|im_end|>")
BOS, EOS, IM_START, IM_END = range(4)
BYTE_BASE = len(SPECIALS)
DEFAULT_WORDS = (
    "Hello", " world", " Paris", " is", " the", " capital", " of", " France", " you", " assistant",
    "user", "system", "\n",
)
DEFAULT_SCRIPT = ("Hello", " world", "!")
MIN_SECONDS = 1e-6  # timings are measured, and never zero (clients divide by them)
FAKE_LOGPROB = -0.25

CHATML = (
    '{%- set stop_strings = ["<|im_end|>"] -%}'
    "{%- for message in messages -%}"
    '{{- "<|im_start|>" + message.role + "\\n" + message.content + "<|im_end|>\\n" -}}'
    "{%- endfor -%}"
    '{%- if add_generation_prompt -%}{{- "<|im_start|>assistant\\n" -}}{%- endif -%}'
)


class ScriptedHandle(GenerationHandle):
    """A handle that yields a fixed list of events: for tests that replace an engine's submit."""

    def __init__(self, request: GenerationRequest, events: list[Event]) -> None:
        self.request = request
        self._events = events
        self.cancelled = False

    async def events(self) -> AsyncIterator[Event]:
        for ev in self._events:
            yield ev

    def cancel(self) -> None:
        self.cancelled = True


@dataclass(frozen=True)
class Pause:
    seconds: float


@dataclass(frozen=True)
class End:
    reason: FinishReason
    error: str | None = None


class _Hang:
    def __repr__(self) -> str:
        return "HANG"


HANG = _Hang()
UNLOADED = End(FinishReason.UNLOAD)


def fail(message: str = "scripted engine failure") -> End:
    return End(FinishReason.ERROR, message)


Step = str | Pause | End | _Hang
Script = Sequence[Step]


class FakeEngine(Engine):
    def __init__(
        self,
        name: str = "fake",
        *,
        default: Script = DEFAULT_SCRIPT,
        scripts: Mapping[str, Script] | None = None,
        words: Sequence[str] = DEFAULT_WORDS,
        n_ctx: int = 4096,
        slots: int = 4,
        max_queue: int = 64,
        token_delay: float = 0.0,
        chat_template: str | None = CHATML,
    ) -> None:
        self.default: Script = default
        self.scripts: dict[str, Script] = dict(scripts or {})  # prompt substring -> script; first match wins
        self.token_delay = token_delay
        self.slots = slots
        self.max_queue = max_queue
        self.closed = False
        self.requests: list[GenerationRequest] = []  # everything submitted, for assertions
        self._active: set[FakeHandle] = set()
        self._finished = 0
        self._generated = 0
        self._pieces: list[bytes] = [s.encode() for s in SPECIALS] + [bytes([b]) for b in range(256)]
        self._pieces += [w.encode() for w in words if len(w.encode()) > 1]
        self._words = sorted(
            ((p, i) for i, p in enumerate(self._pieces) if i >= BYTE_BASE + 256), key=lambda x: -len(x[0])
        )
        self._specials = sorted(((s.encode(), i) for i, s in enumerate(SPECIALS)), key=lambda x: -len(x[0]))
        self.info = ModelInfo(
            name=name,
            path=f"fake://{name}",
            backend="fake",
            n_ctx=n_ctx,
            n_ctx_train=n_ctx,
            n_vocab=len(self._pieces),
            bos_token=SPECIALS[BOS],
            eos_token=SPECIALS[EOS],
            bos_token_id=BOS,
            eos_token_id=EOS,
            add_bos_token=False,
            chat_template=chat_template,
            eog_token_ids=(EOS, IM_END),
            control_token_ids=tuple(range(len(SPECIALS))),
            architecture="fake",
            quantization="F32",
        )

    # -- vocabulary -----------------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        data = text.encode("utf-8")
        out = [BOS] if add_bos else []
        pos = 0
        while pos < len(data):
            for table in (self._specials if special else (), self._words):
                hit = next((i for piece, i in table if data.startswith(piece, pos)), None)
                if hit is not None:
                    out.append(hit)
                    pos += len(self._pieces[hit])
                    break
            else:
                out.append(BYTE_BASE + data[pos])
                pos += 1
        return out

    def detokenize(self, tokens: list[int], *, special: bool = False) -> str:
        return b"".join(
            self.token_piece(t) for t in tokens if special or t >= len(SPECIALS)
        ).decode("utf-8", "replace")

    def token_piece(self, token: int) -> bytes:
        if not 0 <= token < len(self._pieces):
            raise ValueError(f"token {token} is outside the fake vocabulary (0..{len(self._pieces) - 1})")
        return self._pieces[token]

    # -- requests -------------------------------------------------------------------
    def script_for(self, prompt_tokens: list[int]) -> Script:
        text = self.detokenize(prompt_tokens, special=True)
        return next((s for key, s in self.scripts.items() if key in text), self.default)

    def submit(self, request: GenerationRequest) -> FakeHandle:
        if self.closed:
            raise ModelNotLoadedError("The model was unloaded. Load it again and retry.", retry_after=1)
        if len(self._active) >= self.slots + self.max_queue:
            raise ServiceUnavailableError("The fake engine is full. Retry in a moment.", retry_after=1)
        self.requests.append(request)
        handle = FakeHandle(self, request, self.script_for(request.prompt_tokens))
        self._active.add(handle)
        return handle

    def stats(self) -> EngineStats:
        active = len(self._active)
        return EngineStats(
            slots_total=self.slots,
            slots_active=min(active, self.slots),
            queue_depth=max(0, active - self.slots),
            kv_cells_total=self.info.n_ctx * self.slots,
            kv_cells_used=sum(h.cells for h in self._active),
            requests_finished=self._finished,
            tokens_generated=self._generated,
        )

    async def close(self) -> None:
        self.closed = True
        for handle in list(self._active):
            handle.unload()

    def _done(self, handle: FakeHandle, completion_tokens: int) -> None:
        if handle in self._active:
            self._active.discard(handle)
            self._finished += 1
            self._generated += completion_tokens


class FakeHandle(GenerationHandle):
    def __init__(self, engine: FakeEngine, request: GenerationRequest, script: Script) -> None:
        self.request = request
        self.script = script
        self._engine = engine
        self._stop_reason: FinishReason | None = None  # set by cancel() / unload()
        self._wake: asyncio.Event | None = None
        self._started = False
        self.cells = len(request.prompt_tokens)

    def cancel(self) -> None:
        self._interrupt(FinishReason.CANCELLED)

    def unload(self) -> None:
        self._interrupt(FinishReason.UNLOAD)

    def _interrupt(self, reason: FinishReason) -> None:
        if self._stop_reason is None:
            self._stop_reason = reason
        if self._wake is not None:
            self._wake.set()
        if not self._started:
            self._engine._done(self, 0)

    async def _wait(self, seconds: float | None) -> None:
        """Sleep (forever when None) unless interrupted first."""
        assert self._wake is not None
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except TimeoutError:
            pass

    async def events(self) -> AsyncIterator[Event]:
        if self._started:
            raise RuntimeError("a handle's events are read once")
        self._started = True
        self._wake = asyncio.Event()
        if self._stop_reason is not None:
            self._wake.set()
        params = self.request.params
        stream = TokenTextStream(params.stop)
        n_prompt = len(self.request.prompt_tokens)
        n = 0
        started = time.perf_counter()
        first: float | None = None  # when the first token came: the end of the "prompt" phase

        def finished(reason: FinishReason, *, stop: str | None = None, error: str | None = None) -> Finished:
            now = time.perf_counter()
            usage = Usage(
                prompt_tokens=n_prompt,
                completion_tokens=n,
                prompt_seconds=max((first or now) - started, MIN_SECONDS),
                generation_seconds=max(now - (first or now), MIN_SECONDS),
            )
            self._engine._done(self, n)
            return Finished(reason, usage, stop_string=stop, error=error)

        def delta(release: Release) -> TextDelta | None:
            if not release.text and not release.tokens:
                return None
            logprobs: tuple[TokenLogprob, ...] = ()
            if params.logprobs is not None:
                logprobs = tuple(self._logprob(t, params.logprobs) for t in release.tokens)
            return TextDelta(release.text, release.tokens, logprobs)

        try:
            for step in self.script:
                if self._stop_reason is not None:
                    break
                if isinstance(step, Pause):
                    await self._wait(step.seconds)
                    continue
                if isinstance(step, _Hang):
                    await self._wait(None)
                    continue
                if isinstance(step, End):
                    tail = delta(stream.flush())
                    if tail is not None:
                        yield tail
                    yield finished(step.reason, error=step.error)
                    return
                for token in self._engine.tokenize(step, add_bos=False, special=False):
                    if self._stop_reason is not None:
                        break
                    n += 1
                    self.cells += 1
                    if first is None:
                        first = time.perf_counter()
                    out = stream.push(token, self._engine.token_piece(token))
                    if isinstance(out, StopHit):
                        d = delta(out.release)
                        if d is not None:
                            yield d
                        yield finished(FinishReason.STOP, stop=out.stop)
                        return
                    if isinstance(out, Rewind):  # banned strings are not passed to the stream
                        raise AssertionError("the fake engine does not rewind")
                    d = delta(out)
                    if d is not None:
                        yield d
                    if params.max_tokens is not None and n >= params.max_tokens:
                        tail = delta(stream.flush())
                        if tail is not None:
                            yield tail
                        yield finished(FinishReason.LENGTH)
                        return
                    if self._engine.token_delay:
                        await self._wait(self._engine.token_delay)
                    else:
                        await asyncio.sleep(0)  # let other requests and disconnects run, as a real engine would
            if self._stop_reason is not None:
                yield finished(self._stop_reason)
                return
            tail = delta(stream.flush())
            if tail is not None:
                yield tail
            yield finished(FinishReason.STOP)
        finally:
            # Leaving the iterator early cancels (the contract), and frees the slot either way.
            if self._stop_reason is None:
                self._stop_reason = FinishReason.CANCELLED
            self._engine._done(self, n)

    def _logprob(self, token: int, top: int) -> TokenLogprob:
        piece = self._engine.token_piece(token)
        text = piece.decode("utf-8", "replace")
        return TokenLogprob(text, token, FAKE_LOGPROB, list(piece), [(text, token, FAKE_LOGPROB)][:top])


# -- serving a real app over a FakeEngine ------------------------------------------------
def install_fake_loader(monkeypatch: Any, factory: Callable[[], FakeEngine]) -> list[str]:
    """Make every model load build `factory()` instead of reading a file.

    The seam is `backends.registry.load_engine` (what the model manager calls, in a worker
    thread): each module that imported it by name gets the fake. Returns the patched modules.
    """
    import backends.registry as registry
    import endpoints.app  # noqa: F401 - imports the model manager, so its references exist

    real = registry.load_engine

    def load_fake(*args: Any, **kwargs: Any) -> FakeEngine:
        progress = kwargs.get("progress") or (args[4] if len(args) > 4 else None)
        if callable(progress):
            progress(1.0)
        return factory()

    patched = []
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in ("backends", "common", "endpoints") and getattr(module, "load_engine", None) is real:
            monkeypatch.setattr(module, "load_engine", load_fake)
            patched.append(name)
    if patched == ["backends.registry"] or not patched:
        raise AssertionError(
            "No module of the model manager imports backends.registry.load_engine by name any more, so a "
            "FakeEngine cannot be slipped in: update install_fake_loader in tests/fake_engine.py to the "
            "manager's new seam (ideally a public way to register an already-built engine)."
        )
    return patched


@dataclass
class FakeServer:
    client: Any  # fastapi.testclient.TestClient, entered
    engines: list[FakeEngine] = field(default_factory=list)  # every engine built, latest last
    name: str = "fake"

    @property
    def engine(self) -> FakeEngine:
        return self.engines[-1]


@contextmanager
def fake_app(
    tmp: Path, monkeypatch: Any, make_engine: Callable[[], FakeEngine] = FakeEngine, *, name: str = "fake",
    **sections: dict[str, Any],
) -> Iterator[FakeServer]:
    """The real app (auth off) serving one model, `name`, whose engine is `make_engine()`.

    The model directory holds an empty `NAME.gguf` so the manager and Ollama's
    routes find the model by name; loading it builds a FakeEngine instead.
    """
    from fastapi.testclient import TestClient

    from endpoints.app import create_app
    from tests.conftest import make_config, wait_loaded

    model_dir = tmp / "models"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / f"{name}.gguf").write_bytes(b"")
    server = FakeServer(client=None, name=name)

    def factory() -> FakeEngine:
        engine = make_engine()
        server.engines.append(engine)
        return engine

    install_fake_loader(monkeypatch, factory)
    network = {"disable_auth": True, **sections.pop("network", {})}
    model = {"model_name": name, **sections.pop("model", {})}
    config = make_config(tmp, model_dir, network=network, model=model, **sections)
    with TestClient(create_app(config)) as client:
        wait_loaded(client, timeout=20)
        server.client = client
        yield server
