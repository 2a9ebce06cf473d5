"""Where a waiting request goes: the free slot and cached prefix it reuses, or a prefilling request to wait for.

Pure functions of the slots (scheduler thread); the scheduler makes room and places the job.
"""

from __future__ import annotations

from backends.llamacpp.job import Job, Slot, SlotState
from backends.llamacpp.media import clamp_reuse
from backends.llamacpp.speculative import common_prefix

# A waiting job holds back for a prefilling job whose prompt it shares when
# that saves at least this many tokens of prefill.
_SHARE_MIN_TOKENS = 32


def should_wait_for_sharer(job: Job, slots: list[Slot]) -> bool:
    """True when a job still prefilling shares a long prefix with this one: wait, then copy its KV."""
    key = job.lora_key
    cached = max((common_prefix(s.tokens, job.context) for s in slots if s.lora_key == key), default=0)
    for s in slots:
        other = s.job
        if other is None or other.state is not SlotState.PREFILLING or other.lora_key != key:
            continue
        shared = common_prefix(other.context[: other.n_prompt], job.context)
        if shared - cached >= _SHARE_MIN_TOKENS:
            return True
    return False


def choose_slot(job: Job, free: list[Slot], slots: list[Slot]) -> tuple[Slot, int, Slot | None, int]:
    """Pick a free slot and the best KV to reuse: (slot, own prefix, source slot, shared prefix).

    Only KV computed under the job's own adapter set counts.
    """
    context, key = job.context, job.lora_key
    best_free, best_own = None, -1
    for s in free:
        own = clamp_reuse(job, s.reusable(context)) if s.lora_key == key else 0
        better = own > best_own or (own == best_own and best_free is not None and s.last_used < best_free.last_used)
        if better:
            best_free, best_own = s, own
    assert best_free is not None
    source, shared = None, best_own
    for s in slots:
        if s is best_free or s.lora_key != key:
            continue
        n = clamp_reuse(job, s.reusable(context))
        if n > shared:
            source, shared = s, n
    return best_free, best_own, source, shared
