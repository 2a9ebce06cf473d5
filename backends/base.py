"""The engine interface every backend implements.

A backend receives a `GenerationRequest` (prompt token ids + `SamplingParams`)
and yields typed events: `TextDelta` for text (with optional logprobs) and one
final `Finished`. Closing the async iterator early cancels the request and
frees its resources. Nothing untyped crosses this seam.
"""

from __future__ import annotations

import abc
import enum
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from backends.sampling import SamplingParams
from common.errors import BadRequestError

if TYPE_CHECKING:
    import numpy as np


def new_request_id() -> str:
    """A request id unique without any shared counter."""
    return f"req-{uuid.uuid4().hex[:16]}"


class ConstraintState(Protocol):
    """One sequence's progress through a constraint; one owner (the engine's scheduler thread)."""

    def is_finished(self) -> bool:
        """Complete: only an end-of-generation token may follow."""

    def apply_to_logits(self, logits: np.ndarray) -> None:
        """Set the logits of tokens not allowed next to -inf, in place."""

    def advance(self, token: int) -> None:
        """Consume a sampled token."""

    def rollback(self, n: int) -> None:
        """Undo the last n advanced tokens (a banned-string rewind)."""


class Constraint(Protocol):
    """A compiled output constraint (JSON schema, regex, grammar), shared by the requests that use it."""

    def new_state(self) -> ConstraintState: ...


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, stop token or stop string
    LENGTH = "length"  # max_tokens or context end
    CANCELLED = "cancelled"  # the client went away or aborted
    UNLOAD = "unload"  # the model was unloaded while generating
    ERROR = "error"  # the engine failed


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    token_id: int
    logprob: float
    bytes: list[int]
    top: list[tuple[str, int, float]] = field(default_factory=list)  # (text, id, logprob)


@dataclass(frozen=True)
class TextDelta:
    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    queue_seconds: float = 0.0
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0
    draft_tokens: int = 0  # speculative decoding: tokens guessed
    accepted_draft_tokens: int = 0  # ... and kept

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_draft_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    usage: Usage
    stop_string: str | None = None
    error: str | None = None
    error_status: int | None = None  # an ERROR the client caused (4xx), e.g. as an upstream server judged it
    error_code: str | None = None  # with error_status: the machine-readable code clients get


Event = TextDelta | Finished


class ConstraintSpecLike(Protocol):
    """An output constraint not compiled yet (kind: json_schema | json_object | regex | grammar), for
    engines whose server enforces it (`Engine.compiles_constraints` False)."""

    kind: str
    source: str


@dataclass(frozen=True)
class ChatInput:
    """A chat prompt as OpenAI-shaped messages, for engines that apply the model's own chat template
    (`Engine.renders_chat`): a remote server knows its model's template and tool-call format."""

    messages: tuple[dict[str, Any], ...]
    tools: tuple[dict[str, Any], ...] | None = None
    tool_choice: Any = None
    template_vars: dict[str, Any] | None = None


@dataclass(frozen=True)
class ImageInput:
    """One decoded, checked image: packed RGB bytes (width * height * 3) and the hash of what the client sent."""

    rgb: bytes
    width: int
    height: int
    digest: str  # sha256 hex of the original bytes: equal images share KV and encodings
    field: str = "image"  # the request field it came from, for error messages


@dataclass(frozen=True)
class MediaSpan:
    """Positions [start, end) of a prompt that an image fills (placeholder ids in `prompt_tokens`)."""

    start: int
    end: int
    key: str  # identifies the encoded embeddings: the image's digest and which of its chunks
    non_causal: bool = False  # the model attends over the whole image at once: feed it in one batch


@dataclass
class MediaPrompt:
    """A prompt with images, tokenized by the engine that will run it (Engine.tokenize_with_images).

    `tokens` holds real token ids for text and negative placeholder ids, derived from each image's
    digest, where images go: equal prompts (same images included) have equal tokens, so prefix reuse
    needs no special case. `native` is the engine's own handle on the tokenized chunks.
    """

    tokens: list[int]
    spans: tuple[MediaSpan, ...]
    native: Any = None


@dataclass
class GenerationRequest:
    prompt_tokens: list[int]
    params: SamplingParams
    request_id: str = field(default_factory=new_request_id)
    constraint: Constraint | None = None  # compiled; each sequence gets its own state
    loras: tuple[tuple[str, float], ...] | None = None  # adapters and scales; None = the model's active set
    prompt_text: str | None = None  # the prompt as text, when it came as text
    chat: ChatInput | None = None  # the messages, for engines that render chat themselves
    constraint_spec: ConstraintSpecLike | None = None  # uncompiled, for engines that do not compile
    affinity_key: str | None = None  # the prompt's leading part, for routing to where it is cached
    media: MediaPrompt | None = None  # images in the prompt (prompt_tokens is media.tokens)


@dataclass(frozen=True)
class LoraState:
    name: str
    path: str
    scaling: float  # in the active set; 0.0 when loaded but not applied by default


@dataclass
class ModelInfo:
    name: str
    path: str
    backend: str
    n_ctx: int  # longest sequence (prompt + output) one request may use
    n_ctx_train: int
    n_vocab: int
    bos_token: str
    eos_token: str
    bos_token_id: int
    eos_token_id: int
    add_bos_token: bool
    chat_template: str | None
    eog_token_ids: tuple[int, ...] = ()
    control_token_ids: tuple[int, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    load_options: dict[str, Any] = field(default_factory=dict)
    size_bytes: int = 0
    parameter_count: int = 0
    quantization: str = ""
    architecture: str = ""
    modalities: tuple[str, ...] = ("text",)  # "vision" when a projector is loaded


@dataclass(frozen=True)
class ReplicaStats:
    """One upstream server of a remote engine, as /metrics shows it."""

    url: str
    in_flight: int
    requests: int
    errors: int
    ejections: int
    healthy: bool
    latency_seconds_sum: float
    latency_count: int


@dataclass
class EngineStats:
    slots_total: int
    slots_active: int
    queue_depth: int
    kv_cells_total: int
    kv_cells_used: int
    cached_prefix_tokens: int = 0
    requests_finished: int = 0
    tokens_generated: int = 0
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    failure: str | None = None  # the error that stopped the engine's thread; it serves nothing until reloaded


class GenerationHandle(abc.ABC):
    """One submitted request: read its events once; cancel() at any time."""

    request: GenerationRequest

    @abc.abstractmethod
    def events(self) -> AsyncIterator[Event]:
        """TextDelta events then one Finished; leaving the iterator early cancels."""

    @abc.abstractmethod
    def cancel(self) -> None: ...


class Engine(abc.ABC):
    """One loaded model, able to serve many requests at once."""

    info: ModelInfo
    is_embedding: ClassVar[bool] = False  # an EmbeddingEngine (backends/embedding.py): it cannot generate
    # Engines in front of another server (backends/remote) turn these off: that server applies the
    # model's chat template to `GenerationRequest.chat`, enforces `constraint_spec` itself, and its
    # vocabulary is unknown here (token ids are the prompt's UTF-8 bytes; token-id fields are refused).
    renders_chat = False
    compiles_constraints = True
    knows_vocabulary = True

    def replica_stats(self) -> list[ReplicaStats]:
        """Per upstream server, for engines that have them."""
        return []

    @abc.abstractmethod
    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]: ...

    @abc.abstractmethod
    def detokenize(self, tokens: list[int], *, special: bool = False) -> str: ...

    @abc.abstractmethod
    def token_piece(self, token: int) -> bytes: ...

    @abc.abstractmethod
    def submit(self, request: GenerationRequest) -> GenerationHandle:
        """Queue a request now (raising at once when busy or closed)."""

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Submit and yield its events; closing the iterator cancels the request."""
        handle = self.submit(request)
        async for event in handle.events():
            yield event

    @abc.abstractmethod
    def stats(self) -> EngineStats: ...

    # -- images (backends without a projector keep these defaults) -------------
    @property
    def image_marker(self) -> str | None:
        """The text that stands for an image in a prompt given to tokenize_with_images; None: no vision."""
        return None

    def tokenize_with_images(self, text: str, images: list[ImageInput], *, add_bos: bool) -> MediaPrompt:
        """Blocking (call off the event loop): text holding one image_marker per image, and the images."""
        raise BadRequestError(
            f"Model '{self.info.name}' cannot read images: it has no vision projector. Send text only, or load "
            "a vision model with its mmproj file.",
            param="messages",
            code="model_not_multimodal",
        )

    # -- LoRA adapters (backends without them keep these defaults) -------------
    supports_lora = False

    async def load_lora(self, name: str, path: Path) -> None:
        raise BadRequestError(f"The {self.info.backend} backend cannot apply LoRA adapters.", param="loras")

    async def unload_loras(self, names: list[str] | None = None) -> list[str]:
        """Unload the named adapters (all when None); returns the names unloaded."""
        return []

    def set_loras(self, pairs: list[tuple[str, float]]) -> None:
        """The adapters (and scales) applied to requests that do not choose their own."""
        if pairs:
            raise BadRequestError(f"The {self.info.backend} backend cannot apply LoRA adapters.", param="loras")

    def loras(self) -> list[LoraState]:
        return []

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish every pending request with FinishReason.UNLOAD and free the model."""


@dataclass
class LoadOptions:
    """What a model load may set; None means the backend's default for that model."""

    max_seq_len: int | None = None
    cache_size: int | None = None
    max_batch_size: int = 16
    chunk_size: int = 512
    max_queue: int = 256
    n_threads: int | None = None
    n_gpu_layers: int = 0
    cache_mode: str = "FP16"
    flash_attention: str = "auto"
    prompt_template: str | None = None
    draft_mode: str = "none"  # none | ngram | model
    draft_model_path: str | None = None
    draft_max_tokens: int = 8
    draft_adaptive: bool = True  # llama.cpp: the guess length follows what guessing pays; False: always the max
    pooling: str | None = None  # embedding models: mean | cls | last | rank; None: what the model declares
    device: str | None = None  # torch engines (infinity): cpu | cuda | auto; None: the embeddings config's
    mmproj: str | None = None  # vision projector GGUF; None: look for mmproj*.gguf beside the model; "none": off

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)
