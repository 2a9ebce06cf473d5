"""The speculative guess-length policy: it follows what guesses cost and gain (synthetic step costs)."""

from __future__ import annotations

from backends.llamacpp.draft_policy import DraftPolicy


def _run(policy: DraftPolicy, steps: int, *, n_seqs: int, fixed: float, per_token: float, acceptance: float,
         draft_per_guess: float = 0.0) -> list[int]:
    """Drive the policy with steps whose time is fixed + per_token * batch size; returns the caps it chose."""
    caps = []
    for _ in range(steps):
        k = policy.limit()
        caps.append(k)
        drafted = k * n_seqs
        n_tokens = n_seqs + drafted
        accepted = round(acceptance * drafted)
        policy.observe(n_tokens, n_seqs, fixed + per_token * n_tokens, drafted, accepted, draft_per_guess * drafted)
    return caps


def test_guesses_that_land_cheaply_keep_the_full_length() -> None:
    policy = DraftPolicy(8)
    caps = _run(policy, 200, n_seqs=1, fixed=0.004, per_token=0.002, acceptance=0.8)
    assert caps[-50:] == [8] * 50


def test_guesses_that_do_not_pay_turn_drafting_off_with_rare_probes() -> None:
    policy = DraftPolicy(8)
    # 16 streams, each extra token costs nearly a whole token's share: 30% acceptance loses.
    caps = _run(policy, 2000, n_seqs=16, fixed=0.004, per_token=0.005, acceptance=0.3)
    tail = caps[-1000:]
    assert max(tail) <= 1 and sum(tail) <= 10  # a few one-token probes, backing off
    assert policy.probe_every > 16


def test_a_costly_drafter_is_turned_off_even_when_it_is_always_right() -> None:
    policy = DraftPolicy(4)
    caps = _run(policy, 500, n_seqs=1, fixed=0.004, per_token=0.005, acceptance=1.0, draft_per_guess=0.009)
    assert sum(caps[-200:]) <= 10


def test_drafting_comes_back_when_guesses_start_to_land() -> None:
    policy = DraftPolicy(8)
    _run(policy, 300, n_seqs=1, fixed=0.004, per_token=0.005, acceptance=0.1)
    assert policy.cap == 0
    caps = _run(policy, 600, n_seqs=1, fixed=0.004, per_token=0.005, acceptance=0.95)
    assert caps[-20:] == [8] * 20
