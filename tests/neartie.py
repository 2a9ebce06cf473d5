"""Compare two generations as far as float rounding lets them be compared.

llama.cpp's kernels round differently with the instruction set (AVX2,
AVX-512) and with the batch shape and KV-cell layout, so two runs of one
greedy request can pick different tokens where the top two candidates are
nearly tied. The engine promises equal output only for the same request from
the same cache state, and for a cold vs a cached prompt served alone; any
other pair (batched vs alone, speculative vs plain, ...) is compared here.

Walk both runs token by token. While the tokens match, the prefixes are
identical and the next step is comparable, so the walk goes on, also past
near-ties whose choice came out the same. At the first token that differs the
runs agree if that step was a near-tie in EITHER run (top-2 logprob margin
below `MARGIN`); if it was decisive in both, they disagree. A run that ended
(end-of-generation is not in the logprobs) where the other went on is judged
the same way from the other run's margin.

`MARGIN` is 0.5 nats. Measured on a 2-core AVX-512 machine with SmolLM2 Q4_1,
the top-2 margin of one step moved by at most 0.08 nats between a request
served alone and the same request batched with seven others (one flip, at a
margin of 0.003); 0.5 leaves six times that for other machines.

Sampled runs (temperature > 0) cannot be judged by margins: the random draw is
not visible, so any step with two candidates could flip. `sampled=True`
accepts a first difference only where the two runs' distributions match to
`MARGIN` and each run's token is a listed candidate of the other: rounding
explains it. That cannot tell a rounding flip from a different random draw at
that step, so prefer greedy requests when a comparison has to be strong.

Logprobs come from: engine `TokenLogprob`s (`steps_from_engine`), OpenAI chat
and completion responses (`steps_from_openai`, `logprobs: true` +
`top_logprobs >= 2`, or `logprobs >= 2`), and the `{token, logprob,
top_logprobs}` entry lists Ollama (`logprobs`) and KoboldCpp
(`logprobs.content`) return (`steps_from_entries`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MARGIN = 0.5  # nats; see the module docstring


@dataclass(frozen=True)
class Step:
    """One generated token and the model's top candidates there, best first."""

    token: str | bytes | int  # what identifies the choice: id, raw bytes or text
    text: str  # its text, for messages
    top: tuple[tuple[str | bytes | int, float], ...]  # (candidate, logprob), best first

    @property
    def margin(self) -> float:
        """Top-1 minus top-2 logprob (inf with one candidate)."""
        if len(self.top) < 2:
            return math.inf
        return self.top[0][1] - self.top[1][1]


@dataclass(frozen=True)
class Comparison:
    agree: bool
    compared: int  # leading tokens found equal
    stopped_at: int | None  # first differing (or unmatched) index, None when both runs are identical
    detail: str

    def __bool__(self) -> bool:
        return self.agree


def _near_tie(step: Step | None, margin: float) -> bool:
    return step is not None and step.margin < margin


def _explained_by_rounding(a: Step, b: Step, margin: float) -> bool:
    """Sampled: same distribution to `margin`, and each choice is a candidate in the other run."""
    da, db = dict(a.top), dict(b.top)
    shared = set(da) & set(db)
    if a.token not in db or b.token not in da or not shared:
        return False
    return all(abs(da[k] - db[k]) < margin for k in shared)


def compare_steps(a: Sequence[Step], b: Sequence[Step], *, margin: float = MARGIN,
                  sampled: bool = False) -> Comparison:
    """Agree up to the first token that differs, if rounding can explain that one (see module docstring)."""
    for step in (*a, *b):
        if len(step.top) < 2 and not sampled:
            raise ValueError("a step lists fewer than 2 candidates: request top_logprobs >= 2 (OpenAI chat), "
                             "logprobs >= 2 (completions) or SamplingParams(logprobs=2)")
    n = min(len(a), len(b))
    i = next((k for k in range(n) if a[k].token != b[k].token), n)
    seen = "".join(s.text for s in a[:i])
    if i == len(a) == len(b):
        return Comparison(True, i, None, f"identical ({i} tokens)")
    sa = a[i] if i < len(a) else None
    sb = b[i] if i < len(b) else None
    if sampled and sa is not None and sb is not None:
        ok = _explained_by_rounding(sa, sb, margin)
        why = "same distribution there, rounding explains it" if ok else "the distributions there differ"
    else:
        ok = _near_tie(sa, margin) or _near_tie(sb, margin)
        why = (f"margins {_fmt(sa)} / {_fmt(sb)} nats vs threshold {margin}: "
               + ("a near-tie, rounding may flip it" if ok else "decisive in both runs"))
    what = (f"{sa.text if sa else '<end>'!r} vs {sb.text if sb else '<end>'!r}")
    return Comparison(ok, i, i, f"first difference at token {i} after {seen!r}: {what}; {why}")


def _fmt(step: Step | None) -> str:
    return "end" if step is None else f"{step.margin:.3f}"


def assert_agree(a: Sequence[Step], b: Sequence[Step], *, margin: float = MARGIN, sampled: bool = False,
                 label: str = "") -> Comparison:
    """compare_steps, raising AssertionError with the reason when the runs disagree."""
    result = compare_steps(a, b, margin=margin, sampled=sampled)
    assert result.agree, (
        f"{label + ': ' if label else ''}the two generations disagree beyond float rounding, {result.detail}. "
        "Look for crossed sequences, a stale KV cache or a sampler difference between the two paths."
    )
    return result


SHIFT = 0.3  # nats; a candidate's logprob moving more than this is not rounding (see MARGIN's figures)


def clearly_differ(a: Sequence[Step], b: Sequence[Step], *, shift: float = SHIFT) -> bool:
    """True when two runs of the same prompt come from different distributions (another adapter,
    another sampler), not from rounding: over their common prefix and the first step after it, some
    candidate both runs list moves by more than `shift`, or the two runs list no candidate in common.

    `compare_steps` cannot say this: a run whose first token differs at a near-tie "agrees" there."""
    n = min(len(a), len(b))
    i = next((k for k in range(n) if a[k].token != b[k].token), n)
    for k in range(min(i + 1, n)):
        da, db = dict(a[k].top), dict(b[k].top)
        shared = set(da) & set(db)
        if not shared or any(abs(da[t] - db[t]) > shift for t in shared):
            return True
    return False


# -- extracting steps ---------------------------------------------------------------------------


def steps_from_engine(logprobs: Iterable[Any]) -> list[Step]:
    """From backends.base.TokenLogprob items (collect them from TextDelta.logprobs)."""
    return [Step(lp.token_id, lp.token, tuple((tid, v) for _, tid, v in lp.top)) for lp in logprobs]


def _entry_key(entry: Mapping[str, Any]) -> str | bytes:
    raw = entry.get("bytes")
    return bytes(raw) if raw is not None else entry["token"]


def steps_from_entries(entries: Iterable[Mapping[str, Any]]) -> list[Step]:
    """From `[{token, logprob, bytes?, top_logprobs: [{token, logprob, bytes?}]}]` lists.

    That is OpenAI chat's `logprobs.content`, Ollama's `logprobs` and
    KoboldCpp's `logprobs.content`.
    """
    steps = []
    for e in entries:
        top = sorted(((_entry_key(t), float(t["logprob"])) for t in e.get("top_logprobs") or []),
                     key=lambda kv: -kv[1])
        steps.append(Step(_entry_key(e), e["token"], tuple(top)))
    return steps


def steps_from_openai(response: Mapping[str, Any], choice: int = 0) -> list[Step]:
    """From an OpenAI chat.completion or text_completion response dict."""
    try:
        logprobs = response["choices"][choice]["logprobs"]
    except (KeyError, IndexError, TypeError):
        logprobs = None
    if not logprobs:
        raise ValueError("the response has no logprobs: send logprobs=true and top_logprobs=2 (chat) "
                         "or logprobs=2 (completions)")
    if "content" in logprobs:
        return steps_from_entries(logprobs["content"] or [])
    return [Step(token, token, tuple(sorted(top.items(), key=lambda kv: -kv[1])))
            for token, top in zip(logprobs["tokens"], logprobs["top_logprobs"], strict=True)]


def steps_from_stream(chunks: Iterable[Mapping[str, Any]], choice: int = 0) -> list[Step]:
    """From OpenAI stream chunks (dicts), joining each frame's logprobs."""
    steps: list[Step] = []
    for chunk in chunks:
        for c in chunk.get("choices") or []:
            if c.get("index", 0) == choice and c.get("logprobs"):
                steps += steps_from_openai({"choices": [c]})
    return steps


def text_of(steps: Sequence[Step]) -> str:
    return "".join(s.text for s in steps)
