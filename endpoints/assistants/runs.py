"""Assistants API v2 run routes: create (streamed or in the background), create a thread and run it,
retrieve, list, update, cancel, submit tool outputs, and run steps."""

from __future__ import annotations

import time
from typing import Any

from fastapi import Depends, Request
from starlette.responses import JSONResponse, Response

from common.config.loader import ParleyConfig
from common.errors import BadRequestError, Dialect
from common.generation.pipeline import start_generation
from common.models.presets import PresetState
from common.store.ids import id_for
from common.store.store import Owner, Record, Store
from endpoints.assistants import execution, objects
from endpoints.assistants.protocol import (RunCreate, RunUpdate, SubmitToolOutputs, ThreadAndRunCreate,
                                           ThreadCreate, TruncationStrategy)
from endpoints.assistants.router import ASSISTANTS, ListQuery, add_messages, create_thread
from endpoints.http.deps import get_config, get_presets, lease_model, log_unknown_fields
from endpoints.http.request_context import RequestContext, request_hooks
from endpoints.http.route import api_router
from endpoints.http.store import get_store, owner_of
from endpoints.http.streaming import sse_response

router = api_router(ASSISTANTS, tags=["OpenAI Assistants (beta)"])


def run_tasks(request: Request) -> execution.RunTasks:
    return request.app.state.run_tasks


def settings_of(run: dict[str, Any], *, continuing: bool = False) -> execution.RunSettings:
    choice = run.get("tool_choice")
    if continuing and choice not in (None, "auto", "none"):
        choice = "none"  # the forced call was made: what follows its output is the answer, in text
    return execution.RunSettings(
        instructions=run.get("instructions"), tools=run.get("tools") or [], temperature=run.get("temperature"),
        top_p=run.get("top_p"), max_completion_tokens=run.get("max_completion_tokens"),
        max_prompt_tokens=run.get("max_prompt_tokens"), tool_choice=choice if choice != "auto" else None,
        parallel_tool_calls=run.get("parallel_tool_calls"), response_format=run.get("response_format"),
        truncation=TruncationStrategy.model_validate(run.get("truncation_strategy") or {}),
    )


async def history_of(store: Store, thread_id: str) -> list[dict[str, Any]]:
    return [{"role": r.data["role"], "content": objects.message_text(r.data)}
            for r in await store.children(thread_id, "message")]


class RunStarter:
    """What starting (or continuing) a run needs from the request: its dependencies, gathered once."""

    def __init__(self, request: Request, config: ParleyConfig = Depends(get_config),
                 presets: PresetState = Depends(get_presets), ctx: RequestContext = Depends(request_hooks),
                 store: Store = Depends(get_store), owner: Owner = Depends(owner_of),
                 tasks: execution.RunTasks = Depends(run_tasks)) -> None:
        self.request, self.config, self.presets, self.ctx = request, config, presets, ctx
        self.store, self.owner, self.tasks = store, owner, tasks

    async def start(self, record: Record, model_name: str | None, *, stream: bool, continuing: bool,
                    head: list[tuple[str, dict[str, Any]]], undo: Any) -> Response:
        """Plan and queue the run's generation; on a refusal, `undo()` and re-raise. Then stream it, or run it
        in the background and answer with the run."""
        run = record.data
        with await lease_model(self.request, model_name) as lease:
            try:
                model = lease.model
                run["model"] = model.name
                history = await history_of(self.store, run["thread_id"])
                tail = execution.tool_turn_messages(run.get("_turns", []))
                plan, _ = execution.plan_run(model, settings_of(run, continuing=continuing), history, tail,
                                             self.config, model.preset(self.presets.active))
                stream_hooks = self.ctx if stream else execution.DetachedHooks(self.ctx)
                generation = await start_generation(model, plan.prompt, plan.params, hooks=stream_hooks,
                                                    constraint=plan.constraint,
                                                    default_max_tokens=self.config.model.default_max_tokens)
            except BaseException:
                await undo()
                raise
            job = execution.RunJob(self.store, self.owner, record, generation, plan, lease.detach())
        if stream:
            unwatch = self.tasks.watch(run["id"], generation.cancel)

            def closed() -> None:
                unwatch()
                if not job.started:
                    self.tasks.start(run["id"], execution.unstarted(job))

            return sse_response(execution.stream(head, job), Dialect.OPENAI, done_marker=False,
                                handles=generation.handles, on_close=closed)
        answer = objects.public(dict(run))
        self.tasks.start(run["id"], execution.drain(job))
        return JSONResponse(answer)


def new_run(thread_id: str, body: RunCreate, assistant: dict[str, Any]) -> dict[str, Any]:
    instructions = body.instructions if body.instructions is not None else assistant.get("instructions")
    if body.additional_instructions:
        instructions = ((instructions or "") + "\n\n" + body.additional_instructions).strip()
    truncation = body.truncation_strategy or TruncationStrategy()
    return {
        "id": id_for("run"), "object": "thread.run", "created_at": int(time.time()), "thread_id": thread_id,
        "assistant_id": assistant["id"], "status": "queued", "required_action": None, "last_error": None,
        "expires_at": None, "started_at": None, "cancelled_at": None, "failed_at": None, "completed_at": None,
        "incomplete_details": None, "model": body.model or assistant.get("model") or "",
        "instructions": instructions, "tools": body.tools if body.tools is not None else assistant.get("tools", []),
        "metadata": body.metadata or {}, "usage": None,
        "temperature": body.temperature if body.temperature is not None else assistant.get("temperature"),
        "top_p": body.top_p if body.top_p is not None else assistant.get("top_p"),
        "max_prompt_tokens": body.max_prompt_tokens, "max_completion_tokens": body.max_completion_tokens,
        "truncation_strategy": truncation.model_dump(), "response_format": body.response_format or "auto",
        "tool_choice": body.tool_choice or "auto", "parallel_tool_calls": body.parallel_tool_calls is not False,
    }


async def _create(starter: RunStarter, thread_id: str, body: RunCreate,
                  head: list[tuple[str, dict[str, Any]]] | None = None) -> Response:
    store, owner = starter.store, starter.owner
    await store.get("thread", thread_id, owner, param="thread_id")
    assistant = (await store.get("assistant", body.assistant_id, owner, param="assistant_id")).data
    run = new_run(thread_id, body, assistant)
    record = await store.add("run", owner, run, id=run["id"], parent_id=thread_id, status="queued",
                             active_on=thread_id, created_at=run["created_at"])
    added = await _added(starter, thread_id, body, record)

    async def undo() -> None:
        await store.delete_children(thread_id, [run["id"], *added])

    events = (head or []) + [("thread.run.created", run), ("thread.run.queued", run)]
    return await starter.start(record, run["model"] or None, stream=body.stream, continuing=False,
                               head=events, undo=undo)


async def _added(starter: RunStarter, thread_id: str, body: RunCreate, record: Record) -> list[str]:
    try:
        messages = await add_messages(starter.store, starter.owner, thread_id, body.additional_messages or [],
                                      starter.config, "additional_messages")
    except BaseException:
        await starter.store.delete_children(thread_id, [record.id])
        raise
    return [m["id"] for m in messages]


@router.post("/v1/threads/{thread_id}/runs")
async def create_run(thread_id: str, body: RunCreate, starter: RunStarter = Depends()) -> Response:
    log_unknown_fields(body, "/v1/threads/{thread_id}/runs")
    return await _create(starter, thread_id, body)


@router.post("/v1/threads/runs")
async def create_thread_and_run(body: ThreadAndRunCreate, starter: RunStarter = Depends()) -> Response:
    thread = await create_thread(body.thread or ThreadCreate(), starter.config, starter.store, starter.owner)
    return await _create(starter, thread["id"], body, head=[("thread.created", thread)])


@router.get("/v1/threads/{thread_id}/runs")
async def list_runs(thread_id: str, q: ListQuery = Depends(), store: Store = Depends(get_store),
                    owner: Owner = Depends(owner_of)) -> Any:
    await store.get("thread", thread_id, owner, param="thread_id")
    return objects.page_body(await store.list("run", owner, parent_id=thread_id, **q.kw))


async def _run(store: Store, owner: Owner, thread_id: str, run_id: str) -> Record:
    await store.get("thread", thread_id, owner, param="thread_id")
    return await store.get("run", run_id, owner, param="run_id", parent_id=thread_id)


@router.get("/v1/threads/{thread_id}/runs/{run_id}")
async def get_run(thread_id: str, run_id: str, store: Store = Depends(get_store),
                  owner: Owner = Depends(owner_of)) -> Response:
    record = await _run(store, owner, thread_id, run_id)
    active = record.data["status"] in ("queued", "in_progress", "cancelling")
    return JSONResponse(objects.public(record.data),
                        headers={"openai-poll-after-ms": execution.POLL_AFTER_MS} if active else None)


@router.post("/v1/threads/{thread_id}/runs/{run_id}")
async def update_run(thread_id: str, run_id: str, body: RunUpdate, store: Store = Depends(get_store),
                     owner: Owner = Depends(owner_of)) -> Any:
    record = await _run(store, owner, thread_id, run_id)
    if body.metadata is not None:
        record.data["metadata"] = body.metadata
        await store.save(record, expect_status=[record.status or ""])
    return objects.public(record.data)


@router.post("/v1/threads/{thread_id}/runs/{run_id}/cancel")
async def cancel_run(thread_id: str, run_id: str, store: Store = Depends(get_store), owner: Owner = Depends(owner_of),
                     tasks: execution.RunTasks = Depends(run_tasks)) -> Any:
    record = await _run(store, owner, thread_id, run_id)
    active = ("queued", "in_progress", "requires_action")
    if record.status not in active:
        raise BadRequestError(f"Run {run_id} is {record.status}; only a queued, in_progress or requires_action run "
                              "can be cancelled.", param="run_id")
    record.status = "cancelled"
    record.data.update(status="cancelled", cancelled_at=int(time.time()), required_action=None)
    if not await store.save(record, expect_status=active, release=True):
        record = await _run(store, owner, thread_id, run_id)  # it ended meanwhile: answer how
    tasks.cancel(run_id)
    return objects.public(record.data)


@router.post("/v1/threads/{thread_id}/runs/{run_id}/submit_tool_outputs")
async def submit_tool_outputs(thread_id: str, run_id: str, body: SubmitToolOutputs,
                              starter: RunStarter = Depends()) -> Response:
    store, owner = starter.store, starter.owner
    record = await _run(store, owner, thread_id, run_id)
    run = record.data
    if record.status != "requires_action" or not run.get("_turns"):
        raise BadRequestError(f"Run {run_id} is {record.status}, not waiting for tool outputs; submit them while it "
                              "is requires_action.", param="run_id")
    turn = run["_turns"][-1]
    expected = {c["id"] for c in turn["calls"]}
    outputs: dict[str, str] = {}
    for i, out in enumerate(body.tool_outputs):
        if out.tool_call_id not in expected:
            raise BadRequestError(f"tool_outputs[{i}].tool_call_id '{out.tool_call_id}' is not a call this run "
                                  f"waits on; expected {sorted(expected)}.", param=f"tool_outputs[{i}].tool_call_id")
        outputs[out.tool_call_id] = out.output
    missing = expected - set(outputs)
    if missing:
        raise BadRequestError(f"Outputs are missing for tool calls {sorted(missing)}; submit one for each call.",
                              param="tool_outputs")
    turn["outputs"] = outputs
    record.status = "queued"
    run.update(status="queued", required_action=None)
    if not await store.save(record, expect_status=["requires_action"]):
        raise BadRequestError(f"Run {run_id} changed while the outputs were submitted (cancelled?); retrieve it.",
                              param="run_id")
    step = await store.get("step", turn["step_id"], owner, param="run_id", parent_id=run_id)
    for call in step.data["step_details"]["tool_calls"]:
        call["function"]["output"] = outputs.get(call["id"])
    step.data.update(status="completed", completed_at=int(time.time()))
    await store.save(step)

    async def undo() -> None:
        record.status = "failed"
        run.update(status="failed", failed_at=int(time.time()),
                   last_error={"code": "server_error", "message": "The run could not continue; see the error."})
        await store.save(record, release=True)

    return await starter.start(record, run.get("model") or None, stream=body.stream, continuing=True,
                               head=[("thread.run.step.completed", step.data), ("thread.run.queued", run)], undo=undo)


@router.get("/v1/threads/{thread_id}/runs/{run_id}/steps")
async def list_steps(thread_id: str, run_id: str, q: ListQuery = Depends(), store: Store = Depends(get_store),
                     owner: Owner = Depends(owner_of)) -> Any:
    await _run(store, owner, thread_id, run_id)
    return objects.page_body(await store.list("step", owner, parent_id=run_id, **q.kw))


@router.get("/v1/threads/{thread_id}/runs/{run_id}/steps/{step_id}")
async def get_step(thread_id: str, run_id: str, step_id: str, store: Store = Depends(get_store),
                   owner: Owner = Depends(owner_of)) -> Any:
    await _run(store, owner, thread_id, run_id)
    return (await store.get("step", step_id, owner, param="step_id", parent_id=run_id)).data
