"""Property-based fuzzing of every operation in Parley's OpenAPI schema (schemathesis).

Parley runs as users run it, with the real model. For each operation
schemathesis generates valid (positive) and schema-violating (negative)
requests; each must answer without a 5xx, with the schema's declared status
codes, content types and response shapes (the dialect error models of
endpoints/http/error_docs.py for 4xx/5xx, in place of FastAPI's default 422
`HTTPValidationError`, which Parley never sends), negative data must be
refused, and the server must be healthy with nothing leaked at the end.

Bounded: generation fields are capped (max_tokens, max_length, n_predict and
Ollama's num_predict at 8, n at 2), a few examples per operation, no
shrinking, a fixed seed. Operations that would replace the model or reach the
network (model load/unload, pull, download) are left out; preset and template switches
are undone after each call.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import MODEL_NAME, LiveServer, run_server

EXAMPLES = {GenerationMode.POSITIVE: 10, GenerationMode.NEGATIVE: 6}
CAP = 8
# Replace or unload the model, or download from the network: not fuzzed (tests/api covers their validation).
SKIPPED = {("POST", "/v1/model/load"), ("POST", "/v1/model/unload"), ("POST", "/api/pull"), ("POST", "/v1/download")}
# State a call may change, and the call that undoes it.
RESET_AFTER = {
    "/v1/template/switch": "/v1/template/unload",
    "/v1/sampling/override/switch": "/v1/sampling/override/unload",
}
# Documented 501s: Ollama's model-file management and llama.cpp's slot actions have no equivalent here (see README).
NOT_IMPLEMENTED = {
    "/api/copy", "/api/delete", "/api/create", "/api/push", "/api/blobs/{digest}", "/slots/{id_slot}",
}


def cap_generation(path: str, body: Any) -> None:
    """Keep every generation cheap: small length caps, few choices, no unloading keep_alive."""
    if not isinstance(body, dict):
        return
    if path in ("/v1/chat/completions", "/v1/completions", "/v1/messages"):
        body["max_tokens"] = CAP
        body.pop("max_completion_tokens", None)
    elif path == "/v1/responses":
        body["max_output_tokens"] = CAP
    elif path in ("/v1/threads/runs", "/v1/threads/{thread_id}/runs"):
        body["max_completion_tokens"] = CAP
    elif path in ("/api/v1/generate", "/api/extra/generate/stream"):
        body["max_length"] = CAP
    elif path == "/infill":
        body["n_predict"] = CAP
    elif path in ("/completion", "/completions"):
        body["n_predict"] = CAP  # llama.cpp's: it wins over max_tokens and max_completion_tokens
    elif path in ("/api/chat", "/api/generate"):
        body.pop("keep_alive", None)  # keep_alive 0 with no prompt unloads the model
        options = body.get("options")
        if options is None or isinstance(options, dict):
            body["options"] = {**(options or {}), "num_predict": CAP}
    for name in ("n", "best_of", "n_cmpl"):
        if isinstance(body.get(name), int) and body[name] > 2:
            body[name] = 2


@pytest.fixture(scope="module")
def fuzz_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with run_server(model_dir, MODEL_NAME, tmp_path_factory.mktemp("fuzz")) as server:
        yield server


def test_fuzz_every_operation(fuzz_server: LiveServer) -> None:
    base = fuzz_server.base_url
    auth = {"Authorization": f"Bearer {fuzz_server.keys.admin}"}
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    checks = [not_a_server_error, status_code_conformance, response_schema_conformance, content_type_conformance]
    failures: list[str] = []
    counts: Counter[str] = Counter()
    statuses: Counter[int] = Counter()

    def run(operation: Any, mode: GenerationMode) -> None:
        @settings(
            max_examples=EXAMPLES[mode], deadline=None, derandomize=True, database=None,
            phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case: Any) -> None:
            cap_generation(operation.path, case.body)
            counts[mode.value] += 1
            try:
                response = case.call(base_url=base, headers=auth, timeout=120)
            except Exception as exc:  # noqa: BLE001 - a dropped connection is a finding too
                failures.append(f"{operation.label} [{mode.value}]: request failed: {exc!r}")
                return
            statuses[response.status_code] += 1
            if operation.path in NOT_IMPLEMENTED and response.status_code == 501:
                return
            mode_checks = checks + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])
            try:
                case.validate_response(response, checks=mode_checks)
            except (Exception, FailureGroup) as exc:  # noqa: BLE001 - collected, reported below
                failures.append(f"{operation.label} [{mode.value}]: {str(exc)[:1500]}")
            if operation.path in RESET_AFTER and response.status_code == 200:
                httpx.post(base + RESET_AFTER[operation.path], headers=auth, timeout=30).raise_for_status()

        try:
            fuzz()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # nothing to break in an operation without inputs

    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if (operation.method.upper(), operation.path) in SKIPPED:
            continue
        operations += 1
        for mode in EXAMPLES:
            run(operation, mode)

    total = sum(counts.values())
    print(f"\nfuzzed {operations} operations with {total} generated cases "
          f"({counts['positive']} positive, {counts['negative']} negative); statuses {dict(sorted(statuses.items()))}")
    assert not failures, f"{len(failures)} failing cases:\n\n" + "\n\n".join(failures[:20])
    assert operations >= 40 and total >= operations * 5
    assert not any(code >= 500 and code != 501 for code in statuses)
    # Nothing crashed or leaked.
    assert fuzz_server.proc.poll() is None
    health = httpx.get(base + "/health", timeout=10).json()
    assert health["status"] == "healthy"
    stats = health["models"][MODEL_NAME]
    assert stats["slots_active"] == 0 and stats["queue_depth"] == 0 and stats["kv_cells_used"] == 0
    r = httpx.post(base + "/v1/chat/completions", headers=auth, timeout=60,
                   json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
