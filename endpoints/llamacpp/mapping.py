"""llama.cpp /infill request -> fill-in-the-middle prompt and SamplingParams."""

from __future__ import annotations

from typing import Any

from backends.sampling import SamplingParams
from common.errors import BadRequestError
from common.generation.fim import fim_prompt
from common.generation.prompts import Prompt
from common.models.manager import LoadedModel
from common.models.presets import Preset, build_params
from endpoints.llamacpp.protocol import InfillRequest

# llama.cpp server's sampling defaults, for clients that send none.
LLAMACPP_DEFAULTS: dict[str, Any] = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}


def infill_params(body: InfillRequest, preset: Preset | None) -> SamplingParams:
    """llama.cpp fields -> SamplingParams: llama.cpp defaults < preset < sent < forced."""
    if body.n_predict == 0:
        raise BadRequestError(
            "'n_predict' 0 would generate nothing; send -1 for no limit or a positive token count.",
            param="n_predict",
        )
    sent: dict[str, Any] = {
        name: value
        for name in ("temperature", "top_k", "top_p", "min_p")
        if (value := getattr(body, name)) is not None
    }
    if body.n_predict > 0:
        sent["max_tokens"] = body.n_predict
    if body.seed is not None and body.seed >= 0:
        sent["seed"] = body.seed
    if body.stop is not None:
        stops = [body.stop] if isinstance(body.stop, str) else body.stop
        sent["stop"] = tuple(s for s in stops if s)
    return build_params(sent, preset, LLAMACPP_DEFAULTS)


def infill_plan(body: InfillRequest, model: LoadedModel, preset: Preset | None) -> tuple[Prompt, SamplingParams]:
    """The FIM prompt and the sampling parameters of an /infill request (the request's own mistakes first)."""
    params = infill_params(body, preset)
    prompt = fim_prompt(model, body.input_prefix, body.input_suffix, middle=body.prompt, param="input_suffix")
    return prompt, params
