"""Speculative decoding inside a scheduler step: who gets guesses, and which guesses the samples confirm.

`Speculation` owns the drafter, the cost-following `DraftPolicy` and the
guess counters. The scheduler asks it for guesses before filling a batch,
feeds them after each decoding sequence's last token, and hands each sampled
row range back to `verify`, which keeps the guesses up to the first sample
that differs and cuts the rest out of KV.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from backends.llamacpp.draft_policy import DraftPolicy
from backends.llamacpp.job import Job, SlotState
from backends.llamacpp.speculative import Drafter


class Speculation:
    """One per engine with a drafter; used only on the scheduler thread."""

    def __init__(self, drafter: Drafter, draft_max: int, mem: int, adaptive: bool = True) -> None:
        self._drafter = drafter
        self._draft_max = draft_max
        self._mem = mem
        self.policy = DraftPolicy(draft_max, adaptive=adaptive)
        self.draft_seconds = 0.0  # drafting time of the current step
        self.steady = True  # the current step's drafting fed no more than guesses and the last step's tokens
        self.drafted_count = 0
        self.accepted_count = 0

    def draft(self, active: list[Job], budget: int) -> dict[Job, list[int]]:
        """Guesses for the sequences of `active` that are decoding (not prefilling), within `budget` tokens."""
        self.draft_seconds = 0.0
        self.steady = True
        decoding = [j for j in active if len(j.context) - j.n_cached == 1 and j.n_generated > 0 and j.remaining > 1
                    and not j.spans]
        cap = self.policy.limit(len(decoding)) if decoding else 0  # what guessing has been worth lately
        wants = [(j, min(j.draft_len or cap, cap, j.remaining - 1)) for j in decoding]
        room = budget - len(wants)
        if not cap or room <= 0:
            return {}
        t0 = time.perf_counter()
        got = self._drafter.propose([(j.slot.seq, j.context, k, j.ngram) for j, k in wants])
        self.draft_seconds = time.perf_counter() - t0
        self.steady = self._drafter.caught_up <= self._draft_max + 1
        out: dict[Job, list[int]] = {}
        for job, _ in wants:
            guess = got.get(job.slot.seq, [])[: max(0, room)]
            if guess:
                out[job] = guess
                room -= len(guess)
        return out

    def verify(self, job: Job, idx: int, drafts: list[int], sample: Callable[[Job, int], None]) -> None:
        """Sample at each guessed position in turn (rows from `idx`); keep guesses while the sample equals them."""
        slot = job.slot
        assert slot is not None
        base = job.n_cached  # the last context token and the guesses after it are in KV
        rewinds = job.rewinds
        accepted = 0
        for i in range(len(drafts) + 1):
            sample(job, idx + i)
            if job.state is SlotState.DONE or job.rewinds != rewinds:
                break
            if i < len(drafts) and job.context[-1] == drafts[i]:
                accepted += 1
                continue
            break
        job.n_drafted += len(drafts)
        job.n_accepted += accepted
        self.policy.record(len(drafts), accepted)
        # Guess as far as guesses have been landing: double after a full hit, else one past the hits.
        # Each guessed position costs nearly a token's compute on CPUs, so misses are not free.
        job.draft_len = min(2 * len(drafts), self._draft_max) if accepted == len(drafts) else accepted + 1
        self.drafted_count += len(drafts)
        self.accepted_count += accepted
        if job.rewinds != rewinds:
            return  # a banned string rewound the sequence: its KV is already cut back past the guesses
        keep = base + accepted
        slot.cut(self._mem, keep)
        if job.state is not SlotState.DONE:
            job.n_cached = keep

    def observe(self, n_tokens: int, n_seqs: int, seconds: float, drafted: int) -> None:
        """A decode-only step ended (`seconds`: its time, drafting included): teach the policy what it
        cost and what its guesses earned. Drafting that caught up on a prompt or on the tokens of a pause
        is left out of the drafter's cost per guess."""
        self.policy.observe(n_tokens, n_seqs, seconds - self.draft_seconds, drafted,
                            self.draft_seconds if self.steady else None)
