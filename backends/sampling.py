"""`SamplingParams`: every generation knob once, with its bounds; how a request whose sampling fails ends.

Each API's `mapping.py` builds one of these from its own field names; each
backend's `sampler.py` turns it into native settings. Defaults are neutral
(a knob at its default changes nothing), so a backend can tell which knobs a
request actually uses with `SamplingParams.active_knobs()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any

from loguru import logger

from common.errors import BadRequestError

DEFAULT_DRY_BREAKERS: tuple[str, ...] = ("\n", ":", '"', "*")


class NothingToSample(RuntimeError):
    """Every token was masked out at a step: the request's own constraints leave nothing (its fault, not the engine's)."""

    def __init__(self) -> None:
        super().__init__(
            "Every token was masked out at this step, so nothing is left to sample: allowed_tokens, banned_tokens, "
            "logit_bias, the grammar or JSON schema, banned strings and min_tokens (which forbids ending) together "
            "exclude the whole vocabulary. Relax one of them."
        )


def sampling_failure(exc: Exception, request_id: str) -> dict[str, Any]:
    """How a request whose sampling raised `exc` ends, as keyword arguments for its Finished: by its own
    constraints (400 nothing_to_sample), or by an unexpected error (logged with its traceback). Either way
    only that request ends; the engine serves on."""
    if isinstance(exc, NothingToSample):
        return {"error": str(exc), "error_status": 400, "error_code": "nothing_to_sample"}
    logger.opt(exception=exc).error("{}: sampling failed", request_id)
    return {"error": f"Sampling failed for this request ({type(exc).__name__}: {exc}). Retry it; "
                     "if it fails again, report it with the request body."}


@dataclass(frozen=True)
class SamplingParams:
    # Length and stopping
    max_tokens: int | None = None
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ban_eos_token: bool = False
    ignore_eos: bool = False

    # Temperature family
    temperature: float = 1.0
    temperature_last: bool = False
    min_temp: float = 0.0
    max_temp: float = 0.0
    temp_exponent: float = 1.0
    smoothing_factor: float = 0.0

    # Truncation samplers
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    top_a: float = 0.0
    typical: float = 1.0
    tfs: float = 1.0
    top_n_sigma: float = 0.0
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1

    # Repetition control
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_range: int = -1
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_range: int = 0
    dry_sequence_breakers: tuple[str, ...] = DEFAULT_DRY_BREAKERS

    # Mirostat
    mirostat_mode: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1

    # Token-level control
    logit_bias: dict[int, float] = field(default_factory=dict)
    banned_tokens: tuple[int, ...] = ()
    allowed_tokens: tuple[int, ...] = ()
    banned_strings: tuple[str, ...] = ()

    # Output and prompt handling
    seed: int | None = None
    logprobs: int | None = None
    add_bos_token: bool | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        for name, (low, high) in _BOUNDS.items():
            value = getattr(self, name)
            if value is None:
                continue
            if value != value or (low is not None and value < low) or (high is not None and value > high):
                lo = "-inf" if low is None else low
                hi = "inf" if high is None else high
                raise BadRequestError(
                    f"'{name}' must be between {lo} and {hi}, got {value}.", param=name
                )
        bad_bias = next((b for b in self.logit_bias.values() if not -100.0 <= b <= 100.0), None)
        if bad_bias is not None:
            raise BadRequestError(
                f"'logit_bias' values must be between -100 and 100 (-100 bans a token), got {bad_bias}.",
                param="logit_bias",
            )
        if self.mirostat_mode not in (0, 1, 2):
            raise BadRequestError(
                "'mirostat_mode' must be 0 (off), 1 or 2.", param="mirostat_mode"
            )
        if self.max_temp < self.min_temp and self.max_temp > 0:
            raise BadRequestError(
                "'max_temp' must be at least 'min_temp' for dynamic temperature.",
                param="max_temp",
            )

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1

    @property
    def dynamic_temperature(self) -> bool:
        return self.max_temp > self.min_temp

    def with_updates(self, **changes: Any) -> SamplingParams:
        return replace(self, **changes)

    def active_knobs(self) -> set[str]:
        """Names of the knobs set away from their neutral default."""
        out: set[str] = set()
        for f in fields(self):
            default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
            if getattr(self, f.name) != default:
                out.add(f.name)
        return out


# (low, high) inclusive; None = unbounded on that side.
_BOUNDS: MappingProxyType[str, tuple[float | None, float | None]] = MappingProxyType({
    "max_tokens": (1, None),
    "min_tokens": (0, None),
    "temperature": (0.0, 100.0),
    "min_temp": (0.0, 100.0),
    "max_temp": (0.0, 100.0),
    "temp_exponent": (0.0, 100.0),
    "smoothing_factor": (0.0, 100.0),
    "top_k": (-1, None),
    "top_p": (0.0, 1.0),
    "min_p": (0.0, 1.0),
    "top_a": (0.0, 1.0),
    "typical": (0.0, 1.0),
    "tfs": (0.0, 1.0),
    "top_n_sigma": (0.0, 100.0),
    "xtc_probability": (0.0, 1.0),
    "xtc_threshold": (0.0, 1.0),
    "repetition_penalty": (0.0, 100.0),
    "frequency_penalty": (-2.0, 2.0),
    "presence_penalty": (-2.0, 2.0),
    "penalty_range": (-1, None),
    "dry_multiplier": (0.0, 100.0),
    "dry_base": (1.0, 100.0),
    "dry_allowed_length": (0, None),
    "dry_range": (-1, None),
    "mirostat_tau": (0.0, 100.0),
    "mirostat_eta": (0.0, 1.0),
    "seed": (None, None),
    "logprobs": (0, 20),
})
