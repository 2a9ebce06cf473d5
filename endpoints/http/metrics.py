"""Prometheus metrics, one registry per app (never the process-wide default one).

Counters and histograms are updated as requests run (HTTP middleware, the
generation event stream, model loads, refusals); engine gauges (queue depth,
active sequences, KV cells) are read from each loaded engine's `stats()` when
/metrics is scraped, so they cost nothing between scrapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from loguru import logger
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

# (name, help, EngineStats attribute)
ENGINE_GAUGES = (
    ("parley_queue_depth", "Requests waiting for a free sequence slot.", "queue_depth"),
    ("parley_active_sequences", "Sequences being generated (or prefilled) now.", "slots_active"),
    ("parley_sequence_slots", "Sequence slots the engine runs at once (max_batch_size).", "slots_total"),
    ("parley_kv_cells_used", "KV cache cells held by running sequences.", "kv_cells_used"),
    ("parley_kv_cells_total", "KV cache cells in the context.", "kv_cells_total"),
    ("parley_kv_cells_cached", "KV cache cells holding reusable prefixes of finished requests.",
     "cached_prefix_tokens"),
)


class EngineCollector(Collector):
    """Gauges read from every loaded engine at scrape time, and the server's own state."""

    def __init__(
        self,
        engines: Callable[[], Mapping[str, Any]],
        in_flight: Callable[[], int],
        draining: Callable[[], bool],
    ) -> None:
        self._engines = engines
        self._in_flight = in_flight
        self._draining = draining

    def collect(self) -> Iterable[Metric]:
        families = {name: GaugeMetricFamily(name, doc, labels=["model"]) for name, doc, _ in ENGINE_GAUGES}
        drafted = CounterMetricFamily(
            "parley_draft_tokens", "Speculative decoding: tokens guessed by the drafter.", labels=["model"]
        )
        accepted = CounterMetricFamily(
            "parley_accepted_draft_tokens", "Speculative decoding: guessed tokens the model kept.", labels=["model"]
        )
        rate = GaugeMetricFamily(
            "parley_draft_acceptance_rate", "Speculative decoding: accepted / guessed since load.", labels=["model"]
        )
        loaded = self._engines()
        for model_name, engine in loaded.items():
            try:
                stats = engine.stats()
            except Exception as exc:  # noqa: BLE001 - a scrape must not fail because one engine did
                logger.warning("Metrics: could not read the stats of {}: {}", model_name, exc)
                continue
            for name, _, attr in ENGINE_GAUGES:
                families[name].add_metric([model_name], float(getattr(stats, attr)))
            drafted.add_metric([model_name], float(stats.draft_tokens))
            accepted.add_metric([model_name], float(stats.accepted_draft_tokens))
            if stats.draft_tokens:
                rate.add_metric([model_name], stats.accepted_draft_tokens / stats.draft_tokens)
        yield from families.values()
        yield from _replica_metrics(loaded)
        yield drafted
        yield accepted
        yield rate
        yield GaugeMetricFamily("parley_models_loaded", "Models loaded now.", value=len(loaded))
        yield GaugeMetricFamily(
            "parley_generations_in_flight", "Generation and embedding requests admitted and not finished yet.",
            value=self._in_flight(),
        )
        yield GaugeMetricFamily(
            "parley_draining", "1 while the server finishes running requests before it exits.",
            value=1.0 if self._draining() else 0.0,
        )


def _replica_metrics(engines: Mapping[str, Any]) -> Iterable[Metric]:
    """Per upstream server of each remote model: in flight, requests, errors, ejections, up, latency."""
    labels = ["model", "replica"]
    in_flight = GaugeMetricFamily("parley_replica_in_flight", "Requests in flight to this upstream replica.", labels=labels)
    up = GaugeMetricFamily("parley_replica_up", "1 while the replica passes health checks and is not ejected.",
                           labels=labels)
    requests = CounterMetricFamily("parley_replica_requests", "Requests sent to this replica (retries included).",
                                   labels=labels)
    errors = CounterMetricFamily("parley_replica_errors", "Connection errors and 5xx answers from this replica.",
                                 labels=labels)
    ejections = CounterMetricFamily("parley_replica_ejections", "Times this replica was left out after a failure.",
                                    labels=labels)
    latency = CounterMetricFamily("parley_replica_first_byte_seconds", "Time to the first byte of each answer "
                                  "(a _total sum; divide by parley_replica_answers).", labels=labels)
    answers = CounterMetricFamily("parley_replica_answers", "Answers this replica began.", labels=labels)
    for model_name, engine in engines.items():
        replica_stats = getattr(engine, "replica_stats", None)
        for r in replica_stats() if replica_stats is not None else ():
            key = [model_name, r.url]
            in_flight.add_metric(key, float(r.in_flight))
            up.add_metric(key, 1.0 if r.healthy else 0.0)
            requests.add_metric(key, float(r.requests))
            errors.add_metric(key, float(r.errors))
            ejections.add_metric(key, float(r.ejections))
            latency.add_metric(key, r.latency_seconds_sum)
            answers.add_metric(key, float(r.latency_count))
    return (in_flight, up, requests, errors, ejections, latency, answers)


class Metrics:
    """Every series Parley exports, on its own registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.http_requests = Counter(
            "parley_http_requests", "HTTP requests by route template and status.",
            ["method", "route", "status"], registry=r,
        )
        self.http_duration = Histogram(
            "parley_http_request_duration_seconds",
            "Time from a request's arrival until its response (a whole stream) is sent.",
            ["method", "route"], buckets=HTTP_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter(
            "parley_prompt_tokens", "Prompt tokens of finished generations (once per prompt, whatever n).",
            ["model"], registry=r,
        )
        self.generated_tokens = Counter(
            "parley_generated_tokens", "Tokens generated (completion tokens, every choice).", ["model"], registry=r,
        )
        self.generations = Counter(
            "parley_generations", "Finished generations (one per choice) by finish reason.",
            ["model", "finish_reason"], registry=r,
        )
        self.embedding_requests = Counter(
            "parley_embedding_requests", "Embedding and rerank requests served, by model.", ["model"], registry=r,
        )
        self.embedded_tokens = Counter(
            "parley_embedded_tokens", "Input tokens read by embedding and rerank requests.", ["model"], registry=r,
        )
        self.ttft = Histogram(
            "parley_time_to_first_token_seconds", "Time from a request's arrival to its first generated token.",
            ["model"], buckets=TTFT_BUCKETS, registry=r,
        )
        self.itl = Histogram(
            "parley_inter_token_latency_seconds", "Time between two generated tokens of one sequence.",
            ["model"], buckets=ITL_BUCKETS, registry=r,
        )
        self.model_load = Histogram(
            "parley_model_load_seconds", "Time a model load took.", ["model"], buckets=LOAD_BUCKETS, registry=r,
        )
        self.rate_limited = Counter(
            "parley_rate_limit_refusals", "Requests refused with 429, by key name and limit (requests or tokens).",
            ["key", "limit"], registry=r,
        )
        self.draining_refusals = Counter(
            "parley_draining_refusals", "Generation requests refused with 503 while the server was draining.",
            registry=r,
        )

    def watch(self, engines: Callable[[], Mapping[str, Any]], in_flight: Callable[[], int],
              draining: Callable[[], bool]) -> None:
        """Add the scrape-time gauges: `engines()` maps model names to engines with a stats() method."""
        self.registry.register(EngineCollector(engines, in_flight, draining))

    def model_loaded(self, name: str, seconds: float) -> None:
        self.model_load.labels(name).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
