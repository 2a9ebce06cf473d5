"""The job/iterate machinery both fake exllama modules share, following the libraries' generator semantics.

`enqueue(job)` queues a job; `iterate()` starts pending jobs while fewer than
`max_batch_size` run (a "prefill" result each), then advances every running
job by one token and returns the result dicts exllamav2/v3 return: stage
"streaming" with `text`, `token_ids` (tensor (1, n)), `logits` when asked, and
on the last one `eos`, `eos_reason`, the counts and timings. Like the
libraries: stop strings and banned strings hold text back while they may
still match; a completed stop string ends the job (its text is not emitted);
a completed banned string (matched ignoring case) rewinds the job to where it
began and bans that token there; a stop token ends the job without emitting
it (held text goes in `held`); `min_new_tokens` suppresses stop tokens;
`cancel(job)` drops a pending or running job.
"""

from __future__ import annotations

import codecs
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from tests.fakes.tinylm import TinyLM

Pick = Callable[[Any, np.ndarray, list[int], random.Random], int]  # (job, logits, context, rng) -> token


class FakeJobState:
    """What a job carries through the fake generator (the library's Job holds the same facts)."""

    def __init__(self, input_ids: Any, max_new_tokens: int, min_new_tokens: int, seed: int | None,
                 stop_conditions: Any, decode_special_tokens: bool, return_logits: bool, filters: Any,
                 identifier: Any, banned_strings: Any) -> None:
        ids = input_ids[0] if isinstance(input_ids, list) else input_ids
        self.prompt = [int(t) for t in ids.reshape(-1).tolist()]
        self.context = list(self.prompt)
        self.max_new_tokens = max_new_tokens
        self.min_new_tokens = min_new_tokens
        self.rng = random.Random(seed)
        self.stop_tokens = {t for t in (stop_conditions or ()) if isinstance(t, int)}
        self.stop_strings = [s for s in (stop_conditions or ()) if isinstance(s, str)]
        self.decode_special_tokens = decode_special_tokens
        self.return_logits = return_logits
        self.filters = list(filters or [])
        self.identifier = identifier
        self.banned_strings = [s.lower() for s in (banned_strings or [])]
        self.held: list[tuple[int, str, np.ndarray]] = []  # tokens whose text is held back
        self.bans: dict[int, set[int]] = {}
        self.new_tokens = 0
        self.raw = b""  # undecoded bytes of a split UTF-8 character
        self.serial = -1
        self.t_enqueue = time.perf_counter()
        self.t_start = 0.0


class FakeGeneratorCore:
    def __init__(self, tokenizer: Any, max_batch_size: int, pick: Pick, lm: TinyLM | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.pick = pick
        self.lm = lm or TinyLM()
        self.pending_jobs: list[Any] = []
        self.active_jobs: list[Any] = []
        self._serial = 0

    def num_remaining_jobs(self) -> int:
        return len(self.pending_jobs) + len(self.active_jobs)

    def enqueue(self, job: Any) -> int:
        job.state.serial = self._serial
        self._serial += 1
        self.pending_jobs.append(job)
        return job.state.serial

    def cancel(self, job: Any) -> None:
        if job in self.pending_jobs:
            self.pending_jobs.remove(job)
        elif job in self.active_jobs:
            self.active_jobs.remove(job)

    def iterate(self) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = []
        while self.pending_jobs and len(self.active_jobs) < self.max_batch_size:
            job = self.pending_jobs.pop(0)
            job.state.t_start = time.perf_counter()
            self.active_jobs.append(job)
            for f in job.state.filters:
                self.begin_filter(f, job)
            n = len(job.state.prompt)
            results.append({"job": job, "stage": "prefill", "eos": False, "serial": job.state.serial,
                            "curr_progress": n, "max_progress": n, "identifier": job.state.identifier})
        for job in list(self.active_jobs):
            result = self._step(job)
            if result is not None:
                results.append(result)
                if result["eos"]:
                    self.active_jobs.remove(job)
        return results

    # -- filters (each fake module says how its library's filters are called) ----------------
    def begin_filter(self, f: Any, job: Any) -> None:
        raise NotImplementedError

    def mask(self, f: Any, logits: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def feed(self, f: Any, token: int) -> bool:
        """Advance the filter; True when it says the job should end."""
        raise NotImplementedError

    # -- one token --------------------------------------------------------------------------
    def _step(self, job: Any) -> dict[str, Any] | None:
        s: FakeJobState = job.state
        raw = self.lm.logits(s.context)
        logits = raw.copy()
        for f in s.filters:
            logits = self.mask(f, logits)
        for t in s.bans.get(s.new_tokens, ()):
            logits[t] = -np.inf
        if s.new_tokens < s.min_new_tokens:
            logits[list(s.stop_tokens)] = -np.inf
        token = self.pick(job, logits, s.context, s.rng)
        if token in s.stop_tokens:
            return self._end(job, "stop_token", emit_held=False, eos_triggering_token_id=token)
        s.context.append(token)
        s.new_tokens += 1
        end_filter = any([self.feed(f, token) for f in s.filters])
        piece = self.tokenizer.piece_bytes(token, s.decode_special_tokens)
        text, used = codecs.utf_8_decode(s.raw + piece, "replace", False)
        s.raw = (s.raw + piece)[used:]
        s.held.append((token, text, raw))
        held_text = "".join(t for _, t, _ in s.held)
        for stop in s.stop_strings:
            at = held_text.find(stop)
            if at != -1:
                return self._end(job, "stop_string", emit_held=False, cut=at, eos_triggering_string=stop)
        folded = held_text.lower()
        for banned in s.banned_strings:
            at = folded.find(banned)
            if at != -1:
                self._rewind(job, at)
                return None
        if end_filter:
            return self._end(job, "end_filter", emit_held=True)
        if s.new_tokens >= s.max_new_tokens:
            return self._end(job, "max_new_tokens", emit_held=True)
        hold = self._hold_length(held_text, s)
        return self._release(job, len(held_text) - hold, eos=False)

    def _hold_length(self, text: str, s: FakeJobState) -> int:
        longest = 0
        for needle, hay in [(x, text) for x in s.stop_strings] + [(x, text.lower()) for x in s.banned_strings]:
            for n in range(min(len(needle) - 1, len(hay)), longest, -1):
                if hay.endswith(needle[:n]):
                    longest = n
                    break
        return longest

    def _rewind(self, job: Any, char_at: int) -> None:
        s: FakeJobState = job.state
        acc = 0
        for i, (_, text, _) in enumerate(s.held):
            acc += len(text)
            if acc > char_at:
                break
        dropped = s.held[i:]
        del s.held[i:]
        del s.context[-len(dropped):]
        s.new_tokens -= len(dropped)
        s.bans.setdefault(s.new_tokens, set()).add(dropped[0][0])
        for f in s.filters:
            self.rewind_filter(f, len(dropped))

    def rewind_filter(self, f: Any, n: int) -> None:
        raise NotImplementedError

    def _release(self, job: Any, n_chars: int, *, eos: bool, **extra: Any) -> dict[str, Any] | None:
        s: FakeJobState = job.state
        out: list[tuple[int, str, np.ndarray]] = []
        used = 0
        while s.held and used + len(s.held[0][1]) <= n_chars:
            item = s.held.pop(0)
            used += len(item[1])
            out.append(item)
        if not out and not eos:
            return None
        r: dict[str, Any] = {"job": job, "stage": "streaming", "eos": eos, "serial": s.serial,
                             "identifier": s.identifier, **extra}
        if out:
            r["text"] = "".join(t for _, t, _ in out)
            r["token_ids"] = torch.tensor([[t for t, _, _ in out]], dtype=torch.long)
            if s.return_logits:
                r["logits"] = torch.from_numpy(np.stack([lg for _, _, lg in out]))[None]
        return r

    def _end(self, job: Any, reason: str, *, emit_held: bool, cut: int | None = None, **extra: Any) -> dict[str, Any]:
        s: FakeJobState = job.state
        now = time.perf_counter()
        info = {
            "eos_reason": reason,
            "new_tokens": s.new_tokens,
            "prompt_tokens": len(s.prompt),
            "time_enqueued": s.t_start - s.t_enqueue,
            "time_prefill": 0.0,
            "time_generate": now - s.t_start,
            "cached_tokens": 0,
            **extra,
        }
        if cut is not None:  # a stop string: release the text before it, drop the rest
            before = "".join(t for _, t, _ in s.held)[:cut]
            r = self._release(job, len(before), eos=True, **info)
            if before and "text" in r and r["text"] != before:
                r["text"] = before
            s.held.clear()
            return r  # type: ignore[return-value]
        if emit_held:
            return self._release(job, 10**9, eos=True, **info)  # type: ignore[return-value]
        r = {"job": job, "stage": "streaming", "eos": True, "serial": s.serial, "identifier": s.identifier, **info}
        if s.held:
            r["held"] = {"text": "".join(t for _, t, _ in s.held),
                         "token_ids": torch.tensor([[t for t, _, _ in s.held]], dtype=torch.long)}
        return r


def greedy_or_sample(temperature: float, job: Any, logits: np.ndarray, rng: random.Random) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits / temperature
    z = z - z[np.isfinite(z)].max()
    p = np.where(np.isfinite(z), np.exp(z), 0.0)
    p /= p.sum()
    return int(np.searchsorted(np.cumsum(p), rng.random()))
