"""Ollama response framing: NDJSON generation streams, model listings, pulls.

Generation output is split by common/formats/output.py: `thinking` (when the request
asked for it) and `message.tool_calls` as Ollama shapes them, with arguments
as an object; a streamed call is sent once, in the chunk where it completes.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from loguru import logger

from backends.base import Finished, FinishReason, TextDelta
from backends.registry import find_projector, gguf_file
from common.formats.output import ChatDeltas, ChatOutput, OutputOptions, parse_whole
from common.downloads.jobs import DownloadJob, DownloadManager
from common.downloads.transfer import DownloadPlan, DownloadRequest
from common.errors import APIError
from common.generation.embeddings import Embeddings
from common.generation.pipeline import Generation
from common.models.gguf_info import GGUFInfo, parameter_size, read_gguf_info_async
from common.models.manager import LoadedModel, ModelFile, ModelManager
from endpoints.http.streaming import dumps
from common.formats.tools import ToolCall, ToolCallDelta
from endpoints.ollama.mapping import ollama_name

DONE_REASONS = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}
# A model without keep_alive stays loaded: /api/ps shows a far expiry, as Ollama does for keep_alive -1.
NEVER_EXPIRES = "2318-01-01T00:00:00Z"


@dataclass
class Timing:
    """When the request started and how long a load it triggered took."""

    started: float = field(default_factory=time.perf_counter)
    load_ns: int = 0


def embed_body(model_name: str, result: Embeddings | None, timing: Timing) -> dict[str, Any]:
    """/api/embed's answer; no result (a request without input) only reports the load."""
    return {
        "model": model_name,
        "embeddings": [] if result is None else result.vectors.tolist(),
        "total_duration": _ns(time.perf_counter() - timing.started),
        "load_duration": timing.load_ns,
        "prompt_eval_count": 0 if result is None else result.prompt_tokens,
    }


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


def done_fields(finish: Finished, timing: Timing) -> dict[str, Any]:
    usage = finish.usage
    return {
        "done": True,
        "done_reason": DONE_REASONS.get(finish.reason, "stop"),
        "total_duration": _ns(time.perf_counter() - timing.started),
        "load_duration": timing.load_ns,
        "prompt_eval_count": usage.prompt_tokens,
        "prompt_eval_duration": _ns(usage.prompt_seconds),
        "eval_count": usage.completion_tokens,
        "eval_duration": _ns(usage.generation_seconds),
    }


def status_body(model_name: str, reason: str, *, chat: bool) -> dict[str, Any]:
    """The answer to an empty request: the model was loaded ("load") or unloaded ("unload")."""
    body = {"model": ollama_name(model_name), "created_at": now_rfc3339(), **_text_part("", chat)}
    return body | {"done": True, "done_reason": reason}


# -- generation ----------------------------------------------------------------
def _text_part(
    text: str, chat: bool, thinking: str | None = None, tool_calls: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    if not chat:
        return {"response": text, **({"thinking": thinking} if thinking else {})}
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if thinking:
        message["thinking"] = thinking
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"message": message}


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def tool_calls_body(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """Ollama's tool_calls: `{"function": {"name", "arguments": {...}}}`, arguments an object."""
    out = []
    for call in calls:
        arguments = call.arguments_object()
        out.append({"function": {"name": call.name, "arguments": arguments if isinstance(arguments, dict) else {}}})
    return out


class CallAssembler:
    """Streamed tool-call deltas -> whole calls, each handed out once, as soon as it is complete:
    its arguments are a whole JSON object, a later call started, or the output ended (a call
    the length limit cut short is dropped)."""

    def __init__(self) -> None:
        self._heads: dict[int, tuple[str, str]] = {}
        self._args: dict[int, list[str]] = {}
        self._sent: set[int] = set()

    def add(self, deltas: list[ToolCallDelta], *, final: bool = False, cut: bool = False) -> list[ToolCall]:
        for d in deltas:
            if d.id is not None and d.name is not None:
                self._heads[d.index] = (d.id, d.name)
            self._args.setdefault(d.index, []).append(d.arguments_fragment)
        out: list[ToolCall] = []
        last = max(self._heads, default=-1)
        for i in sorted(self._heads.keys() - self._sent):
            call = ToolCall(*self._heads[i], "".join(self._args.get(i, [])))
            whole = _is_json(call.arguments)
            if not (final or i < last or (whole and isinstance(call.arguments_object(), dict))):
                break  # still being written
            self._sent.add(i)
            if whole or not cut:
                out.append(call)
        return out


def _delta_part(d: ChatDeltas, calls: list[ToolCall], chat: bool) -> dict[str, Any] | None:
    if not (d.content or d.reasoning or calls):
        return None
    return _text_part(d.content, chat, d.reasoning, tool_calls_body(calls))


async def generation_stream(
    generation: Generation, model_name: str, timing: Timing, options: OutputOptions, *, chat: bool
) -> AsyncIterator[str]:
    """NDJSON chunks `{model, created_at, response|message, done:false}`, then the final one."""
    name = ollama_name(model_name)
    output, assembler = ChatOutput(options), CallAssembler()

    def chunk(part: dict[str, Any]) -> str:
        return dumps({"model": name, "created_at": now_rfc3339(), **part, "done": False}) + "\n"

    async with aclosing(generation.events()) as events:
        async for _, ev in events:
            if isinstance(ev, TextDelta):
                d = output.feed(ev.text) if ev.text else ChatDeltas()
                part = _delta_part(d, assembler.add(d.tool_calls), chat)
                if part is not None:
                    yield chunk(part)
                continue
            if ev.reason is FinishReason.CANCELLED:
                return
            failure = generation.failure(ev)
            if failure is not None:
                raise failure  # engine failure or unload: an {"error"} line
            d = output.finish()
            part = _delta_part(d, assembler.add(d.tool_calls, final=True, cut=ev.reason is FinishReason.LENGTH), chat)
            if part is not None:
                yield chunk(part)
            body = {"model": name, "created_at": now_rfc3339(), **_text_part("", chat)}
            yield dumps(body | done_fields(ev, timing)) + "\n"


async def generation_response(
    generation: Generation, model_name: str, timing: Timing, options: OutputOptions, *, chat: bool
) -> dict[str, Any]:
    result = (await generation.collect())[0]
    assert result.finish is not None  # collect raises for a choice without one
    reasoning, content, calls = parse_whole(result.text, options)
    if result.finish.reason is FinishReason.LENGTH:
        calls = [c for c in calls if _is_json(c.arguments)]  # the limit cut the last call short
    part = _text_part(content, chat, reasoning, tool_calls_body(calls))
    body = {"model": ollama_name(model_name), "created_at": now_rfc3339(), **part}
    return body | done_fields(result.finish, timing)


# -- model listings ----------------------------------------------------------------
def digest(entry: ModelFile) -> str:
    """A stable id for one version of a model file: sha256 of name, size and mtime.

    Not a content hash (hashing gigabytes per listing would be slow); it
    changes when the file is replaced, which is what clients use it for.
    """
    return hashlib.sha256(f"{entry.name}:{entry.size_bytes}:{entry.modified!r}".encode()).hexdigest()


async def file_info(entry: ModelFile) -> GGUFInfo | None:
    """GGUF metadata of a model file or of the first GGUF in a model folder."""
    if entry.format == "gguf":
        return await read_gguf_info_async(entry.path)
    if entry.path.is_dir() and any(entry.path.glob("*.gguf")):
        return await read_gguf_info_async(gguf_file(entry.path))
    return None


def details(info: GGUFInfo | None) -> dict[str, Any]:
    family = info.architecture if info else ""
    return {
        "parent_model": "",
        "format": "gguf" if info else "safetensors",
        "family": family,
        "families": [family] if family else None,
        "parameter_size": parameter_size(info) if info else "",
        "quantization_level": info.file_type if info else "",
    }


async def tags_body(models: ModelManager) -> dict[str, Any]:
    out = []
    for entry in models.available():
        info = await file_info(entry)
        out.append({
            "name": ollama_name(entry.name),
            "model": ollama_name(entry.name),
            "modified_at": rfc3339(entry.modified),
            "size": entry.size_bytes,
            "digest": digest(entry),
            "details": details(info),
        })
    return {"models": out}


async def ps_body(models: ModelManager) -> dict[str, Any]:
    out = []
    files = {m.name: m for m in models.available()}
    for name, model in models.loaded.items():
        entry = files.get(name)
        info = await file_info(entry) if entry else None
        out.append({
            "name": ollama_name(name),
            "model": ollama_name(name),
            "size": model.info.size_bytes or (entry.size_bytes if entry else 0),
            "digest": digest(entry) if entry else "",
            "details": details(info),
            "expires_at": _expires_at(model),
            "size_vram": 0,
            "context_length": model.info.n_ctx,
        })
    return {"models": out}


def _expires_at(model: LoadedModel) -> str:
    """When keep_alive unloads the model if it stays idle (a busy model: keep_alive from now)."""
    if model.keep_alive is None:
        return NEVER_EXPIRES
    left = max(0.0, model.keep_alive - model.idle_seconds())
    return datetime.fromtimestamp(time.time() + left, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _template_source(models: ModelManager, loaded: LoadedModel | None, info: GGUFInfo | None) -> str:
    """The chat template the model uses (or will use once loaded)."""
    if loaded is not None:
        return loaded.template.source if loaded.template else ""
    configured = models.template_by_name(models.default_options.prompt_template)
    if configured is not None:
        return configured.source
    if info is not None and info.chat_template:
        return info.chat_template
    fallback = models.template_by_name("chatml")
    return fallback.source if fallback else ""


def _parameters(stops: list[str], n_ctx: int | None) -> str:
    """Ollama's `parameters` text: one `name value` line per Modelfile parameter."""
    lines = [f"{'stop':<30} {dumps(s)}" for s in stops]
    if n_ctx:
        lines.append(f"{'num_ctx':<30} {n_ctx}")
    return "\n".join(lines)


def _has_projector(entry: ModelFile) -> bool:
    try:
        return find_projector(entry.path, None) is not None
    except (OSError, APIError):
        return False


async def show_body(models: ModelManager, entry: ModelFile) -> dict[str, Any]:
    info = await file_info(entry)
    loaded = models.loaded.get(entry.name)
    template = _template_source(models, loaded, info)
    stops: list[str] = list(loaded.template.metadata.stop_strings) if loaded and loaded.template else []
    eos = loaded.info.eos_token if loaded else (info.eos_token if info else "")
    if eos and eos not in stops:
        stops.append(eos)
    parameters = _parameters(stops, loaded.info.n_ctx if loaded else None)
    modelfile = (
        f"# Modelfile generated by Parley (read-only: manage files in the model directory)\n"
        f"FROM {entry.path.name}\nTEMPLATE {dumps(template)}\n"
        + "".join(f"PARAMETER {line}\n" for line in parameters.splitlines())
    )
    capabilities = ["completion"] + (["tools"] if "tools" in template else [])
    vision = "vision" in loaded.info.modalities if loaded is not None else _has_projector(entry)
    if vision:
        capabilities.append("vision")
    return {
        "license": info.license if info else "",
        "modelfile": modelfile,
        "parameters": parameters,
        "template": template,
        "details": details(info),
        "model_info": dict(info.metadata) if info else {},
        "capabilities": capabilities,
        "modified_at": rfc3339(entry.modified),
    }


# -- pull ------------------------------------------------------------------------
def pick_ggufs(plan: DownloadPlan, include: list[str]) -> DownloadPlan:
    """The GGUF files a pull takes: those of the named quantization, else Q4_K_M as Ollama does, else all."""
    ggufs = [f.path for f in plan.files if f.path.lower().endswith(".gguf")]
    if include:
        ggufs = [f for f in ggufs if any(fnmatch(f, p) for p in include)]
    repo = plan.request.repo_id
    if not ggufs:
        wanted = f" matching {', '.join(include)}" if include else ""
        raise APIError(
            f"'{repo}' has no GGUF file{wanted}. Pick a GGUF repository and a quantization it has "
            "(e.g. hf.co/<owner>/<repo>:Q4_K_M).", status=404, code="model_not_found",
        )
    if not include and len(ggufs) > 1:
        preferred = [f for f in ggufs if "q4_k_m" in f.lower()]
        if preferred:
            logger.info("Pulling {}: no quantization named, taking Q4_K_M like Ollama", repo)
            ggufs = preferred
    return plan.narrowed(ggufs)


async def start_pull(downloads: DownloadManager, req: DownloadRequest) -> DownloadJob:
    """List the repo, settle the GGUF files, start (or join) their download. Errors come before any output."""
    plan = await downloads.plan(replace(req, include=[]))
    job, _joined = downloads.start(pick_ggufs(plan, req.include))
    return job


async def run_pull(downloads: DownloadManager, req: DownloadRequest) -> Path:
    """Pull and wait; a client that leaves only stops waiting (the download finishes in the background)."""
    job = await start_pull(downloads, req)
    return (await job.result()).folder


async def pull_stream(downloads: DownloadManager, req: DownloadRequest) -> AsyncIterator[str]:
    """NDJSON statuses: pulling manifest, pulling <repo> {completed, total}, success; a failure is an {"error"} line."""
    yield dumps({"status": "pulling manifest"}) + "\n"
    job = await start_pull(downloads, req)
    async for progress in job.updates():
        status = {"status": f"pulling {req.repo_id}", "completed": progress.bytes_done, "total": progress.bytes_total}
        yield dumps(status) + "\n"
    result = await job.result()
    logger.info("Pulled {} into {}", req.repo_id, result.folder)
    yield dumps({"status": "success"}) + "\n"
