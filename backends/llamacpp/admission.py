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
# A free slot's cached prefix draws a request to it when it covers at least 1/this of the request's
# context (llama-server's default slot similarity is 0.1); a lesser match would cut a long prefix
# away for a few tokens.
_SIMILAR_DIVISOR = 10


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
    best_free, best_own, best_rank = None, -1, (-1, 0, 0.0)
    for s in free:
        own = clamp_reuse(job, s.reusable(context)) if s.lora_key == key else 0
        # A slot is worth taking for its prefix only when that prefix is a real part of the prompt;
        # otherwise an empty slot, else the least recently used, so other cached prefixes survive.
        worth = own if own * _SIMILAR_DIVISOR >= len(context) else 0
        rank = (worth, 0 if s.tokens else 1, -s.last_used)
        if rank > best_rank or best_free is None:
            best_free, best_own, best_rank = s, own, rank
    assert best_free is not None
    # Another slot's prefix is copied cell by cell, so only one still in the cache can be a source. (A parked
    # slot is idle, hence free: when its prefix is the best, it is the slot chosen above.)
    source, shared = None, best_own
    for s in slots:
        if s is best_free or s.lora_key != key or s.parked is not None:
            continue
        n = clamp_reuse(job, s.reusable(context))
        if n > shared and n * _SIMILAR_DIVISOR >= len(context):
            source, shared = s, n
    return best_free, best_own, source, shared
