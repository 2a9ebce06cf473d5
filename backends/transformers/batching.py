"""The generation-thread side of the transformers engine, around transformers' ContinuousBatchingManager.

The manager (from `model.init_continuous_batching()`) owns the paged KV cache,
schedules prefill chunks and decode rows into one forward pass per step, and
runs that loop on its own thread. Parley plugs into it at two seams, both of
which the manager calls on that thread, so every request's state has one owner:

- the manager's input queue is a `TickQueue`: each time the loop looks for new
  requests it first runs `Batcher.tick` (take submissions and cancellations
  from the engine's inbox, admit waiting requests while cache blocks allow,
  `add_request` them); when nothing is running it waits for the inbox instead
  of spinning (transformers 4.57's loop otherwise polls without sleeping);
- the manager's logits processor is the `Batcher` itself: it receives the
  step's logits and, for each request row, applies that request's own
  sampler, token masks and constraint (llguidance), records logprobs, decides
  the token, and turns it into text with the shared `TokenTextStream`. It
  writes the decision back as a one-hot row so the manager's greedy pick
  (`do_sample=False`) takes exactly that token.

A request ends here (EOS, stop, length, cancel) by `cancel_request`, which
frees its blocks at the manager's next step. Admission reserves the blocks a
request can grow to (prompt + max_new), so the cache never runs out mid-step.
"""

from __future__ import annotations

import math
import queue
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from backends.base import EngineStats, Event, Finished, FinishReason
from backends.engine_thread import Cancel, Inbox, RequestHandle, Submit, deliver_all, timed_usage
from backends.logprobs import log_softmax, token_logprob
from backends.sampling import sampling_failure
from backends.text_stream import Release, StopHit, text_delta
from backends.transformers.job import TfJob
from backends.transformers.sampler import RowSampler

IDLE_WAIT_SECONDS = 0.05  # how long the idle loop sleeps between looks at the inbox (woken at once by a post)


@dataclass(frozen=True, slots=True)
class Close:
    """Stop the manager once the running requests are ended."""


class TickQueue(queue.Queue):  # type: ignore[type-arg]
    """The manager's input queue: looking into it runs the batcher's tick (see the module docstring)."""

    def __init__(self, tick: Callable[[], bool], wait: Callable[[float], None]) -> None:
        super().__init__()
        self._tick = tick  # returns True while requests are running
        self._wait = wait  # sleeps until a post or the timeout

    def empty(self) -> bool:
        if not self._tick() and super().empty():
            self._wait(IDLE_WAIT_SECONDS)
            self._tick()
        return super().empty()


class Batcher:
    """Owns every admitted and waiting request; runs only on the manager's thread (stats() excepted)."""

    def __init__(
        self,
        manager: Any,
        inbox: Inbox,
        *,
        piece: Callable[[int], bytes],
        special_ids: frozenset[int],
        eog: tuple[int, ...],
        n_vocab: int,
        device: torch.device,
        max_batch_size: int,
        num_blocks: int,
        block_size: int,
    ) -> None:
        self.manager = manager
        self.inbox = inbox
        self._piece = piece
        self._special = special_ids
        self._eog = frozenset(eog)
        self._eog_tuple = eog
        self._n_vocab = n_vocab
        self._device = device
        self._max_batch = max_batch_size
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = num_blocks - 1  # blocks not reserved; one always stays free (the manager fails at zero)
        self.active: dict[str, TfJob] = {}
        self.waiting: deque[TfJob] = deque()
        self._outbox: dict[TfJob, list[Event]] = {}
        self._closing = False
        self._logits_indices: list[int] = []
        self.finished_count = 0
        self.generated_count = 0

    # -- the input-queue seam ---------------------------------------------------------------
    def tick(self) -> bool:
        for message in self.inbox.take(wait=False) or ():
            if isinstance(message, Submit):
                self._accept(message.job)
            elif isinstance(message, Cancel):
                self._cancel(message.handle)
            else:
                self._closing = True
        self._read_library_outputs()
        if self._closing:
            for job in list(self.waiting) + list(self.active.values()):
                self._finish(job, FinishReason.UNLOAD, error="The model was unloaded.")
            self.waiting.clear()
            self.manager.stop(block=False)  # its loop ends once the cancelled requests are cleared
        else:
            self._admit()
        self._deliver()
        return bool(self.active)

    def _accept(self, job: TfJob) -> None:
        if job.max_new <= 0:
            self._finish(job, FinishReason.LENGTH)
        else:
            self.waiting.append(job)

    def _blocks_for(self, job: TfJob) -> int:
        return math.ceil((job.n_prompt + job.max_new + 1) / self.block_size)

    def _admit(self) -> None:
        while self.waiting and len(self.active) < self._max_batch:
            job = self.waiting[0]
            need = self._blocks_for(job)
            if need > self._free:
                break
            self.waiting.popleft()
            self._free -= need
            job.blocks = need
            job.t_admit = time.perf_counter()
            job.sampler = RowSampler(job.params, n_vocab=self._n_vocab, eog=self._eog_tuple, device=self._device)
            self.active[job.rid] = job
            # The manager never ends a request by itself first: no EOS id, one token more than Parley's limit.
            self.manager.add_request(job.request.prompt_tokens, request_id=job.rid, max_new_tokens=job.max_new + 1)

    def _cancel(self, handle: RequestHandle) -> None:
        for job in self.active.values():
            if job.handle is handle:
                self._finish(job, FinishReason.CANCELLED)
                return
        for job in self.waiting:
            if job.handle is handle:
                self.waiting.remove(job)
                self._finish(job, FinishReason.CANCELLED)
                return

    def _read_library_outputs(self) -> None:
        """Finished or failed results the manager reports (a failed step fails its requests)."""
        while True:
            try:
                out = self.manager.output_queue.get_nowait()
            except queue.Empty:
                return
            job = self.active.get(out.request_id)
            if job is not None and out.error:
                self._finish(job, FinishReason.ERROR, error=f"The engine failed: {out.error}")

    # -- the logits-processor seam ---------------------------------------------------------
    def set_continuous_batching_context(self, logits_indices: torch.Tensor, cu_seq_lens_q: torch.Tensor) -> None:
        self._logits_indices = logits_indices.tolist()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        states = self.manager.batch_processor.requests_in_batch
        indices = self._logits_indices
        for i, state in enumerate(states):
            if state.remaining_prompt_ids or i >= len(indices):
                continue  # a prompt chunk with more to come: nothing to sample
            job = self.active.get(state.request_id)
            if job is None or job.done:
                continue
            row = scores[indices[i]]
            try:
                token = self._sample(job, row)
            except Exception as exc:  # noqa: BLE001 - one request's sampling must not stop the loop
                self._finish(job, FinishReason.ERROR, **sampling_failure(exc, job.rid))
                token = None
            if token is not None:
                row.fill_(-math.inf)
                row[token] = 0.0
        self._deliver()
        return scores

    def _sample(self, job: TfJob, row: torch.Tensor) -> int | None:
        params = job.params
        assert job.sampler is not None
        if not job.t_first:
            job.t_first = time.perf_counter()
        logprobs = log_softmax(row.float().cpu().numpy()) if params.logprobs is not None else None
        scores = row.float().unsqueeze(0).clone()
        if job.constraint is not None:
            if job.constraint.is_finished():
                self._finish(job, FinishReason.STOP)
                return None
            mask = np.zeros(scores.shape[-1], dtype=np.float32)
            job.constraint.apply_to_logits(mask)
            scores.add_(torch.from_numpy(mask).to(scores.device))
        token = job.sampler.sample(scores, job.history, job.n_generated)
        job.n_generated += 1
        job.history.append(token)
        self.generated_count += 1
        if (token in self._eog and not params.ignore_eos) or token in job.stop_ids:
            self._finish(job, FinishReason.STOP)
            return token
        if job.constraint is not None:
            job.constraint.advance(token)
        if logprobs is not None:
            job.pending_logprobs.append(token_logprob(logprobs, token, params.logprobs or 0, self._piece))
        text = b"" if params.skip_special_tokens and token in self._special else self._piece(token)
        got = job.stream.push(token, text)
        if isinstance(got, StopHit):
            self._emit(job, got.release)
            self._finish(job, FinishReason.STOP, stop_string=got.stop)
            return token
        assert isinstance(got, Release)  # no banned strings here: nothing rewinds
        self._emit(job, got)
        if job.n_generated >= job.max_new:
            self._finish(job, FinishReason.LENGTH)
        return token

    # -- events ---------------------------------------------------------------------------
    def _emit(self, job: TfJob, release: Release) -> None:
        delta = text_delta(release, job.pending_logprobs)
        if delta is not None:
            self._outbox.setdefault(job, []).append(delta)

    def _finish(self, job: TfJob, reason: FinishReason, *, stop_string: str | None = None,
                error: str | None = None, error_status: int | None = None, error_code: str | None = None) -> None:
        if job.done:
            return
        job.done = True
        if reason in (FinishReason.STOP, FinishReason.LENGTH):
            self._emit(job, job.stream.flush())
        if self.active.pop(job.rid, None) is not None:
            self.manager.cancel_request(job.rid)
            self._free += job.blocks
            job.blocks = 0
        usage = timed_usage(job.n_prompt, job.n_generated, job.t_submit, job.t_admit, job.t_first)
        self.finished_count += 1
        self.inbox.retire()
        self._outbox.setdefault(job, []).append(
            Finished(reason, usage, stop_string=stop_string, error=error, error_status=error_status, error_code=error_code)
        )

    def _deliver(self) -> None:
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, {}
        deliver_all((job.handle, events) for job, events in outbox.items())

    def shut_down(self, failed: bool) -> None:
        """The manager's thread ended (closed, or it failed): end whatever is left."""
        self.inbox.close(failure="transformers' generation loop stopped on its own" if failed else None)
        for message in self.inbox.drain():
            if isinstance(message, Submit):
                self.waiting.append(message.job)
        reason = FinishReason.ERROR if failed else FinishReason.UNLOAD
        error = "The engine failed. Reload the model." if failed else "The model was unloaded."
        for job in list(self.waiting) + list(self.active.values()):
            self._finish(job, reason, error=error)
        self.waiting.clear()
        self._deliver()

    def stats(self) -> EngineStats:
        """A snapshot from any thread."""
        used = 0
        processor = getattr(self.manager, "batch_processor", None)
        if processor is not None:
            cache = processor.cache
            used = (cache.num_blocks - cache.get_num_free_blocks()) * self.block_size
        active = len(self.active)
        return EngineStats(
            slots_total=self._max_batch,
            slots_active=active,
            queue_depth=max(0, self.inbox.outstanding - active),
            kv_cells_total=self.num_blocks * self.block_size,
            kv_cells_used=used,
            requests_finished=self.finished_count,
            tokens_generated=self.generated_count,
            failure=self.inbox.failure,
        )
