"""Running an Assistants run: the thread as a prompt (trimmed as truncation_strategy says), the generation
driven into a message or tool calls, the run's states written to the store, and the SDK's stream events.

`plan_run` builds the chat plan (the chat path's template, tools and
constraints) from the thread; `execute` drives one generation of a run and
yields `(event, object)` pairs: a streaming route frames them as SSE, a
background run (`RunTasks`) drains them. A run whose output calls tools stops
in `requires_action`, keeping its claim on the thread until tool outputs
continue it. Every state change is a conditional write: a run cancelled
meanwhile (by this process or another one sharing the database) is never
written back as completed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from loguru import logger
from pydantic import ValidationError

from backends.base import Finished, FinishReason, GenerationHandle, TextDelta
from backends.sampling import SamplingParams
from common.config.loader import ParleyConfig
from common.errors import BadRequestError, ContextLengthExceededError
from common.formats.output import ChatOutput
from common.generation.hooks import GenerationHooks
from common.generation.pipeline import Generation
from common.models.manager import LoadedModel
from common.models.presets import Preset
from common.store.ids import id_for
from common.store.store import Owner, Record, Store
from endpoints.assistants import objects
from endpoints.assistants.protocol import TruncationStrategy
from endpoints.http.request_context import ObservedHandle, RequestContext
from endpoints.http.streaming import dumps, error_of
from endpoints.openai.mapping import ChatPlan, chat_plan
from endpoints.openai.protocol import ChatCompletionRequest

POLL_AFTER_MS = "200"  # the openai-poll-after-ms a run in progress answers with
STATUS_CHECK_SECONDS = 0.5  # how often a generating run looks for a cancel made by another process


class DetachedHooks(GenerationHooks):
    """A background run's hooks: the creating request's caps, admission and rate limits, with token
    accounting that lasts as long as the generation (not only as long as the request)."""

    def __init__(self, ctx: RequestContext) -> None:
        self._ctx = ctx

    def fit(self, n_prompt: int, prompt_param: str, requested: int | None) -> int | None:
        return self._ctx.fit(n_prompt, prompt_param, requested)

    def record_prompt(self, model: str, n_prompt: int, text: str | None, params: SamplingParams) -> None:
        self._ctx.record_prompt(model, n_prompt, text, params)

    async def admit(self, n: int) -> None:
        await self._ctx.admit(n)

    def observe(self, handle: GenerationHandle, model: str, *, counts_prompt: bool) -> GenerationHandle:
        return ObservedHandle(handle, self._ctx, model, counts_prompt=counts_prompt)


class RunCancelled(Exception):
    """The run's generation ended cancelled (a cancel request, a client gone)."""


class RunTasks:
    """The runs executing in this process (on app.state.run_tasks): background runs as tasks, streamed runs
    by their generation; a cancel request or the shutdown stops them."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._streams: dict[str, Callable[[], None]] = {}

    def start(self, run_id: str, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work, name=f"run {run_id}")
        self._tasks[run_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(run_id, None))

    def watch(self, run_id: str, cancel: Callable[[], None]) -> Callable[[], None]:
        """A streamed run: `cancel` stops it; call the returned function when the stream ends."""
        self._streams[run_id] = cancel
        return lambda: self._streams.pop(run_id, None) and None

    def cancel(self, run_id: str) -> bool:
        task = self._tasks.get(run_id)
        if task is not None:
            task.cancel()
            return True
        stop = self._streams.get(run_id)
        if stop is not None:
            stop()
        return stop is not None

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {dumps(objects.public(data))}\n\n"


DONE = "event: done\ndata: [DONE]\n\n"


# -- the prompt -----------------------------------------------------------------------------
def chat_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    for i, tool in enumerate(tools):
        if tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise BadRequestError(
                f"tools[{i}] is of type '{tool.get('type')}'; runs here call function tools only "
                "({'type': 'function', 'function': {'name': ..., 'parameters': {...}}}).", param=f"tools[{i}].type",
            )
    return tools or None


def tool_turn_messages(turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The tool calls of this run so far, each answered by its output, as chat messages."""
    out: list[dict[str, Any]] = []
    for turn in turns:
        out.append({"role": "assistant", "content": None, "tool_calls": turn["calls"]})
        for call in turn["calls"]:
            out.append({"role": "tool", "tool_call_id": call["id"], "content": turn["outputs"].get(call["id"], "")})
    return out


@dataclass(frozen=True)
class RunSettings:
    """What a run generates with: the run's fields over the assistant's."""

    instructions: str | None
    tools: list[dict[str, Any]]
    temperature: float | None
    top_p: float | None
    max_completion_tokens: int | None
    max_prompt_tokens: int | None
    tool_choice: Any
    parallel_tool_calls: bool | None
    response_format: Any
    truncation: TruncationStrategy

    def chat_request(self, messages: list[dict[str, Any]]) -> ChatCompletionRequest:
        fmt = self.response_format if isinstance(self.response_format, dict) else None
        fields = {"messages": messages, "temperature": self.temperature, "top_p": self.top_p,
                  "max_tokens": self.max_completion_tokens, "tools": chat_tools(self.tools),
                  "tool_choice": self.tool_choice, "parallel_tool_calls": self.parallel_tool_calls,
                  "response_format": fmt}
        try:
            return ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(x) for x in err.get("loc", ()))
            raise BadRequestError(f"Invalid run settings: {where}: {err.get('msg')}.", param=where or None) from None


def plan_run(model: LoadedModel, settings: RunSettings, history: list[dict[str, Any]], tail: list[dict[str, Any]],
             config: ParleyConfig, preset: Preset | None) -> tuple[ChatPlan, int]:
    """The chat plan of a run, with the thread's oldest messages dropped until the prompt fits (auto) or the
    last N kept (last_messages). Returns the plan and how many messages were dropped; an oversized thread
    (its last message alone does not fit) is a 400 naming thread_id."""
    n_ctx = model.info.n_ctx
    if settings.truncation.type == "last_messages" and settings.truncation.last_messages:
        history = history[-settings.truncation.last_messages:]
    reserve = settings.max_completion_tokens or config.model.default_max_tokens or max(16, n_ctx // 4)
    budget = min(n_ctx - min(reserve, n_ctx // 2), settings.max_prompt_tokens or n_ctx)
    # Cheap first cut by characters: drop what certainly cannot fit before tokenizing.
    while len(history) > 1 and not model.may_fit(sum(len(str(m.get("content") or "")) for m in history), budget):
        history = history[1:]
    system = [{"role": "system", "content": settings.instructions}] if settings.instructions else []
    dropped = 0
    while True:
        try:
            plan = chat_plan(settings.chat_request(system + history + tail), model, config.model, preset)
            over = len(plan.prompt.tokens) - budget
        except ContextLengthExceededError:
            plan, over = None, n_ctx
        if over <= 0 and plan is not None:
            return plan, dropped
        if len(history) <= 1:
            raise ContextLengthExceededError(
                f"This thread does not fit the model's context ({n_ctx} tokens, {budget} for the prompt) even "
                "with only its last message. Shorten the last message, or start a new thread.", param="thread_id",
            )
        drop = max(1, min(len(history) - 1, len(history) * max(over, 1) // max(n_ctx, 1)))
        history = history[drop:]
        dropped += drop


def usage_add(run: dict[str, Any], prompt: int, completion: int) -> None:
    before = run.get("usage") or objects.usage_body(0, 0)
    run["usage"] = objects.usage_body(before["prompt_tokens"] + prompt, before["completion_tokens"] + completion)


# -- one generation of a run --------------------------------------------------------------
@dataclass
class RunJob:
    """A run being executed: where it is stored and how it is generated."""

    store: Store
    owner: Owner
    record: Record  # the run
    generation: Generation
    plan: ChatPlan
    release: Callable[[], None]  # gives the model lease back
    started: bool = False

    @property
    def run(self) -> dict[str, Any]:
        return self.record.data

    async def write(self, status: str, expect: tuple[str, ...], *, release: bool = False, **fields: Any) -> bool:
        self.record.data.update(status=status, **fields)
        self.record.status = status
        return await self.store.save(self.record, expect_status=expect, release=release)


async def execute(job: RunJob) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """Drive the run's generation: (SDK event name, object) pairs, ending in completed, requires_action,
    incomplete or failed. Leaving early (a client gone, a cancel) leaves the run cancelled."""
    run = job.run
    job.started = True
    settled = False
    try:
        if not await job.write("in_progress", ("queued", "in_progress"), started_at=run.get("started_at") or
                               int(time.time())):
            settled = True
            return
        yield "thread.run.in_progress", run
        async for pair in _generate(job):
            yield pair
        settled = True
    except RunCancelled:
        pass  # `finally` marks it cancelled (as it does when this task is cancelled)
    except Exception as exc:  # noqa: BLE001 - the run fails with the error; the stream says so
        err = error_of(exc)
        settled = True
        if await job.write("failed", objects.ACTIVE, release=True, failed_at=int(time.time()),
                           last_error={"code": "server_error", "message": err.message}):
            yield "thread.run.failed", run
    finally:
        job.generation.cancel()
        job.release()
        if not settled:
            await _abandon(job)


async def _abandon(job: RunJob) -> None:
    """The run's consumer left before it ended (client gone, cancel, shutdown): it ends cancelled."""
    try:
        await asyncio.shield(job.write("cancelled", ("queued", "in_progress"), release=True,
                                       cancelled_at=int(time.time())))
    except BaseException as exc:  # noqa: BLE001 - best effort while being torn down
        logger.warning("Could not mark run {} cancelled: {!r}", job.run["id"], exc)


async def _still_wanted(job: RunJob) -> None:
    """Raise RunCancelled when the stored run was cancelled meanwhile (maybe through another process)."""
    stored = await job.store.find("run", job.run["id"], Owner(job.owner.id, admin=True))
    if stored is None or stored.status not in ("queued", "in_progress"):
        raise RunCancelled()


async def _generate(job: RunJob) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    run = job.run
    thread_id = run["thread_id"]
    message = objects.message_body(id_for("message"), thread_id, "assistant", "", assistant_id=run["assistant_id"],
                                   run_id=run["id"], status="in_progress")
    step = objects.step_body(id_for("step"), run, "message_creation",
                             {"type": "message_creation", "message_creation": {"message_id": message["id"]}})
    parser = ChatOutput(job.plan.options)
    text: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    announced = False
    finish: Finished | None = None

    def announce() -> list[tuple[str, dict[str, Any]]]:
        nonlocal announced
        announced = True
        return [("thread.run.step.created", step), ("thread.run.step.in_progress", step),
                ("thread.message.created", message), ("thread.message.in_progress", message)]

    checked = time.monotonic()
    async with aclosing(job.generation.events()) as events:
        async for _, ev in events:
            if isinstance(ev, TextDelta):
                if time.monotonic() - checked > STATUS_CHECK_SECONDS:
                    await _still_wanted(job)
                    checked = time.monotonic()
                deltas = parser.feed(ev.text)
            else:
                failure = job.generation.failure(ev)
                if failure is not None:
                    raise failure
                finish, deltas = ev, parser.finish()
            if deltas.content:
                for pair in ([] if announced else announce()):
                    yield pair
                text.append(deltas.content)
                yield "thread.message.delta", {"id": message["id"], "object": "thread.message.delta", "delta": {
                    "content": [{"index": 0, "type": "text", "text": {"value": deltas.content, "annotations": []}}]}}
            for d in deltas.tool_calls:
                call = calls.setdefault(d.index, {"id": d.id, "type": "function",
                                                  "function": {"name": d.name, "arguments": ""}})
                call["function"]["arguments"] += d.arguments_fragment
    assert finish is not None
    if finish.reason is FinishReason.CANCELLED:
        raise RunCancelled()
    usage_add(run, finish.usage.prompt_tokens, finish.usage.completion_tokens)
    now = int(time.time())
    if text or not calls:
        for pair in ([] if announced else announce()):
            yield pair
        message.update(status="completed", completed_at=now,
                       content=[{"type": "text", "text": {"value": "".join(text), "annotations": []}}])
        step.update(status="completed", completed_at=now)
        await job.store.add_many([("message", message, message["id"], thread_id, None, None, None),
                                  ("step", step, step["id"], run["id"], None, None, None)], job.owner)
        yield "thread.message.completed", message
        yield "thread.run.step.completed", step
    if calls:
        tool_calls = [calls[i] for i in sorted(calls)]
        tool_step = objects.step_body(id_for("step"), run, "tool_calls", {"type": "tool_calls", "tool_calls": [
            {**c, "function": {**c["function"], "output": None}} for c in tool_calls]})
        await job.store.add("step", job.owner, tool_step, id=tool_step["id"], parent_id=run["id"])
        yield "thread.run.step.created", tool_step
        run.setdefault("_turns", []).append({"calls": tool_calls, "outputs": {}, "step_id": tool_step["id"]})
        action = {"type": "submit_tool_outputs", "submit_tool_outputs": {"tool_calls": tool_calls}}
        if await job.write("requires_action", ("in_progress",), required_action=action):
            yield "thread.run.requires_action", run
        return
    if finish.reason is FinishReason.LENGTH:
        if await job.write("incomplete", ("in_progress",), release=True, required_action=None,
                           incomplete_details={"reason": "max_completion_tokens"}, completed_at=now):
            yield "thread.run.incomplete", run
        return
    if await job.write("completed", ("in_progress",), release=True, required_action=None, completed_at=now):
        yield "thread.run.completed", run


async def unstarted(job: RunJob) -> None:
    """A streamed run whose client left before its stream began: it ends cancelled, the model is let go."""
    if not job.started:
        job.generation.cancel()
        job.release()
        await _abandon(job)


async def drain(job: RunJob) -> None:
    """A background run: its events go nowhere; its states go to the store."""
    async with aclosing(execute(job)) as events:
        async for _ in events:
            pass


async def stream(head: list[tuple[str, dict[str, Any]]], job: RunJob) -> AsyncIterator[str]:
    for event, data in head:
        yield sse(event, data)
    async with aclosing(execute(job)) as events:
        async for event, data in events:
            yield sse(event, data)
    yield DONE

