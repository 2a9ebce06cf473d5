"""Idle slots' cached prefixes parked in host memory, so that live sequences attend over fewer KV cells.

In a unified KV cache every step's attention spans all cells in use, masked
per sequence, so an idle slot's cached prefix slows every other sequence's
prefill and decode (measured on SmolLM2-135M, 2 threads, 15 idle prefixes of
280 tokens: prefill ~25% slower, decode ~15% slower). When a request starts,
the scheduler parks the other idle slots: their KV is copied out with
`llama_state_seq_get_data` and their cells freed, while the slot keeps its
token bookkeeping. A later request that reuses a parked prefix copies it back
(a memcpy, about 1 ms per 1,000 tokens here) instead of recomputing it. This
is what llama-server does with its prompt cache in host memory.

Parked prefixes hold at most as many tokens as the KV cache itself; beyond
that the least recently used are dropped.
"""

from __future__ import annotations

import ctypes

import llama_cpp as lc

from backends.llamacpp.job import Slot, SlotState


class Parking:
    """Moves idle slots' KV between the cache and host memory; used only on the scheduler thread."""

    def __init__(self, ctx: int, mem: int, slots: list[Slot], max_tokens: int) -> None:
        self._ctx = ctx
        self._mem = mem
        self._slots = slots
        self.max_tokens = max_tokens
        self.parked_count = 0  # prefixes parked since load
        self.restored_count = 0  # parked prefixes copied back into the cache since load

    def tokens(self) -> int:
        return sum(len(s.tokens) for s in self._slots if s.parked is not None)

    def park_idle(self, keep: Slot) -> None:
        """Park every idle slot whose prefix is in the cache, except `keep` (the slot a request just took)."""
        for slot in self._slots:
            if slot is not keep and slot.job is None and slot.tokens and slot.parked is None:
                self.park(slot)
        self._trim()

    def park(self, slot: Slot) -> bool:
        """Copy the slot's KV out and free its cells; False (and nothing changed) when llama.cpp cannot."""
        size = lc.llama_state_seq_get_size(self._ctx, slot.seq)
        if size <= 0:
            return False
        buf = (ctypes.c_uint8 * size)()
        got = lc.llama_state_seq_get_data(self._ctx, buf, size, slot.seq)
        if got <= 0:
            return False
        lc.llama_memory_seq_rm(self._mem, slot.seq, -1, -1)
        slot.parked = (buf, got)
        self.parked_count += 1
        return True

    def restore(self, slot: Slot) -> bool:
        """Copy the slot's parked prefix back into its sequence. False when the cache has no room for it:
        then the prefix is dropped (and recomputed by the request that wanted it)."""
        assert slot.parked is not None
        buf, size = slot.parked
        lc.llama_memory_seq_rm(self._mem, slot.seq, -1, -1)
        if lc.llama_state_seq_set_data(self._ctx, buf, size, slot.seq) != size:
            slot.cut(self._mem, 0)
            return False
        slot.parked = None
        self.restored_count += 1
        return True

    def _trim(self) -> None:
        """Drop the least recently used parked prefixes until they fit the budget."""
        total = self.tokens()
        if total <= self.max_tokens:
            return
        parked = sorted((s for s in self._slots if s.parked is not None and s.state is SlotState.IDLE),
                        key=lambda s: s.last_used)
        for slot in parked:
            total -= len(slot.tokens)
            slot.cut(self._mem, 0)
            if total <= self.max_tokens:
                return
