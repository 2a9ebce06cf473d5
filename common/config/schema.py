"""The configuration schema: one pydantic model per config.yml section.

Loading, layering and the sample file live in config.py.
"""

from __future__ import annotations

from functools import cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ENV_PREFIX = "PARLEY_"


class _Section(BaseModel):
    # Unknown keys are errors so that typos in config.yml are not silently ignored.
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, protected_namespaces=())


ApiServer = Literal["openai", "kobold", "ollama", "anthropic", "core"]


class NetworkConfig(_Section):
    """Where the server listens and who may call it."""

    host: str = Field(
        "127.0.0.1",
        description="Address to listen on. Use 0.0.0.0 to accept connections from other machines.",
    )
    port: int = Field(5000, ge=1, le=65535, description="TCP port to listen on.")
    disable_auth: bool = Field(
        False,
        description="Accept requests without an API key. Only for trusted networks.",
    )
    api_tokens_file: str = Field(
        "api_tokens.yml",
        description="File holding the API and admin keys; created with random keys on first start.",
    )
    api_servers: list[ApiServer] = Field(
        default_factory=lambda: ["openai", "kobold", "ollama", "anthropic", "core"], min_length=1,
        description="API dialects to serve. 'core' is model management and server info.",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Origins that browsers may call the API from, e.g. [http://localhost:3000]; [\"*\"] allows "
        "any origin. Empty allows no cross-origin calls (no CORS headers are sent).",
    )
    max_request_body_bytes: int = Field(
        10_000_000, gt=0,
        description="Largest accepted request body in bytes, chunked bodies included; bigger requests get 413. "
        "Bodies are counted while they arrive and never buffered past this size.",
    )
    enable_metrics: bool = Field(True, description="Serve Prometheus metrics at GET /metrics.")
    metrics_auth: Literal["none", "api", "admin"] = Field(
        "api",
        description="Key /metrics requires: none (open, e.g. for a scraper on a private network), api (any key; "
        "Prometheus sends it with `authorization: {credentials: <key>}`) or admin.",
    )
    shutdown_timeout: float = Field(
        30.0, ge=0,
        description="Seconds running generations may take to finish after SIGTERM or Ctrl+C. Meanwhile new "
        "generations get 503 and /health reports draining; then the rest end with an error frame and the "
        "process exits.",
    )


class LoggingConfig(_Section):
    """What goes to the console log."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO",
        description="Minimum level of log messages.",
    )
    log_requests: bool = Field(
        False,
        description="Log one line per HTTP request: route, status, key name, latency, and for generations the "
        "model and token counts.",
    )
    log_prompt: bool = Field(
        False, description="Add the prompt text (cut to log_prompt_chars) to the request log line. May expose "
        "user data.",
    )
    log_prompt_chars: int = Field(500, ge=0, description="Longest prompt excerpt log_prompt writes, in characters.")
    log_generation_params: bool = Field(
        False, description="Add the sampling parameters each generation ran with to the request log line.",
    )


class LimitsConfig(_Section):
    """Caps on each request, and rate limits for keys that set none in the keys file."""

    max_output_tokens: int | None = Field(
        None, ge=1,
        description="Most tokens one request may ask to generate (max_tokens, max_completion_tokens, Kobold "
        "max_length, Ollama options.num_predict); asking more is a 400 naming the field, asking nothing "
        "generates at most this many. null: up to the context length.",
    )
    max_n: int | None = Field(
        None, ge=1, description="Most choices (n) one request may ask for; more is a 400. null: the dialect's own cap.",
    )
    max_prompt_tokens: int | None = Field(
        None, ge=1,
        description="Longest prompt in tokens (after the chat template); longer is a 400 naming messages or "
        "prompt. null: up to the context length.",
    )
    max_images_per_request: int = Field(
        8, ge=0,
        description="Most images one request may carry (image parts, Ollama and Kobold images); more is a 400 "
        "naming the field. 0 refuses images.",
    )
    max_image_pixels: int = Field(
        33_554_432, ge=1,
        description="Largest image in pixels (width x height), checked from its header before it is decoded; "
        "larger is a 400 naming the field.",
    )
    default_requests_per_minute: int | None = Field(
        None, ge=1,
        description="Generation requests per minute for API keys without their own requests_per_minute in the "
        "keys file (per client address when auth is disabled). null: unlimited.",
    )
    default_tokens_per_minute: int | None = Field(
        None, ge=1,
        description="Tokens per minute (generated, or read by embeddings) for API keys without their own "
        "tokens_per_minute in the keys "
        "file (per client address when auth is disabled). null: unlimited.",
    )
    store: str = Field(
        "memory",
        pattern=r"^(memory|rediss?://.+|unix://.+)$",
        description="Where rate-limit buckets live: memory (this process) or a Redis URL (redis://host:6379/0) "
        "shared by several Parley instances behind one load balancer, so a key's limits hold across them.",
    )
    store_fail_open: bool = Field(
        False,
        description="When the Redis limit store cannot be reached: false answers 503 to callers with limits, "
        "true lets them through unlimited. Either way it is logged.",
    )


class ModelConfig(_Section):
    """The main model and how it is run."""

    model_dir: str = Field(
        "models",
        description="Folder that holds the models (GGUF files or model folders).",
    )
    model_name: str | None = Field(
        None,
        description="Model to load at startup, a file or folder in model_dir. null loads the first model "
        "found.",
    )
    backend: Literal["auto", "llamacpp", "transformers", "exllamav2", "exllamav3", "remote"] = Field(
        "auto", description="Inference engine. auto picks one from the model's files.",
    )
    max_seq_len: int | None = Field(
        None, ge=16,
        description="Context length in tokens. null uses the model's trained context, capped at 8192.",
    )
    cache_size: int | None = Field(
        None, ge=16,
        description="KV cache cells shared by all slots. null means max_seq_len.",
    )
    max_batch_size: int = Field(16, ge=1, le=256, description="Sequence slots generated concurrently.")
    chunk_size: int = Field(512, ge=64, le=8192, description="Prompt tokens processed per forward pass.")
    max_queue: int = Field(256, ge=0, description="Requests that may wait for a free slot; more get 503.")
    prompt_template: str | None = Field(
        None,
        description="Chat template file in templates/ without .jinja. null uses the model's own template.",
    )
    n_threads: int | None = Field(None, ge=1, description="CPU threads for inference. null uses all cores.")
    n_gpu_layers: int = Field(0, ge=-1, description="Layers offloaded to the GPU. -1 offloads all.")
    cache_mode: Literal["FP16", "Q8_0", "Q4_0"] = Field(
        "FP16",
        description="KV cache precision. Quantized modes save memory at a small quality cost.",
    )
    flash_attention: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Use flash attention where the backend supports it.",
    )
    inline_model_loading: bool = Field(
        False,
        description="Load the model a request names when it is in model_dir but not loaded (OpenAI, "
        "llama.cpp and token routes; Ollama routes always do). Off: a server with one loaded model answers "
        "every name with it.",
    )
    inline_model_loading_admin_only: bool = Field(
        True,
        description="Only requests with the admin key may load a model inline (as TabbyAPI); others get 403. "
        "false lets any API key load models from model_dir.",
    )
    use_dummy_models: bool = Field(
        False,
        description="List dummy_model_names in /v1/models and answer them with the default model, for clients "
        "that insist on a name.",
    )
    dummy_model_names: list[str] = Field(
        default_factory=lambda: ["gpt-3.5-turbo"],
        description="Model names accepted when use_dummy_models is on.",
    )
    max_loaded_models: int = Field(
        1, ge=1,
        description="Models kept in memory at once, each with its own engine. Loading one more unloads the "
        "least recently used idle model; a model with running requests is never unloaded to make room.",
    )
    load_wait_timeout: float = Field(
        30.0, ge=0,
        description="Seconds a load that needs room waits for a loaded model to finish its running requests "
        "before it is refused with 503 and Retry-After.",
    )
    keep_alive: float | None = Field(
        None, ge=0,
        description="Seconds a loaded model may sit idle (no running requests) before it is unloaded to free "
        "memory; it is loaded again by the next request that names it. null keeps models loaded. A model's "
        "parley.yml (or Ollama's keep_alive) sets it per model.",
    )
    default_max_tokens: int | None = Field(
        None, ge=1,
        description="Tokens generated when a request sets no limit. null fills the remaining context.",
    )
    reasoning_parser: bool = Field(
        True,
        description="Split text between the reasoning markers into reasoning_content (thinking models). Output "
        "that does not start with the start marker is left as it is.",
    )
    reasoning_start_marker: str = Field("<think>", min_length=1, description="Text that opens model reasoning.")
    reasoning_end_marker: str = Field("</think>", min_length=1, description="Text that closes model reasoning.")
    hf_endpoint: str | None = Field(
        None, pattern=r"^https?://[^\s]+$",
        description="Hugging Face Hub address for downloads (POST /v1/download, /api/pull, main.py download), "
        "e.g. a mirror. null uses the HF_ENDPOINT environment variable, else https://huggingface.co.",
    )
    mmproj: str | None = Field(
        None,
        description="Vision projector GGUF for the model (a file name in the model's folder, or a path). null "
        "uses the first mmproj*.gguf in a model folder (mmproj-NAME*.gguf beside NAME.gguf); none disables vision.",
    )
    tool_format: Literal["auto", "hermes", "llama3", "mistral"] = Field(
        "auto",
        description="How the model writes tool calls. auto reads it from the chat template (hermes when unsure).",
    )


class DraftModelConfig(_Section):
    """Speculative decoding."""

    draft_model_dir: str = Field("models", description="Folder that holds draft models.")
    draft_model_name: str | None = Field(
        None,
        description="Draft model file or folder in draft_model_dir; used when draft_mode is model.",
    )
    draft_mode: Literal["none", "model", "ngram"] = Field(
        "none",
        description="none disables speculative decoding; model uses the draft model; ngram drafts from the "
        "prompt.",
    )
    draft_max_tokens: int = Field(8, ge=1, le=64, description="Tokens drafted per step.")
    draft_adaptive: bool = Field(
        True,
        description="llama.cpp: guess only as far as guessing pays, from measured costs and acceptance (it "
        "turns a draft model off where it is slower than decoding). false guesses draft_max_tokens every step, "
        "to measure a drafter.",
    )


class LoraEntry(_Section):
    """One LoRA adapter; `name:scaling` strings (flags, env) are accepted too."""

    name: str = Field(description="Adapter file or folder in lora_dir.")
    scaling: float = Field(1.0, description="Adapter strength.")

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data: Any) -> Any:
        if isinstance(data, str):
            name, sep, scaling = data.rpartition(":")
            return {"name": name, "scaling": scaling} if sep else {"name": data}
        return data


class LoraConfig(_Section):
    """LoRA adapters applied to the main model."""

    lora_dir: str = Field("loras", description="Folder that holds LoRA adapters.")
    loras: list[LoraEntry] = Field(
        default_factory=list,
        description="Adapters loaded with the model, e.g. [{name: my-lora, scaling: 0.8}]. On the command "
        "line: --loras my-lora:0.8.",
    )


class RemoteModelEntry(_Section):
    """One model served by upstream servers (README, "Remote models")."""

    name: str = Field(..., min_length=1, description="The name clients use.")
    kind: Literal["openai", "ollama"] = Field(
        ..., description="openai: any OpenAI-compatible server (vLLM, SGLang, llama-server, TGI, another Parley); "
        "ollama: Ollama's native API.",
    )
    replicas: list[str] = Field(..., min_length=1, description="Base URLs, e.g. http://10.0.0.5:8000 (no /v1).")
    upstream_model: str | None = Field(None, description="The upstream's name for the model. null: name.")
    server: Literal["vllm", "sglang", "llamacpp", "parley", "openai"] = Field(
        "vllm", description="For kind openai, which server it is: decides the extra fields it is sent.",
    )
    api_key_env: str | None = Field(
        None, description="Environment variable holding the upstream's API key (never the key itself).",
    )
    routing: Literal["least_outstanding", "round_robin", "prefix_affinity"] = "least_outstanding"
    max_inflight: int = Field(64, ge=1, description="Requests in flight per replica; past it on all: 503.")
    connect_timeout: float = Field(5.0, gt=0)
    read_timeout: float = Field(600.0, gt=0, description="Longest silence between two bytes of an answer.")
    health_interval: float = Field(10.0, ge=0, description="Seconds between active health checks; 0: none.")
    eject_seconds: float = Field(10.0, ge=0, description="A replica that failed is left out this long.")
    retries: int = Field(2, ge=0, description="Other replicas tried before the first byte reached the client.")
    affinity_prefix_chars: int = Field(512, ge=1, description="prefix_affinity hashes this much of the prompt.")
    affinity_load_factor: float = Field(1.25, ge=1.0, description="prefix_affinity's bound on a replica's load.")
    context_length: int = Field(32768, ge=16, description="The upstream model's context in tokens.")
    prompt_template: str | None = Field(
        None, description="Template (templates/) for prompts sent as text. null: chatml.",
    )
    chat: bool = Field(True, description="Send chat requests as messages, rendered by the upstream.")
    strict_sampling: bool = Field(False, description="Refuse sampler fields the upstream lacks (default: drop).")

    @model_validator(mode="before")
    @classmethod
    def _from_json(cls, data: Any) -> Any:
        if isinstance(data, str):  # from an environment variable or flag: one JSON object
            import json

            return json.loads(data)
        return data


class RemoteConfig(_Section):
    """Models served by other servers behind Parley's front door; more can be NAME.remote.yml files in model_dir."""

    remote_models: list[RemoteModelEntry] = Field(
        default_factory=list,
        description="e.g. [{name: llama-70b, kind: openai, server: vllm, replicas: [http://gpu1:8000, "
        "http://gpu2:8000], upstream_model: meta-llama/Llama-3.3-70B-Instruct, api_key_env: VLLM_KEY, "
        "routing: prefix_affinity}].",
    )

    @model_validator(mode="after")
    def _unique_names(self) -> RemoteConfig:
        seen: set[str] = set()
        for entry in self.remote_models:
            if entry.name in seen:
                raise ValueError(f"remote_models: the name '{entry.name}' is used twice; give each model its own name")
            seen.add(entry.name)
        return self


class SamplingConfig(_Section):
    """Server-side sampler defaults."""

    override_preset: str | None = Field(
        None,
        description="Preset file in sampler_overrides/ without .yml, applied to every request. null applies "
        "none.",
    )


class EmbeddingsConfig(_Section):
    """Embedding and rerank models (/v1/embeddings, /api/embed, /v1/rerank, ...)."""

    embedding_model_dir: str | None = Field(
        None,
        description="A second folder of embedding models, listed together with model.model_dir. null: embedding "
        "models live in model.model_dir.",
    )
    embedding_model_name: str | None = Field(
        None,
        description="Embedding model to load at startup: a GGUF (llama.cpp) or a sentence-transformers / "
        "cross-encoder folder (infinity-emb). null: none until one is loaded.",
    )
    embeddings_device: Literal["cpu", "cuda", "auto"] = Field(
        "cpu",
        description="Device for infinity-emb models (GGUF embedding models follow model.n_gpu_layers).",
    )
    max_loaded_embedding_models: int = Field(
        2,
        ge=1,
        description="Embedding and rerank models loaded at once, counted apart from model.max_loaded_models; "
        "the least recently used idle one makes room.",
    )


class StoreConfig(_Section):
    """Where assistants, threads, stored responses and conversations are kept."""

    url: str | None = Field(
        None,
        description="Database URL, e.g. postgresql://user:password@host:5432/parley to share one store between "
        "several Parley processes (needs the store extra: asyncpg). null keeps a SQLite file in data_dir.",
    )
    data_dir: str = Field("data", description="Folder for the SQLite store (parley.db) when url is null.")
    max_thread_messages: int = Field(
        10_000, ge=1, description="Most messages one thread or conversation may hold; adding more is a 400.",
    )


class VisionConfig(_Section):
    """Images in requests: fetching image URLs a client sends (the server's only client-chosen fetch)."""

    allow_remote_images: bool = Field(
        True,
        description="Fetch http(s) image URLs. Each fetch resolves the host first and refuses loopback, private, "
        "link-local, multicast and other non-public addresses (cloud metadata included), re-checking every "
        "redirect. false accepts only data: URIs and base64 images.",
    )
    remote_image_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts fetched even when they resolve to non-public addresses: host names, IP addresses or "
        "networks (10.0.0.0/8), e.g. an internal image store.",
    )
    remote_image_max_bytes: int = Field(
        20_000_000, ge=1, description="Largest image a URL may return, in bytes; the transfer stops beyond it.",
    )
    remote_image_timeout: float = Field(
        10.0, gt=0, description="Seconds one image URL may take in all (connecting, redirects, transfer).",
    )
    remote_image_max_redirects: int = Field(3, ge=0, le=10, description="Redirects followed per image URL.")


class DeveloperConfig(_Section):
    """Switches for development and debugging."""

    unsafe_launch: bool = Field(False, description="Skip startup safety checks such as dependency versions.")
    debug_errors: bool = Field(
        False,
        description="Include tracebacks in 500 responses. Leaks internals; never enable in production.",
    )
    disable_uvloop: bool = Field(False, description="Use the default asyncio event loop instead of uvloop.")


def _section(model: type[_Section]) -> Any:
    """A section field; its docstring doubles as the sample file's section comment."""
    return Field(default_factory=model, description=model.__doc__)


class ParleyConfig(_Section):
    """The whole configuration; one instance is built at startup."""

    network: NetworkConfig = _section(NetworkConfig)
    logging: LoggingConfig = _section(LoggingConfig)
    limits: LimitsConfig = _section(LimitsConfig)
    model: ModelConfig = _section(ModelConfig)
    draft_model: DraftModelConfig = _section(DraftModelConfig)
    lora: LoraConfig = _section(LoraConfig)
    sampling: SamplingConfig = _section(SamplingConfig)
    embeddings: EmbeddingsConfig = _section(EmbeddingsConfig)
    store: StoreConfig = _section(StoreConfig)
    vision: VisionConfig = _section(VisionConfig)
    developer: DeveloperConfig = _section(DeveloperConfig)
    remote: RemoteConfig = _section(RemoteConfig)


def section_models() -> dict[str, type[_Section]]:
    return {name: info.annotation for name, info in ParleyConfig.model_fields.items()}  # type: ignore[misc]


@cache
def field_sections() -> dict[str, str]:
    """Bare key -> section name. Fails loudly if a key is defined twice."""
    owners: dict[str, str] = {}
    for section, model in section_models().items():
        for key in model.model_fields:
            if key in owners:
                raise RuntimeError(f"config key {key!r} is defined in both {owners[key]} and {section}")
            owners[key] = section
    return owners


def env_var_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section}_{key}".upper()


# ---------------------------------------------------------------- loading
