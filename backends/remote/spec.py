"""What one remote model is: its upstream kind and server, replicas, routing, limits and timeouts.

Built from config (`remote.remote_models` or a `NAME.remote.yml` in the model
directory) by common/models/remote.py; the engine only reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("openai", "ollama")
# Which OpenAI-compatible server sits behind kind openai: it decides which non-OpenAI fields it takes.
SERVERS = ("vllm", "sglang", "llamacpp", "parley", "openai")
ROUTINGS = ("least_outstanding", "round_robin", "prefix_affinity")


@dataclass(frozen=True)
class RemoteSpec:
    name: str  # the name clients use
    kind: str  # openai | ollama
    replicas: tuple[str, ...]  # base URLs, e.g. http://10.0.0.5:8000 (without /v1)
    upstream_model: str  # the name the upstream knows the model by
    server: str = "vllm"  # for kind openai: vllm | sglang | llamacpp | parley | openai
    api_key: str | None = None  # read from the environment variable the config names
    routing: str = "least_outstanding"
    max_inflight: int = 64  # per replica; past it on every replica a request gets 503
    connect_timeout: float = 5.0
    read_timeout: float = 600.0  # longest silence between two bytes of an upstream answer
    health_interval: float = 10.0  # seconds between active health checks; 0 turns them off
    eject_seconds: float = 10.0  # a replica that failed is left out this long
    retries: int = 2  # other replicas tried before the first byte reached the client
    affinity_prefix_chars: int = 512  # prefix_affinity hashes this much of the prompt's start
    affinity_load_factor: float = 1.25  # a preferred replica may hold this times the mean load
    context_length: int = 32768  # tokens; the upstream checks exactly, Parley only refuses the hopeless
    chat: bool = True  # chat requests go to the upstream's chat endpoint as messages
    strict_sampling: bool = False  # refuse (400) sampler fields the upstream lacks instead of dropping them

    @property
    def health_path(self) -> str:
        return "/api/version" if self.kind == "ollama" else "/health"
