"""Rate-limit buckets, who a request is limited as, and the drain logic, on an injected clock."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from endpoints.http.auth import AuthConfigError, AuthManager, KeyEntry, Permission
from common.config.loader import ParleyConfig
from endpoints.http.lifecycle import CUT_MESSAGE, Lifecycle
from endpoints.http.ratelimit import PRUNE_EVERY, LimitKind, Limits, RateLimiter, Subject
from endpoints.http.request_context import Services


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def subject(rpm: int | None = None, tpm: int | None = None, sid: str = "key:a") -> Subject:
    return Subject(sid, "alice", Limits(rpm, tpm))


# --- requests per minute --------------------------------------------------------


def test_request_burst_then_refusal_with_retry_after(clock: Clock) -> None:
    limiter = RateLimiter(clock)
    s = subject(rpm=3)
    assert [limiter.admit(s) for _ in range(3)] == [None, None, None]
    refusal = limiter.admit(s)
    assert refusal is not None and refusal.kind is LimitKind.REQUESTS
    assert refusal.retry_after == 20  # one request refills every 60/3 s
    assert refusal.limit == 3
    assert "3 requests per minute" in refusal.message("alice") and "Retry in 20 s" in refusal.message("alice")


def test_requests_refill_at_the_steady_rate(clock: Clock) -> None:
    limiter = RateLimiter(clock)
    s = subject(rpm=60)  # one per second
    for _ in range(60):
        assert limiter.admit(s) is None
    refusal = limiter.admit(s)
    assert refusal is not None and refusal.retry_after == 1
    clock.now += 0.5
    assert limiter.admit(s) is not None  # half a request refilled: still refused
    clock.now += 0.5
    assert limiter.admit(s) is None
    assert limiter.admit(s) is not None


def test_retry_after_is_whole_seconds_at_least_one(clock: Clock) -> None:
    limiter = RateLimiter(clock)
    s = subject(rpm=1)
    assert limiter.admit(s) is None
    clock.now += 59.5
    refusal = limiter.admit(s)
    assert refusal is not None and refusal.retry_after == 1
    clock.now += 0.5
    assert limiter.admit(s) is None


def test_a_refused_request_takes_nothing(clock: Clock) -> None:
    limiter = RateLimiter(clock)
    s = subject(rpm=2)
    limiter.admit(s)
    limiter.admit(s)
    for _ in range(5):
        assert limiter.admit(s) is not None
    clock.now += 30  # exactly one request refilled, none taken by the refusals
    assert limiter.admit(s) is None


# --- tokens per minute ----------------------------------------------------------------


def test_token_budget_is_charged_after_the_fact_and_refuses_the_next_request(clock: Clock) -> None:
    limiter = RateLimiter(clock)
    s = subject(tpm=600)  # 10 tokens per second
    assert limiter.admit(s) is None
    limiter.charge(s, 650)  # the request ran over the budget: it is not cut, the next one waits
    refusal = limiter.admit(s)
    assert refusal is not None and refusal.kind is LimitKind.TOKENS
    assert refusal.retry_after == 6  # 50 tokens of debt, plus the one needed, at 10 per second
    assert "600 tokens per minute (generated, or read by embeddings)" in refusal.message("alice")
    clock.now += 5
    assert limiter.admit(s) is not None  # 0.0 left: spent
    clock.now += 0.1
    assert limiter.admit(s) is None


def test_a_budget_spent_to_the_last_token_refuses(clock: Clock) -> None:
    limiter = RateLimiter(clock)
    s = subject(tpm=60)
    limiter.charge(s, 60)
    refusal = limiter.admit(s)
    assert refusal is not None and refusal.kind is LimitKind.TOKENS and refusal.retry_after == 1
    limiter.charge(s, 0)  # nothing generated: nothing charged
    clock.now += 1
    assert limiter.admit(s) is None


def test_token_refusal_does_not_spend_a_request(clock: Clock) -> None:
    limiter = RateLimiter(clock)
    s = subject(rpm=1, tpm=60)
    limiter.charge(s, 61)
    assert limiter.admit(s).kind is LimitKind.TOKENS  # type: ignore[union-attr]
    clock.now += 2.0
    assert limiter.admit(s) is None  # the request bucket was still full
    assert limiter.remaining(s)[LimitKind.REQUESTS] == pytest.approx(0.0)


def test_unlimited_subjects_and_kinds(clock: Clock) -> None:
    limiter = RateLimiter(clock)
    free = subject()
    for _ in range(1000):
        assert limiter.admit(free) is None
    limiter.charge(free, 10**9)
    assert limiter.admit(free) is None
    assert len(limiter) == 0  # nothing stored for unlimited callers
    only_tokens = subject(tpm=100, sid="key:b")
    for _ in range(500):
        assert limiter.admit(only_tokens) is None  # no request limit of its own


def test_callers_have_separate_buckets(clock: Clock) -> None:
    limiter = RateLimiter(clock)
    a, b = subject(rpm=1, sid="key:a"), subject(rpm=1, sid="key:b")
    assert limiter.admit(a) is None
    assert limiter.admit(a) is not None
    assert limiter.admit(b) is None


def test_changed_limits_keep_what_was_used(clock: Clock) -> None:
    limiter = RateLimiter(clock)
    for _ in range(10):
        assert limiter.admit(subject(rpm=10)) is None
    assert limiter.admit(subject(rpm=100)) is not None  # raised, but the bucket is still empty
    clock.now += 0.6
    assert limiter.admit(subject(rpm=100)) is None  # ... and refills at the new rate (one per 0.6 s)
    assert limiter.remaining(subject(rpm=100))[LimitKind.REQUESTS] == pytest.approx(0.0)
    clock.now += 60
    assert limiter.remaining(subject(rpm=5))[LimitKind.REQUESTS] == pytest.approx(5.0)  # lowered: capped


def test_idle_callers_are_forgotten(clock: Clock) -> None:
    limiter = RateLimiter(clock)
    busy = subject(rpm=1, sid="ip:busy")
    limiter.admit(busy)
    for i in range(PRUNE_EVERY + 1):
        limiter.admit(subject(rpm=5, sid=f"ip:{i}"))
    clock.now += 60  # everyone refilled
    limiter.admit(subject(rpm=5, sid="ip:new"))
    for i in range(PRUNE_EVERY):
        limiter.admit(subject(rpm=5, sid=f"ip:x{i}"))
    assert len(limiter) < 2 * PRUNE_EVERY


# --- who is limited ------------------------------------------------------------------------


def services(**limits: int) -> Services:
    config = ParleyConfig.model_validate({"limits": limits})
    return Services(config, RateLimiter(), Lifecycle(1.0), None)


def test_keys_use_their_own_limits_or_the_defaults() -> None:
    s = services(default_requests_per_minute=10, default_tokens_per_minute=1000)
    plain = KeyEntry("k1", Permission.API, "plain")
    own = KeyEntry("k2", Permission.API, "own", requests_per_minute=3)
    free = KeyEntry("k3", Permission.API, "free", unlimited=True)
    admin = KeyEntry("k4", Permission.ADMIN, "admin")
    assert s.subject(plain, "1.2.3.4").limits == Limits(10, 1000)
    assert s.subject(own, "1.2.3.4").limits == Limits(3, 1000)
    assert s.subject(free, "1.2.3.4").limits.unlimited
    assert s.subject(admin, "1.2.3.4").limits.unlimited
    assert s.subject(plain, "x").id == s.subject(plain, "y").id != s.subject(own, "x").id
    assert "k1" not in s.subject(plain, "x").id  # the secret never becomes an id or a label
    assert s.subject(plain, "x").name == "plain"


def test_without_auth_the_defaults_apply_per_client_address() -> None:
    s = services(default_requests_per_minute=5)
    a, b = s.subject(None, "10.0.0.1"), s.subject(None, "10.0.0.2")
    assert a.limits == Limits(5, None) and a.id != b.id and a.name == "10.0.0.1"
    assert services().subject(None, "10.0.0.1").limits.unlimited


@pytest.mark.parametrize(
    ("path", "param"),
    [
        ("/v1/chat/completions", "max_tokens"),
        ("/v1/completions", "max_tokens"),
        ("/infill", "n_predict"),
        ("/api/v1/generate", "max_length"),
        ("/api/extra/generate/stream", "max_length"),
        ("/api/chat", "options.num_predict"),
        ("/api/generate", "options.num_predict"),
    ],
)
def test_the_length_field_is_named_per_dialect(path: str, param: str) -> None:
    from fastapi import FastAPI

    from endpoints.http.deps import dialect_at, include_routers
    from endpoints.kobold.router import router as kobold_router
    from endpoints.llamacpp.router import router as llamacpp_router
    from endpoints.ollama.router import routers as ollama_routers
    from endpoints.openai.router import router as openai_router

    app = FastAPI()
    include_routers(app, openai_router, llamacpp_router, *ollama_routers, kobold_router)
    assert dialect_at(app, "POST", path).max_tokens == param


# --- the rich keys file ----------------------------------------------------------------------------


def test_rich_keys_file_with_names_roles_and_limits(tmp_path: Path) -> None:
    path = tmp_path / "api_tokens.yml"
    path.write_text(
        'api_key: "simple-key-000"\n'
        "keys:\n"
        '  - {key: "alice-key-000", name: alice, requests_per_minute: 60, tokens_per_minute: 20000}\n'
        '  - {key: "ops-key-000", name: ops, role: admin}\n'
        '  - {key: "ci-key-000", unlimited: true}\n'
    )
    mgr = AuthManager(path)
    by_name = {e.name: e for e in mgr.entries}
    assert set(by_name) == {"api", "alice", "ops", "key-2"}
    assert by_name["alice"] == KeyEntry("alice-key-000", Permission.API, "alice", 60, 20000)
    assert by_name["ops"].permission is Permission.ADMIN
    assert by_name["key-2"].unlimited
    assert mgr.identify({"Authorization": "Bearer alice-key-000"}) == by_name["alice"]
    assert mgr.authenticate({"X-API-Key": "ops-key-000"}) is Permission.ADMIN
    assert mgr.authenticate({"X-API-Key": "simple-key-000"}) is Permission.API


@pytest.mark.parametrize(
    ("keys", "fragment"),
    [
        ('keys: {a: 1}\n', "must be a list"),
        ('keys: ["just-a-string"]\n', "keys[0] must be a mapping"),
        ('keys: [{name: x}]\n', "keys[0].key"),
        ('keys: [{key: "k-000000", role: root}]\n', "role must be api or admin"),
        ('keys: [{key: "k-000000", requests_per_minute: 0}]\n', "at least 1"),
        ('keys: [{key: "k-000000", tokens_per_minute: "many"}]\n', "whole number"),
        ('keys: [{key: "k-000000", requests_per_minute: true}]\n', "whole number"),
        ('keys: [{key: "k-000000", rpm: 5}]\n', "unknown setting(s) rpm"),
        ('keys: [{key: "k-000000", unlimited: true, tokens_per_minute: 5}]\n', "keep one of them"),
        ('keys: [{key: "k-000000", name: a}, {key: "k-000001", name: a}]\n', "name 'a' is used twice"),
        ('keys: [{key: "k-000000", name: a}, {key: "k-000000", name: b}]\n', "used twice"),
        ('keys: []\n', "no key is configured"),
    ],
)
def test_invalid_rich_keys_are_explained(tmp_path: Path, keys: str, fragment: str) -> None:
    path = tmp_path / "api_tokens.yml"
    path.write_text(keys)
    with pytest.raises(AuthConfigError) as info:
        AuthManager(path)
    assert fragment in str(info.value) and str(path) in str(info.value)


def test_simple_form_still_needs_both_keys(tmp_path: Path) -> None:
    path = tmp_path / "api_tokens.yml"
    path.write_text('api_key: "only-api-key-0"\n')
    with pytest.raises(AuthConfigError, match="admin_key"):
        AuthManager(path)


# --- draining --------------------------------------------------------------------------------


class Generation:
    def __init__(self, lifecycle: Lifecycle) -> None:
        self.lifecycle = lifecycle
        self.aborted: str | None = None

    def abort(self, message: str) -> None:
        self.aborted = message
        self.lifecycle.end(self)  # a cut generation sends its error frame and its response ends


def test_drain_waits_for_running_generations_and_refuses_new_ones() -> None:
    async def run() -> None:
        lifecycle = Lifecycle(shutdown_timeout=30.0)
        g = Generation(lifecycle)
        lifecycle.begin(g)
        drain = asyncio.ensure_future(lifecycle.drain())
        await asyncio.sleep(0.01)
        assert lifecycle.draining and not drain.done()
        refusal = lifecycle.refusal()
        assert refusal.status == 503 and refusal.code == "server_draining"
        assert 1 <= int(refusal.headers["Retry-After"]) <= 30
        lifecycle.end(g)  # it finished on its own
        assert await asyncio.wait_for(drain, 5) == 0
        assert g.aborted is None

    asyncio.run(run())


def test_drain_cuts_what_outlives_the_timeout() -> None:
    async def run() -> None:
        clock = Clock()
        lifecycle = Lifecycle(shutdown_timeout=10.0, clock=clock)
        g = Generation(lifecycle)
        lifecycle.begin(g)
        drain = asyncio.ensure_future(lifecycle.drain())
        await asyncio.sleep(0.01)
        assert not drain.done()
        clock.now += 10.0
        assert await asyncio.wait_for(drain, 5) == 1
        assert g.aborted == CUT_MESSAGE and lifecycle.in_flight == 0

    asyncio.run(run())


def test_a_second_signal_cuts_at_once() -> None:
    async def run() -> None:
        lifecycle = Lifecycle(shutdown_timeout=3600.0)
        g = Generation(lifecycle)
        lifecycle.begin(g)
        drain = asyncio.ensure_future(lifecycle.drain())
        await asyncio.sleep(0.01)
        lifecycle.stop_now()
        assert await asyncio.wait_for(drain, 5) == 1
        assert g.aborted is not None

    asyncio.run(run())
