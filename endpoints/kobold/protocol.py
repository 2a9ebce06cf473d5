"""KoboldAI / KoboldCpp wire models, as SillyTavern and KoboldAI Lite send them.

Defaults follow KoboldCpp's own defaults for a field that is not sent, so a
client that omits a knob gets what KoboldCpp would give it. Bounds match
`SamplingParams` so a valid request never fails later with a differently named
parameter. Unknown fields are accepted and logged by the router.
"""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices, ConfigDict, Field

from endpoints.http.names import ModelName
from endpoints.http.wire import WireModel

# KoboldCpp's sampler order (rep pen, top_k, top_a, tfs, typical, top_p, temperature).
DEFAULT_SAMPLER_ORDER: tuple[int, ...] = (6, 0, 1, 3, 4, 2, 5)


class KoboldModel(WireModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class GenerateRequest(KoboldModel):
    """Body of POST /api/v1/generate and POST /api/extra/generate/stream."""

    prompt: str = ""
    max_context_length: int | None = Field(None, ge=1)
    max_length: int | None = Field(None, ge=1)

    # Repetition
    rep_pen: float = Field(1.0, gt=0, le=100)
    rep_pen_range: int = Field(320, ge=-1)
    rep_pen_slope: float = Field(1.0, ge=0)  # accepted, not applied by llama.cpp
    presence_penalty: float = Field(0.0, ge=-2, le=2)

    # Temperature and truncation
    temperature: float = Field(0.75, ge=0, le=100)
    dynatemp_range: float = Field(0.0, ge=0, le=100)
    dynatemp_exponent: float = Field(1.0, ge=0, le=100)
    smoothing_factor: float = Field(0.0, ge=0, le=100)
    top_k: int = Field(100, ge=-1)
    top_p: float = Field(0.92, ge=0, le=1)
    top_a: float = Field(0.0, ge=0, le=1)
    min_p: float = Field(0.0, ge=0, le=1)
    typical: float = Field(1.0, ge=0, le=1)
    tfs: float = Field(1.0, ge=0, le=1)
    nsigma: float = Field(0.0, ge=0, le=100, validation_alias=AliasChoices("nsigma", "top_n_sigma"))
    xtc_threshold: float = Field(0.2, ge=0, le=1)
    xtc_probability: float = Field(0.0, ge=0, le=1)
    sampler_order: list[int] | None = None  # accepted; llama.cpp applies its own order

    # DRY
    dry_multiplier: float = Field(0.0, ge=0, le=100)
    dry_base: float = Field(1.75, ge=1, le=100)
    dry_allowed_length: int = Field(2, ge=0)
    dry_penalty_last_n: int = Field(0, ge=-1)
    dry_sequence_breakers: list[str] | str | None = None

    # Mirostat
    mirostat: int = Field(0, ge=0, le=2)
    mirostat_tau: float = Field(5.0, ge=0, le=100)
    mirostat_eta: float = Field(0.1, ge=0, le=1)

    # Seed, stopping and token control
    sampler_seed: int | None = Field(None, ge=-1)
    stop_sequence: list[str] | str | None = None
    trim_stop: bool = True
    use_default_badwordsids: bool = False
    bypass_eos: bool = False
    banned_tokens: list[str] | None = None
    logit_bias: dict[str, float] | None = None
    render_special: bool = False
    grammar: str | None = None  # GBNF; "" means unconstrained
    grammar_retain_state: bool = False  # accepted; every generation starts the grammar afresh

    # Bookkeeping
    genkey: str | None = Field(None, max_length=200)
    n: int = Field(1, ge=1, le=5)
    quiet: bool = False
    images: list[Any] | None = None


class GenkeyRequest(KoboldModel):
    """Body of /api/extra/abort and /api/extra/generate/check (both optional)."""

    genkey: str | None = Field(None, max_length=200)


class TokenizeRequest(KoboldModel):
    """Body of /api/extra/tokencount and /api/extra/tokenize."""

    prompt: str = ""
    special: bool = True  # add the model's BOS as a generation would


class DetokenizeRequest(KoboldModel):
    ids: list[int] = Field(default_factory=list)


class KoboldEmbeddingRequest(WireModel):
    """KoboldCpp's /api/extra/embeddings: `input` a string or a list of strings."""

    model_config = ConfigDict(extra="allow")

    model: ModelName | None = None
    input: Any = None
    truncate: bool = True
