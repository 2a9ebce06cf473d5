"""How many speculative guesses a step may carry, from what guessing has cost and gained on this engine.

A guessed position is scored in the same batch as the real tokens, so it costs
about what one more batch token costs, plus the drafter's own time. The k-th
guess of a sequence yields a token only when it and every guess before it are
kept, so what decides the cap is the marginal guess: P(the first k guesses all
kept) x (seconds per token of a step without guesses) > (seconds per extra
batch token) + (drafting seconds per guess). (The average acceptance over all
guessed positions overstates the last ones, and a cap set by it lost 10-20% in
simulation when acceptance fell along the guess.) On CPUs at high concurrency a
batch token costs nearly a whole token, so guesses must almost always land; at
one stream they are cheaper.

`DraftPolicy` keeps exponential moving averages of:
- step time against batch size, over decode-only steps (a running linear fit:
  intercept = the step's fixed cost, slope = the cost of one more token);
- for each guess position k, the share of sequences guessing that far whose
  first k guesses were all kept (`record`, per sequence);
- the drafter's seconds per guessed position.

After each step that carried guesses it moves the guess-length cap one up when
its marginal guess paid and one down when it did not. At 0 nothing is guessed, except a
one-token probe every `probe_every` decode steps, which doubles (up to a limit)
each time a probe does not pay, so a drafter that never pays costs almost
nothing, and one whose text starts copying the input is found again. A drafter
too slow to pay even when every guess lands (a draft model about as costly as
the model itself) is not probed at all at that many sequences: a draft model's
probe must first catch up on every token since it last drafted, which costs
about a third of the steps it skipped.
"""

from __future__ import annotations

_ALPHA = 0.1  # weight of the newest step in every average
_MIN_FIT_STEPS = 8  # steps before the cost fit is trusted (until then: every other step guesses at the cap)
_MIN_VARIANCE = 0.25  # batch sizes must vary this much (tokens^2) to refit the slope
_PROBE_FIRST = 16
_CAP_FIRST = 2
_PROBE_LONGEST = 512


class DraftPolicy:
    """One per engine; used only on the scheduler thread."""

    __slots__ = (
        "cap", "probe_every", "_max", "_steps", "_mx", "_my", "_mxx", "_mxy", "_slope", "_intercept",
        "_kept", "_step_tries", "_step_hits", "_draft_cost", "_idle", "_probing", "_adaptive",
    )

    def __init__(self, draft_max: int, *, adaptive: bool = True) -> None:
        """`adaptive` False: every step may guess `draft_max` (the estimates are still kept, for logs)."""
        self._adaptive = adaptive
        self._max = max(0, draft_max)
        # Guesses per sequence this step may carry: it starts low and climbs one a step while guesses pay,
        # so learning what they cost spends little on a drafter that turns out not to pay.
        self.cap = min(self._max, _CAP_FIRST)
        self.probe_every = _PROBE_FIRST
        self._steps = 0
        self._mx = self._my = self._mxx = self._mxy = 0.0
        self._slope: float | None = None  # seconds per extra batch token
        self._intercept = 0.0  # seconds a decode step costs regardless of its size
        self._kept: list[float | None] = [None] * self._max  # [k-1]: P(first k guesses kept | k guessed)
        self._step_tries = [0] * self._max  # this step's sequences that guessed at least k
        self._step_hits = [0] * self._max  # ... and kept their first k
        self._draft_cost: float | None = None  # drafter seconds per guessed position
        self._idle = 0  # decode steps since the cap fell to 0 or the last probe
        self._probing = False

    def limit(self, n_seqs: int = 1) -> int:
        """The most guesses each of `n_seqs` decoding sequences may carry this step (0: draft nothing)."""
        if not self._adaptive:
            return self._max
        if self._slope is None:  # the cost of a batch token is not known yet: alternate sizes to learn it
            self._idle ^= 1
            return self.cap if self._idle else 0
        if self.cap > 0:
            return self.cap
        self._idle += 1
        if self._idle >= self.probe_every and self._could_pay(n_seqs):
            self._idle = 0
            self._probing = True
            return 1
        return 0

    def record(self, guessed: int, kept: int) -> None:
        """One sequence's guesses in this step: how many it carried and how many were kept (a prefix)."""
        for k in range(min(guessed, self._max)):
            self._step_tries[k] += 1
            self._step_hits[k] += k < kept

    def observe(self, n_tokens: int, n_seqs: int, seconds: float, drafted: int,
                draft_seconds: float | None) -> None:
        """One decode-only step: its batch size, its decoding sequences, its time (decode and sampling,
        not drafting), the guesses it carried (what was kept came through `record`) and how long drafting
        them took (None: drafting also caught up on a prompt or a pause, so it says nothing of a guess's
        cost)."""
        if n_seqs <= 0 or seconds <= 0.0:
            return
        self._fit(float(n_tokens), seconds)
        if not drafted:
            return
        a = _ALPHA
        probing, self._probing = self._probing, False
        if draft_seconds is not None:
            per_guess = draft_seconds / drafted
            old_cost = self._draft_cost
            self._draft_cost = per_guess if old_cost is None else (1 - a) * old_cost + a * per_guess
        cost = self._draft_cost or 0.0
        for k, tries in enumerate(self._step_tries):
            if tries:
                rate = self._step_hits[k] / tries
                old = self._kept[k]
                # A probe's result replaces what was measured before drafting stopped (the text has moved on).
                self._kept[k] = rate if old is None or probing else (1 - a) * old + a * rate
        self._step_tries = [0] * self._max
        self._step_hits = [0] * self._max
        if self._slope is None:
            return  # not enough steps to know the cost yet
        plain = self._intercept + self._slope * n_seqs  # this step without guesses
        marginal = self._marginal()
        pays = marginal is not None and marginal * plain / n_seqs > self._slope + cost
        if pays:
            self.cap = min(self._max, self.cap + 1)
            self.probe_every = _PROBE_FIRST
        else:
            self.cap = max(0, self.cap - 1)
            if probing:
                self.probe_every = min(2 * self.probe_every, _PROBE_LONGEST)

    def _could_pay(self, n_seqs: int) -> bool:
        """Whether a guess would pay at `n_seqs` sequences if it were always kept."""
        if self._draft_cost is None or self._slope is None:
            return True
        n = max(1, n_seqs)
        return (self._intercept + self._slope * n) / n > self._slope + self._draft_cost

    def _marginal(self) -> float | None:
        """P(kept) of the last guess the cap allows (one while probing); a position never guessed yet
        borrows the nearest one before it."""
        k = max(self.cap, 1) - 1
        while k > 0 and self._kept[k] is None:
            k -= 1
        return self._kept[k] if self._max else None

    def _fit(self, x: float, y: float) -> None:
        a = _ALPHA if self._steps else 1.0
        self._steps += 1
        self._mx += a * (x - self._mx)
        self._my += a * (y - self._my)
        self._mxx += a * (x * x - self._mxx)
        self._mxy += a * (x * y - self._mxy)
        var = self._mxx - self._mx * self._mx
        if self._steps < _MIN_FIT_STEPS:
            return
        if var >= _MIN_VARIANCE:
            slope = (self._mxy - self._mx * self._my) / var
            self._slope = min(max(slope, 0.0), self._my / self._mx)  # between free and the whole average token
        elif self._slope is None:  # sizes have not varied yet: no slope to trust
            return
        self._intercept = max(0.0, self._my - self._slope * self._mx)

    def snapshot(self) -> dict[str, float | int | None]:
        """The current estimates (for logs and tests)."""
        return {
            "cap": self.cap if self._adaptive else self._max,
            "probe_every": self.probe_every,
            "slope_s": self._slope,
            "intercept_s": self._intercept,
            "acceptance": self._marginal(),
            "draft_s_per_guess": self._draft_cost,
        }
