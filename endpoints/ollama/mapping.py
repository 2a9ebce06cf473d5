"""Ollama request -> model file, prompt, SamplingParams, output constraint and output options.

Sampling follows the shared precedence (common/presets.build_params): Ollama's
defaults < the active sampler preset < the options the client sent < forced
preset fields.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from loguru import logger

from common.formats.output import OutputOptions
from common.config.loader import ModelConfig
from common.formats.constraints import ConstraintSpec
from common.downloads.transfer import DownloadRequest, check_repo_id
from common.errors import BadRequestError, ModelNotFoundError
from common.generation.images import RESOLVED, ImageSource
from common.generation.prompts import Prompt, chat_prompt, text_prompt
from common.models.files import parse_keep_alive
from common.models.manager import LoadedModel, ModelFile, ModelManager
from common.models.presets import Preset, build_params
from backends.base import ImageInput
from backends.sampling import SamplingParams
from endpoints.ollama.protocol import LOAD_TIME_OPTIONS, ChatMessage, ChatRequest, GenerateRequest, KeepAlive, Options

# Ollama's defaults (api.DefaultOptions): clients written for Ollama expect them
# when they send no options, so they apply here instead of the neutral ones.
OLLAMA_DEFAULTS: dict[str, Any] = {
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 0.9,
    "repetition_penalty": 1.1,
    "penalty_range": 64,
}

# Ollama option -> SamplingParams field, for options whose value passes unchanged.
_FIELDS = {
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "typical_p": "typical",
    "repeat_last_n": "penalty_range",
    "repeat_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "mirostat": "mirostat_mode",
    "mirostat_tau": "mirostat_tau",
    "mirostat_eta": "mirostat_eta",
    "tfs_z": "tfs",
}
_OLLAMA_NAME = {v: k for k, v in _FIELDS.items()} | {"max_tokens": "num_predict", "seed": "seed", "stop": "stop"}

LATEST = ":latest"
_ZERO_DURATION = re.compile(r"\+?(?:(?:0+(?:\.0*)?|\.0+)(?:ns|us|µs|ms|s|m|h))+|\+?(?:0+(?:\.0*)?|\.0+)")


# -- model names ---------------------------------------------------------------
def ollama_name(name: str) -> str:
    return f"{name}{LATEST}"


def find_model_file(models: ModelManager, requested: str) -> ModelFile:
    """Resolve an Ollama model name (`name`, `name:latest`, `hf.co/owner/repo[:quant]`)."""
    if not requested:
        raise BadRequestError("'model' is required: name one of the models from GET /api/tags.", param="model")
    name = requested.removesuffix(LATEST)
    if "/" in name:
        # A pulled Hugging Face repo lives in a folder named after the repo.
        name = name.rsplit("/", 1)[-1].split(":", 1)[0]
    available = {m.name: m for m in models.available()}
    stem = name[:-5] if name.lower().endswith(".gguf") else name
    for candidate in (name, stem):
        if candidate in available:
            return available[candidate]
    listing = ", ".join(ollama_name(n) for n in available) or "none"
    hint = ""
    if ":" in name:
        hint = f" Tag '{name.split(':', 1)[1]}' does not exist: models here have only the tag 'latest'."
    raise ModelNotFoundError(
        f"model '{requested}' not found.{hint} Available: {listing}. "
        "Put a GGUF file in the model directory or pull one with POST /api/pull.",
        param="model",
    )


def parse_pull_name(requested: str) -> DownloadRequest:
    """`hf.co/<owner>/<repo>[:<quant>]` or `<owner>/<repo>[:<quant>]` -> a Hugging Face download."""
    name = requested.strip()
    for prefix in ("https://", "http://"):
        name = name.removeprefix(prefix)
    for host in ("hf.co/", "huggingface.co/"):
        name = name.removeprefix(host)
    repo, _, tag = name.partition(":")
    if repo.count("/") != 1:
        raise BadRequestError(
            f"Cannot pull '{requested[:100]}': models come from Hugging Face here; name them "
            "'hf.co/<owner>/<repo>' or '<owner>/<repo>', optionally with ':<quantization>' (e.g. ':Q4_K_M').",
            param="model",
        )
    try:
        check_repo_id(repo)
    except BadRequestError as exc:
        raise BadRequestError(exc.message, param="model") from exc
    include: list[str] = []
    if tag and tag != "latest":
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", tag):
            raise BadRequestError(f"'{tag[:64]}' is not a quantization tag such as Q4_K_M.", param="model")
        include = sorted({f"*{t}*.gguf" for t in (tag, tag.upper(), tag.lower())})
    return DownloadRequest(repo_id=repo, include=include)


# -- keep_alive, format, think ---------------------------------------------------
def is_unload(keep_alive: KeepAlive) -> bool:
    """keep_alive 0 / "0" / "0s" means: unload now."""
    if keep_alive is None or isinstance(keep_alive, bool):
        return False
    if isinstance(keep_alive, (int, float)):
        return keep_alive == 0
    return bool(_ZERO_DURATION.fullmatch(keep_alive.strip()))


def keep_alive_seconds(keep_alive: KeepAlive) -> float | None:
    """Ollama's keep_alive as idle seconds before unloading: a number is seconds, a string a duration
    ("5m", "1h30m"); negative means never (None)."""
    try:
        return parse_keep_alive(keep_alive)
    except ValueError as exc:
        raise BadRequestError(f"keep_alive: {exc}.", param="keep_alive") from None


def format_constraint(fmt: str | dict[str, Any] | None) -> ConstraintSpec | None:
    """`format`: "json" -> any JSON object; a JSON schema object -> output valid against it."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return ConstraintSpec.from_request(response_format={"type": "json_object"})
    if isinstance(fmt, dict):
        try:
            return ConstraintSpec.from_request(json_schema=fmt)
        except BadRequestError as exc:
            message = exc.message.replace("'json_schema'", "'format'").rstrip(". ")
            raise BadRequestError(f"{message}. Fix the JSON schema in 'format' and retry.", param="format") from exc
    raise BadRequestError(f"'format' must be \"json\" or a JSON schema object, got {fmt[:50]!r}.", param="format")


def wants_thinking(think: bool | str | None) -> bool:
    """think: true, or a level ("low", "medium", "high"), asks for the reasoning apart from the answer."""
    if isinstance(think, str):
        return think.lower() not in ("false", "none", "")
    return bool(think)


def thinking_vars(think: bool | str | None) -> dict[str, Any] | None:
    """`think` reaches the chat template as enable_thinking (and reasoning_effort for levels)."""
    if think is None:
        return None
    if isinstance(think, str):
        return {"enable_thinking": wants_thinking(think), "reasoning_effort": think}
    return {"enable_thinking": think}


def output_options(
    model: LoadedModel, prompt: Prompt, mc: ModelConfig, *, think: bool | str | None,
    tools: list[dict[str, Any]] | None = None,
) -> OutputOptions:
    """How to split the output: reasoning only when `think` asks for it, tool calls when tools were sent."""
    return OutputOptions.for_request(
        prompt_text=prompt.text,
        template_source=model.template.source if model.template else None,
        tools=tools,
        tool_choice="auto",  # Ollama has no tool_choice: the model decides
        reasoning=wants_thinking(think) and mc.reasoning_parser,
        start=mc.reasoning_start_marker,
        end=mc.reasoning_end_marker,
        tool_format=mc.tool_format,
    )


# -- messages ------------------------------------------------------------------
def image_sources(images: list[str] | None, where: str) -> list[ImageSource]:
    """Ollama's `images`: base64 strings (a data: URI is accepted too)."""
    return [ImageSource(img, f"{where}[{j}]") for j, img in enumerate(images or [])]


def with_images(text: str, first: int, count: int) -> str | list[dict[str, Any]]:
    """A message's content with its images before its text (as Ollama places them); parts refer to images
    by their index in the request."""
    if not count:
        return text
    return [{"type": RESOLVED, "image": first + k} for k in range(count)] + [{"type": "text", "text": text}]


def chat_messages(messages: list[ChatMessage], model_name: str) -> tuple[list[dict[str, Any]], list[ImageSource]]:
    """Ollama messages -> the dicts chat templates read (tool results carry `name`), and their images."""
    out: list[dict[str, Any]] = []
    sources: list[ImageSource] = []
    for i, msg in enumerate(messages):
        found = image_sources(msg.images, f"messages[{i}].images")
        content = with_images(msg.content or "", len(sources), len(found))
        sources.extend(found)
        m: dict[str, Any] = {**(msg.model_extra or {}), "role": msg.role, "content": content}
        if msg.tool_calls:
            m["tool_calls"] = msg.tool_calls
        if msg.tool_name:
            m["tool_name"] = msg.tool_name
            m.setdefault("name", msg.tool_name)
        if msg.thinking:
            m["reasoning_content"] = msg.thinking
        out.append(m)
    return out, sources


def generate_messages(prompt: str, system: str | None, n_images: int = 0) -> list[dict[str, Any]]:
    """A non-raw /api/generate prompt is one user turn (after the system prompt) in the chat template."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": with_images(prompt, 0, n_images)})
    return messages


# -- options ---------------------------------------------------------------------
def _max_tokens(num_predict: int | None, n_ctx: int) -> int | None:
    if num_predict is None or num_predict == -1:
        return None  # unlimited: until the model stops or the context is full
    if num_predict == -2:
        return n_ctx  # fill the context (start_generation caps it at the room left)
    if num_predict <= 0:
        return None
    return num_predict


def _log_options(opts: Options, n_ctx: int, route: str) -> None:
    if opts.num_ctx is not None and opts.num_ctx > n_ctx:
        logger.info(
            "{}: options.num_ctx={} is larger than the loaded context ({} tokens); ignoring it. "
            "Load the model with a larger max_seq_len for a longer context.", route, opts.num_ctx, n_ctx,
        )
    load_time = [name for name in LOAD_TIME_OPTIONS if getattr(opts, name) is not None]
    if load_time:
        logger.info("{}: load-time options {} are set in the server config, not per request; ignoring them",
                    route, ", ".join(load_time))
    ignored = [n for n in ("num_keep", "penalize_newline") if getattr(opts, n) is not None]
    if ignored:
        logger.debug("{}: options {} have no effect here", route, ", ".join(ignored))
    if opts.model_extra:
        logger.info("{}: ignoring unknown options {}", route, ", ".join(sorted(opts.model_extra)))


def sent_options(opts: Options, n_ctx: int) -> dict[str, Any]:
    """Canonical SamplingParams names for exactly the options the client sent."""
    sent: dict[str, Any] = {
        field_name: getattr(opts, ollama) for ollama, field_name in _FIELDS.items() if getattr(opts, ollama) is not None
    }
    if opts.seed is not None and opts.seed >= 0:  # Ollama: -1 = random
        sent["seed"] = opts.seed
    if opts.stop is not None:
        stop = [opts.stop] if isinstance(opts.stop, str) else list(opts.stop)
        sent["stop"] = tuple(s for s in stop if s)
    max_tokens = _max_tokens(opts.num_predict, n_ctx)
    if max_tokens is not None:
        sent["max_tokens"] = max_tokens
    return sent


def to_sampling_params(
    options: Options | None, *, n_ctx: int, route: str, preset: Preset | None = None
) -> SamplingParams:
    opts = options or Options()
    _log_options(opts, n_ctx, route)
    try:
        return build_params(sent_options(opts, n_ctx), preset, OLLAMA_DEFAULTS)
    except BadRequestError as exc:
        name = _OLLAMA_NAME.get(exc.param or "", exc.param or "")
        message = exc.message.replace(f"'{exc.param}'", f"'options.{name}'") if exc.param else exc.message
        raise BadRequestError(message + " Fix the option and retry.", param=f"options.{name}") from exc


# -- whole requests ------------------------------------------------------------------
@dataclass(frozen=True)
class OllamaPlan:
    """An /api/generate or /api/chat request as the pipeline takes it, and how its output is split."""

    prompt: Prompt
    params: SamplingParams
    options: OutputOptions


def _plan(prompt: Prompt, params: SamplingParams, options: OutputOptions) -> OllamaPlan:
    if options.tool_format is not None:
        params = params.with_updates(skip_special_tokens=False)  # some formats mark calls with special tokens
    return OllamaPlan(prompt, params, options)


def generate_plan(
    body: GenerateRequest, model: LoadedModel, mc: ModelConfig, preset: Preset | None,
    images: Sequence[ImageInput] = (),
) -> OllamaPlan:
    route = "/api/generate"
    if body.raw:
        if body.system:
            logger.info("{}: raw=true, so 'system' is not applied", route)
        prompt = text_prompt(model, body.prompt, images=images)
    else:
        messages = generate_messages(body.prompt, body.system, len(images))
        prompt = chat_prompt(model, messages, template_vars=thinking_vars(body.think), images=images)
    params = to_sampling_params(body.options, n_ctx=model.info.n_ctx, route=route, preset=preset)
    return _plan(prompt, params, output_options(model, prompt, mc, think=body.think))


def chat_plan(
    body: ChatRequest, messages: list[dict[str, Any]], model: LoadedModel, mc: ModelConfig, preset: Preset | None,
    images: Sequence[ImageInput] = (),
) -> OllamaPlan:
    # Like Ollama, a final assistant message is a prefix the model continues.
    last = messages[-1]
    continue_final = last["role"] == "assistant" and bool(last.get("content")) and not last.get("tool_calls")
    prompt = chat_prompt(
        model, messages, continue_final_message=continue_final, tools=body.tools,
        template_vars=thinking_vars(body.think), images=images,
    )
    params = to_sampling_params(body.options, n_ctx=model.info.n_ctx, route="/api/chat", preset=preset)
    return _plan(prompt, params, output_options(model, prompt, mc, think=body.think, tools=body.tools))
