"""Parley's request -> an upstream's request body, and the upstream's stream -> text, logprobs, usage.

Which fields each upstream takes (README, "Remote models", has the table):
- every kind: temperature, top_p, max_tokens, stop, seed, presence and
  frequency penalties;
- kind openai adds, per `server`: vLLM and SGLang take top_k, min_p,
  repetition_penalty, min_tokens, ignore_eos and structured outputs;
  llama-server its own samplers (typical, DRY, XTC, mirostat, top-n-sigma),
  JSON schemas and GBNF grammars; another Parley every knob by its own name;
  plain OpenAI none of these;
- kind ollama: its `options` (top_k, min_p, typical_p, repeat_penalty,
  repeat_last_n, mirostat) and `format` for JSON.
A sampler knob the upstream lacks is dropped (refused with `strict_sampling`);
an output constraint or logprobs it cannot give is refused with a 400 naming
the field. Stop strings go upstream and are checked again here; banned strings
go upstream as stop strings (or as banned_strings to a Parley), and the engine
ends the output before any it sees (another server cannot be made to resample).

Chat answers come back as text in the format Parley's own parsers read: tool
calls as Hermes `<tool_call>{"name": ..., "arguments": ...}</tool_call>`
blocks and reasoning as `<think>...</think>`, so tool calls, reasoning and
their streaming framing are handled once, above the engine, for every dialect.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from backends.base import GenerationRequest, TokenLogprob
from backends.remote.spec import RemoteSpec
from backends.sampling import SamplingParams
from common.errors import BadRequestError

# Knobs every kind takes, by Parley's name -> the upstream's.
_COMMON = {"temperature": "temperature", "top_p": "top_p", "presence_penalty": "presence_penalty",
           "frequency_penalty": "frequency_penalty"}
_EXTRA: dict[str, dict[str, str]] = {
    "vllm": {"top_k": "top_k", "min_p": "min_p", "repetition_penalty": "repetition_penalty",
             "min_tokens": "min_tokens", "ignore_eos": "ignore_eos"},
    "sglang": {"top_k": "top_k", "min_p": "min_p", "repetition_penalty": "repetition_penalty",
               "min_tokens": "min_new_tokens", "ignore_eos": "ignore_eos"},
    "llamacpp": {"top_k": "top_k", "min_p": "min_p", "repetition_penalty": "repeat_penalty",
                 "penalty_range": "repeat_last_n", "typical": "typical_p", "top_n_sigma": "top_n_sigma",
                 "xtc_probability": "xtc_probability", "xtc_threshold": "xtc_threshold",
                 "dry_multiplier": "dry_multiplier", "dry_base": "dry_base", "dry_allowed_length": "dry_allowed_length",
                 "dry_range": "dry_penalty_last_n", "dry_sequence_breakers": "dry_sequence_breakers",
                 "mirostat_mode": "mirostat", "mirostat_tau": "mirostat_tau", "mirostat_eta": "mirostat_eta",
                 "ignore_eos": "ignore_eos"},
    "openai": {},
    "ollama": {"top_k": "top_k", "min_p": "min_p", "typical": "typical_p", "repetition_penalty": "repeat_penalty",
               "penalty_range": "repeat_last_n", "mirostat_mode": "mirostat", "mirostat_tau": "mirostat_tau",
               "mirostat_eta": "mirostat_eta"},
}
# Settled by the pipeline or handled apart from the sampler table.
_HANDLED = {"max_tokens", "stop", "seed", "logprobs", "banned_strings", "add_bos_token", "skip_special_tokens",
            "temperature_last", "logit_bias", "banned_tokens", "allowed_tokens", "stop_token_ids"}
# Secondary knobs that change nothing unless their main knob is on (sent only with it).
_SECONDARY = {"dry_base", "dry_allowed_length", "dry_range", "dry_sequence_breakers", "xtc_threshold",
              "mirostat_tau", "mirostat_eta", "penalty_range"}
OPENAI_STOP_LIMIT = 4  # OpenAI's own API takes at most four stop strings


@dataclass(frozen=True)
class UpstreamCall:
    path: str
    body: dict[str, Any]
    chat: bool  # the answer is chat-shaped
    ndjson: bool  # Ollama's newline-delimited JSON instead of server-sent events


def _table(spec: RemoteSpec) -> dict[str, str]:
    return {**_COMMON, **_EXTRA["ollama" if spec.kind == "ollama" else spec.server]}


def sampler_fields(spec: RemoteSpec, params: SamplingParams) -> dict[str, Any]:
    """The request's sampler knobs under the upstream's names; ones it lacks dropped (or refused)."""
    if spec.server == "parley" and spec.kind == "openai":
        return _parley_fields(params)
    table = _table(spec)
    out: dict[str, Any] = {}
    for knob in sorted(params.active_knobs() - _HANDLED):
        name = table.get(knob)
        if name is None:
            if knob in _SECONDARY:
                continue
            if spec.strict_sampling:
                raise BadRequestError(
                    f"'{knob}' is not supported by the upstream of '{spec.name}' ({_describe(spec)}); "
                    "drop it or set it to its neutral value.", param=knob,
                )
            continue
        value = getattr(params, knob)
        out[name] = list(value) if isinstance(value, tuple) else value
    if params.temperature != 1.0 or "temperature" not in out:
        out["temperature"] = params.temperature  # upstream defaults differ (Ollama: 0.8); Parley's is 1.0
    if params.seed is not None:
        out["seed"] = params.seed
    return out


def _parley_fields(params: SamplingParams) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for knob in params.active_knobs() - {"max_tokens", "stop", "logprobs", "logit_bias", "banned_tokens",
                                         "allowed_tokens", "stop_token_ids"}:
        value = getattr(params, knob)
        out[knob] = list(value) if isinstance(value, tuple) else value
    out["temperature"] = params.temperature
    return out


def _describe(spec: RemoteSpec) -> str:
    return "Ollama" if spec.kind == "ollama" else {"vllm": "vLLM", "sglang": "SGLang", "llamacpp": "llama-server",
                                                  "parley": "Parley", "openai": "an OpenAI-compatible server"}[spec.server]


def _refuse(spec: RemoteSpec, what: str, param: str) -> BadRequestError:
    return BadRequestError(
        f"{what} is not available for '{spec.name}': its upstream ({_describe(spec)}) cannot do it. "
        "Drop the field, or serve the model locally.", param=param,
    )


def _constraint_fields(spec: RemoteSpec, request: GenerationRequest, chat: bool) -> dict[str, Any]:
    c = request.constraint_spec
    if c is None:
        return {}
    kind, source = c.kind, c.source
    param = {"json_schema": "json_schema", "json_object": "response_format", "regex": "regex_pattern",
             "grammar": "grammar_string"}.get(kind, "response_format")
    schema = json.loads(source) if kind == "json_schema" else None
    if spec.kind == "ollama":
        if kind == "json_schema":
            return {"format": schema}
        if kind == "json_object":
            return {"format": "json"}
        raise _refuse(spec, "A regex or grammar constraint", param)
    server = spec.server
    if server == "parley":
        return {"json_schema": schema} if kind == "json_schema" else \
            {"response_format": {"type": "json_object"}} if kind == "json_object" else \
            {"regex_pattern": source} if kind == "regex" else {"grammar_string": source}
    if server == "vllm":
        return {"structured_outputs": {"json": schema} if kind == "json_schema" else
                {"json_object": True} if kind == "json_object" else {kind: source}}
    if server == "sglang":
        return {"json_schema": source} if kind == "json_schema" else \
            {"json_schema": '{"type": "object"}'} if kind == "json_object" else \
            {"regex": source} if kind == "regex" else {"ebnf": source}
    if server == "llamacpp":
        if kind == "json_schema":
            return {"json_schema": schema}
        if kind == "json_object":
            return {"json_schema": {"type": "object"}}
        if kind == "grammar" and "::=" in source:
            return {"grammar": source}
        raise _refuse(spec, "A regex (or Lark grammar) constraint", param)
    if chat and kind == "json_schema":
        return {"response_format": {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}}
    if chat and kind == "json_object":
        return {"response_format": {"type": "json_object"}}
    raise _refuse(spec, f"A {kind.replace('_', ' ')} constraint", param)


def upstream_stops(spec: RemoteSpec, params: SamplingParams) -> list[str]:
    stops = list(dict.fromkeys(params.stop))
    if not (spec.kind == "openai" and spec.server == "parley"):
        stops += [b for b in params.banned_strings if b not in stops]  # ending there beats generating on
    if spec.kind == "openai" and spec.server == "openai":
        stops = stops[:OPENAI_STOP_LIMIT]  # the rest are enforced here
    return stops


def build_call(spec: RemoteSpec, request: GenerationRequest, max_tokens: int | None) -> UpstreamCall:
    """The upstream request for a generation; raises BadRequestError for what the upstream cannot do."""
    params = request.params
    chat = request.chat is not None and spec.chat
    stops = upstream_stops(spec, params)
    fields = sampler_fields(spec, params)
    fields.update(_constraint_fields(spec, request, chat))
    if spec.kind == "ollama":
        if params.logprobs is not None:
            raise _refuse(spec, "logprobs", "logprobs")
        options = {k: v for k, v in fields.items() if k != "format"}
        if max_tokens is not None:
            options["num_predict"] = max_tokens
        if stops:
            options["stop"] = stops
        body: dict[str, Any] = {"model": spec.upstream_model, "stream": True, "options": options}
        if "format" in fields:
            body["format"] = fields["format"]
        if chat:
            assert request.chat is not None
            body["messages"] = [_ollama_message(m) for m in request.chat.messages]
            if request.chat.tools:
                body["tools"] = list(request.chat.tools)
            return UpstreamCall("/api/chat", body, chat=True, ndjson=True)
        body.update(prompt=_prompt_text(request), raw=True)
        return UpstreamCall("/api/generate", body, chat=False, ndjson=True)
    body = {"model": spec.upstream_model, "stream": True, "stream_options": {"include_usage": True}, **fields}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if stops:
        body["stop"] = stops
    if spec.server == "parley" and params.banned_strings:
        body["banned_strings"] = list(params.banned_strings)
    if chat:
        assert request.chat is not None
        body["messages"] = [_openai_message(m) for m in request.chat.messages]
        if request.chat.tools:
            body["tools"] = list(request.chat.tools)
            if request.chat.tool_choice is not None:
                body["tool_choice"] = request.chat.tool_choice
        if request.chat.template_vars:
            body["chat_template_kwargs"] = request.chat.template_vars
        if params.logprobs is not None:
            body["logprobs"] = True
            body["top_logprobs"] = params.logprobs
        return UpstreamCall("/v1/chat/completions", body, chat=True, ndjson=False)
    body["prompt"] = _prompt_text(request)
    if params.logprobs is not None:
        body["logprobs"] = params.logprobs
    return UpstreamCall("/v1/completions", body, chat=False, ndjson=False)


def _prompt_text(request: GenerationRequest) -> str:
    if request.prompt_text is not None:
        return request.prompt_text
    return bytes(t for t in request.prompt_tokens if 0 <= t < 256).decode("utf-8", "replace")


def _openai_message(message: dict[str, Any]) -> dict[str, Any]:
    """OpenAI servers take tool-call arguments as JSON text (Parley's messages hold objects)."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    fixed = []
    for call in calls:
        fn = dict(call.get("function") or {})
        if not isinstance(fn.get("arguments"), str):
            fn["arguments"] = json.dumps(fn.get("arguments") or {})
        fixed.append({**call, "function": fn, "type": call.get("type", "function"), "id": call.get("id") or "call_0"})
    return {**message, "tool_calls": fixed}


def _ollama_message(message: dict[str, Any]) -> dict[str, Any]:
    """Ollama takes tool-call arguments as objects (Parley's messages already hold them so)."""
    out = {k: v for k, v in message.items() if k in ("role", "content", "tool_calls", "images", "tool_name")}
    return out


# -- answers ----------------------------------------------------------------------
@dataclass
class Piece:
    """What one upstream chunk adds."""

    text: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
    finish: str | None = None  # the upstream's finish reason, on the last chunk
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int = 0


@dataclass
class AnswerReader:
    """Turns one upstream answer's chunks into Pieces; keeps the state a chat stream needs."""

    chat: bool
    ndjson: bool
    _thinking: bool = False
    _open_call: int | None = None
    _calls: dict[int, bool] = field(default_factory=dict)

    def read(self, data: dict[str, Any]) -> Piece:
        if self.ndjson:
            return self._ollama(data)
        piece = Piece()
        usage = data.get("usage")
        if isinstance(usage, dict):
            piece.prompt_tokens = usage.get("prompt_tokens")
            piece.completion_tokens = usage.get("completion_tokens")
            details = usage.get("prompt_tokens_details") or {}
            piece.cached_tokens = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
        for choice in data.get("choices") or ():
            if self.chat:
                delta = choice.get("delta") or choice.get("message") or {}
                piece.text += self._chat_text(delta)
                lp = (choice.get("logprobs") or {}).get("content") or ()
                piece.logprobs = tuple(_chat_logprob(item) for item in lp)
            else:
                piece.text += choice.get("text") or ""
                piece.logprobs = _completion_logprobs(choice.get("logprobs"))
            if choice.get("finish_reason"):
                piece.finish = choice["finish_reason"]
                piece.text += self.close()
        return piece

    def _chat_text(self, delta: dict[str, Any]) -> str:
        out = ""
        thought = delta.get("reasoning_content") or delta.get("reasoning") or delta.get("thinking")
        if thought:
            if not self._thinking:
                out += "<think>"
                self._thinking = True
            out += thought
        content = delta.get("content")
        if content:
            out += self._end_thinking() + self._end_call() + content
        for call in delta.get("tool_calls") or ():
            out += self._end_thinking()
            index = call.get("index", len(self._calls))
            fn = call.get("function") or {}
            if index != self._open_call:
                out += self._end_call()
                self._open_call = index
                self._calls[index] = True
                out += '<tool_call>\n{"name": ' + json.dumps(fn.get("name") or "") + ', "arguments": '
            args = fn.get("arguments")
            if isinstance(args, dict):
                args = json.dumps(args)
            out += args or ""
        return out

    def _end_thinking(self) -> str:
        if self._thinking:
            self._thinking = False
            return "</think>"
        return ""

    def _end_call(self) -> str:
        if self._open_call is not None:
            self._open_call = None
            return "}\n</tool_call>"
        return ""

    def close(self) -> str:
        """Text that closes what is open at the end of the answer."""
        return self._end_thinking() + self._end_call()

    def _ollama(self, data: dict[str, Any]) -> Piece:
        piece = Piece()
        if self.chat:
            message = data.get("message") or {}
            piece.text = self._chat_text({"thinking": message.get("thinking"), "content": message.get("content"),
                                          "tool_calls": [{"index": len(self._calls) + i, **c}
                                                         for i, c in enumerate(message.get("tool_calls") or ())]})
            piece.text += self._end_call()
        else:
            piece.text = data.get("response") or ""
        if data.get("done"):
            piece.finish = data.get("done_reason") or "stop"
            piece.text += self.close()
            piece.prompt_tokens = data.get("prompt_eval_count")
            piece.completion_tokens = data.get("eval_count")
        return piece


def _chat_logprob(item: dict[str, Any]) -> TokenLogprob:
    token = item.get("token") or ""
    top = tuple((t.get("token") or "", -1, float(t.get("logprob") or 0.0)) for t in item.get("top_logprobs") or ())
    raw = item.get("bytes")
    return TokenLogprob(token, -1, float(item.get("logprob") or 0.0),
                        list(raw) if isinstance(raw, list) else list(token.encode()), list(top))


def _completion_logprobs(lp: Any) -> tuple[TokenLogprob, ...]:
    if not isinstance(lp, dict):
        return ()
    if isinstance(lp.get("content"), list):  # llama-server answers completions in the chat shape
        return tuple(_chat_logprob(item) for item in lp["content"])
    tokens = lp.get("tokens") or []
    values = lp.get("token_logprobs") or []
    tops = lp.get("top_logprobs") or []
    out = []
    for i, token in enumerate(tokens):
        top = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
        value = values[i] if i < len(values) and values[i] is not None else 0.0
        out.append(TokenLogprob(token, -1, float(value), list(token.encode()),
                                [(t, -1, float(v)) for t, v in top.items()]))
    return tuple(out)


def upstream_error(status: int, raw: bytes) -> str:
    """The message inside an upstream's error body (OpenAI, llama-server or Ollama shape)."""
    try:
        data = json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")[:300] or f"HTTP {status}"
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or err)[:300]
    if isinstance(err, str):
        return err[:300]
    if isinstance(data, dict) and "detail" in data:
        return str(data["detail"])[:300]
    return str(data)[:300]
