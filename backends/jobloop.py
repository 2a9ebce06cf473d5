"""The engine thread shared by the exllamav2 and exllamav3 engines: one generator, driven by enqueue/iterate/cancel.

Both libraries batch every running job inside `generator.iterate()`, which
returns a list of result dicts per call: `stage` "streaming" results carry
`text` and `token_ids` (and `logits` when the job asked for them), and the
last one of a job has `eos: True`, an `eos_reason` ("stop_token",
"stop_string", "max_new_tokens", "end_filter", ...) and the job's counts and
timings. This loop owns the generator: it takes submissions, cancellations and
commands from an inbox between iterations, runs one iteration whenever jobs
remain, and turns results into typed events for each request's event loop.
Stop strings, stop tokens and banned strings are the library's (set on the
job by the engine), so text arrives already decided.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from loguru import logger

from backends.base import EngineStats, Event, Finished, FinishReason, TextDelta, TokenLogprob, Usage
from backends.engine_thread import Cancel, Command, Inbox, Message, RequestHandle, Submit, deliver_all
from backends.logprobs import log_softmax, token_logprob

_REASONS = {
    "stop_token": FinishReason.STOP,
    "stop_string": FinishReason.STOP,
    "end_filter": FinishReason.STOP,
    "loop_detected": FinishReason.STOP,
    "max_new_tokens": FinishReason.LENGTH,
}


@dataclass
class _Entry:
    handle: RequestHandle
    job: Any
    logprobs: int | None
    t_submit: float = field(default_factory=time.perf_counter)


class JobLoop:
    """Owns the generator and its jobs on one thread; `inbox` and `stats` are safe from any thread."""

    def __init__(
        self,
        generator: Any,
        make_job: Callable[[RequestHandle], Any],
        piece: Callable[[int], bytes],
        *,
        slots: int,
        capacity: int,
        kv_cells: int,
        name: str,
    ) -> None:
        self.generator = generator
        self._make_job = make_job
        self._piece = piece
        self._slots = slots
        self._kv_cells = kv_cells
        self.inbox = Inbox(capacity)  # Submit(handle), Cancel(handle) or Command
        self._entries: dict[int, _Entry] = {}  # id(job) -> entry
        self._outbox: dict[RequestHandle, list[Event]] = {}
        self.finished_count = 0
        self.generated_count = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- any thread ----------------------------------------------------------------------
    def join(self) -> None:
        self._thread.join()

    def stats(self) -> EngineStats:
        active = min(len(self._entries), self._slots)
        return EngineStats(
            slots_total=self._slots,
            slots_active=active,
            queue_depth=max(0, self.inbox.outstanding - active),
            kv_cells_total=self._kv_cells,
            kv_cells_used=0,
            requests_finished=self.finished_count,
            tokens_generated=self.generated_count,
            failure=self.inbox.failure,
        )

    # -- the loop's thread -----------------------------------------------------------------
    def _run(self) -> None:
        failed: str | None = None
        try:
            while (messages := self.inbox.take(wait=not self._entries)) is not None:
                for message in messages:
                    self._on_message(message)
                if self._entries:
                    for result in self.generator.iterate():
                        self._on_result(result)
                self._deliver()
        except Exception as exc:  # noqa: BLE001 - the engine must report, not vanish
            logger.exception("generator loop failed")
            failed = f"{type(exc).__name__}: {exc}"
        self._shut_down(failed)

    def _on_message(self, message: Message) -> None:
        if isinstance(message, Submit):
            handle = message.job
            try:
                job = self._make_job(handle)
                self.generator.enqueue(job)
            except Exception as exc:  # noqa: BLE001 - one bad request must not stop the others
                logger.exception("could not start request {}", handle.request.request_id)
                self._finish_handle(handle, FinishReason.ERROR, Usage(), error=f"The engine refused the request: {exc}")
                return
            self._entries[id(job)] = _Entry(handle, job, handle.request.params.logprobs)
        elif isinstance(message, Cancel):
            for key, entry in list(self._entries.items()):
                if entry.handle is message.handle:
                    self.generator.cancel(entry.job)
                    del self._entries[key]
                    self._finish_entry(entry, FinishReason.CANCELLED, {})
                    return
        else:
            message.run()

    def _on_result(self, result: dict[str, Any]) -> None:
        entry = self._entries.get(id(result.get("job")))
        if entry is None or result.get("stage") != "streaming":
            return
        self._emit(entry, result.get("text", ""), result.get("token_ids"), result.get("logits"))
        if result.get("eos"):
            reason = _REASONS.get(result.get("eos_reason", ""), FinishReason.STOP)
            if result.get("eos_reason") != "stop_string":  # text held back for a stop string that never came
                held = result.get("held") or {}
                self._emit(entry, held.get("text", ""), held.get("token_ids"), held.get("logits"))
            del self._entries[id(entry.job)]
            self._finish_entry(entry, reason, result, stop_string=result.get("eos_triggering_string"))

    def _emit(self, entry: _Entry, text: str, token_ids: Any, logits: Any) -> None:
        ids = [int(t) for t in np.asarray(token_ids.cpu() if hasattr(token_ids, "cpu") else token_ids).reshape(-1)] \
            if token_ids is not None else []
        if not text and not ids:
            return
        self.generated_count += len(ids)
        lps: tuple[TokenLogprob, ...] = ()
        if entry.logprobs is not None and logits is not None and ids:
            rows = np.asarray(logits.float().cpu() if hasattr(logits, "cpu") else logits, dtype=np.float32)
            rows = rows.reshape(-1, rows.shape[-1])
            lps = tuple(
                token_logprob(log_softmax(rows[i]), t, entry.logprobs, self._piece)
                for i, t in enumerate(ids) if i < len(rows)
            )
        self._outbox.setdefault(entry.handle, []).append(TextDelta(text, tuple(ids), lps))

    def _finish_entry(self, entry: _Entry, reason: FinishReason, result: dict[str, Any], *,
                      stop_string: str | None = None, error: str | None = None) -> None:
        accepted = int(result.get("accepted_draft_tokens", 0) or 0)
        usage = Usage(
            prompt_tokens=int(result.get("prompt_tokens", len(entry.handle.request.prompt_tokens)) or 0),
            completion_tokens=int(result.get("new_tokens", 0) or 0),
            cached_tokens=int(result.get("cached_tokens", 0) or 0),
            queue_seconds=float(result.get("time_enqueued", 0.0) or 0.0),
            prompt_seconds=float(result.get("time_prefill", 0.0) or 0.0),
            generation_seconds=float(result.get("time_generate", time.perf_counter() - entry.t_submit) or 0.0),
            draft_tokens=accepted + int(result.get("rejected_draft_tokens", 0) or 0),
            accepted_draft_tokens=accepted,
        )
        self._finish_handle(entry.handle, reason, usage, stop_string=stop_string, error=error)

    def _finish_handle(self, handle: RequestHandle, reason: FinishReason, usage: Usage, *,
                       stop_string: str | None = None, error: str | None = None) -> None:
        self.finished_count += 1
        self.inbox.retire()
        self._outbox.setdefault(handle, []).append(Finished(reason, usage, stop_string=stop_string, error=error))

    def _deliver(self) -> None:
        outbox, self._outbox = self._outbox, {}
        deliver_all(outbox.items())

    def _shut_down(self, failed: str | None) -> None:
        self.inbox.close(failure=failed)
        left = self.inbox.drain()
        reason = FinishReason.ERROR if failed else FinishReason.UNLOAD
        message = f"The engine failed: {failed}. Reload the model." if failed else "The model was unloaded."
        for entry in list(self._entries.values()):
            try:
                self.generator.cancel(entry.job)
            except Exception:  # noqa: BLE001 - shutting down anyway
                pass
            self._finish_entry(entry, reason, {}, error=message)
        self._entries.clear()
        for item in left:
            if isinstance(item, Submit):
                self._finish_handle(item.job, reason, Usage(), error=message)
            elif isinstance(item, Command):
                item.abandon()
        self._deliver()

    def idle(self) -> bool:
        """No job queued or running (loop thread)."""
        return not self._entries
