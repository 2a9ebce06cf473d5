"""The speculative guess-length policy: it follows what guesses cost and gain (synthetic step costs)."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from backends.llamacpp.draft_policy import DraftPolicy


def _run(policy: DraftPolicy, steps: int, *, n_seqs: int, fixed: float, per_token: float, acceptance: float,
         draft_per_guess: float = 0.0, decay: float = 1.0, cost: Callable[[int], float] | None = None,
         seed: int = 0) -> tuple[list[int], float]:
    """Drive the policy with steps whose time is fixed + per_token * batch size (or `cost`), plus
    draft_per_guess for each guess; the guess at position i (from 0) is kept with probability
    acceptance * decay**i while all before it were kept. Returns the caps it chose and the tokens
    emitted per second (drafting included)."""
    rng = random.Random(seed)
    caps = []
    seconds = emitted = 0.0
    for _ in range(steps):
        k = policy.limit(n_seqs)
        caps.append(k)
        accepted = 0
        for _ in range(n_seqs if k else 0):
            kept = 0
            while kept < k and rng.random() < acceptance * decay**kept:
                kept += 1
            policy.record(k, kept)
            accepted += kept
        drafted = k * n_seqs
        n_tokens = n_seqs + drafted
        step = cost(n_tokens) if cost else fixed + per_token * n_tokens
        policy.observe(n_tokens, n_seqs, step, drafted, draft_per_guess * drafted)
        seconds += step + draft_per_guess * drafted
        emitted += n_seqs + accepted
    return caps, emitted / seconds


def test_guesses_that_land_cheaply_keep_the_full_length() -> None:
    policy = DraftPolicy(8)
    caps, _ = _run(policy, 200, n_seqs=1, fixed=0.004, per_token=0.002, acceptance=0.97)
    assert caps[-50:] == [8] * 50


def test_guesses_that_do_not_pay_turn_drafting_off_with_rare_probes() -> None:
    policy = DraftPolicy(8)
    # 16 streams, each extra token costs nearly a whole token's share: 30% acceptance loses.
    caps, _ = _run(policy, 2000, n_seqs=16, fixed=0.004, per_token=0.005, acceptance=0.3)
    tail = caps[-1000:]
    assert max(tail) <= 1 and sum(tail) <= 10  # a few one-token probes, backing off
    assert policy.probe_every > 16


def test_a_costly_drafter_is_turned_off_even_when_it_is_always_right() -> None:
    policy = DraftPolicy(4)
    caps, _ = _run(policy, 500, n_seqs=1, fixed=0.004, per_token=0.005, acceptance=1.0, draft_per_guess=0.009)
    assert sum(caps[-200:]) <= 10


def test_a_drafter_that_could_not_pay_even_if_always_right_is_not_probed() -> None:
    """A draft model as slow as the model: a guess costs more than the token it could save, so probing it
    (which for a draft model means catching up on every skipped token) would only lose."""
    policy = DraftPolicy(4)
    _run(policy, 200, n_seqs=1, fixed=0.004, per_token=0.005, acceptance=1.0, draft_per_guess=0.009)
    caps, rate = _run(policy, 3000, n_seqs=1, fixed=0.004, per_token=0.005, acceptance=1.0, draft_per_guess=0.009)
    assert sum(caps) == 0
    assert rate == pytest.approx(1 / 0.009)


def test_probes_follow_the_concurrency_at_which_a_guess_could_pay() -> None:
    """A drafter that pays for one stream (a guess costs 8 ms, a token 9 ms) but not for sixteen (a token's
    share of the step is 5.25 ms): no probes while 16 decode, drafting again once one does."""
    policy = DraftPolicy(4)
    _run(policy, 300, n_seqs=1, fixed=0.004, per_token=0.005, acceptance=1.0, draft_per_guess=0.003)
    caps, _ = _run(policy, 600, n_seqs=16, fixed=0.004, per_token=0.005, acceptance=1.0, draft_per_guess=0.003)
    assert sum(caps[-500:]) == 0
    caps, _ = _run(policy, 600, n_seqs=1, fixed=0.004, per_token=0.005, acceptance=1.0, draft_per_guess=0.003)
    assert caps[-20:] == [4] * 20


def test_drafting_that_caught_up_is_not_charged_as_the_cost_of_a_guess() -> None:
    """A draft model's first step of a request feeds it the whole prompt: that time is not a guess's cost."""
    policy = DraftPolicy(4)
    _run(policy, 100, n_seqs=1, fixed=0.004, per_token=0.005, acceptance=1.0, draft_per_guess=0.001)
    before = policy.snapshot()["draft_s_per_guess"]
    policy.record(4, 4)
    policy.observe(5, 1, 0.03, 4, None)  # a step whose drafting also fed a 300-token prompt
    assert policy.snapshot()["draft_s_per_guess"] == before == pytest.approx(0.001)


def test_drafting_comes_back_when_guesses_start_to_land() -> None:
    policy = DraftPolicy(8)
    _run(policy, 300, n_seqs=1, fixed=0.004, per_token=0.005, acceptance=0.1)
    assert policy.cap == 0
    caps, _ = _run(policy, 600, n_seqs=1, fixed=0.004, per_token=0.005, acceptance=0.99)
    assert caps[-20:] == [8] * 20


@pytest.mark.parametrize(("acceptance", "decay"), [(0.8, 0.85), (0.7, 0.8), (0.6, 0.9), (0.3, 1.0)])
@pytest.mark.parametrize("curve", ["linear", "convex"])
def test_drafting_is_never_slower_than_not_drafting(acceptance: float, decay: float, curve: str) -> None:
    """4 streams on a CPU-like cost curve, guesses kept less often the further they reach: the cap follows
    the last guess's worth, so drafting on emits at least as many tokens per second as drafting off
    (within the cost of learning). A cap set by the average acceptance lost 10-20% here."""
    costs = {"linear": lambda x: 0.017 + 0.0045 * x, "convex": lambda x: 0.02 + 0.003 * x + 0.00005 * x * x}
    cost = costs[curve]
    _, rate = _run(DraftPolicy(8), 3000, n_seqs=4, fixed=0.0, per_token=0.0, acceptance=acceptance, decay=decay,
                   cost=cost)
    assert rate >= 0.97 * 4 / cost(4)


def test_a_fixed_policy_always_guesses_the_ceiling() -> None:
    policy = DraftPolicy(4, adaptive=False)
    caps, _ = _run(policy, 300, n_seqs=4, fixed=0.004, per_token=0.005, acceptance=0.1, draft_per_guess=0.01)
    assert caps == [4] * 300
    assert policy.snapshot()["cap"] == 4
