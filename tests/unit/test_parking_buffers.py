"""Host buffers for parked KV (backends/llamacpp/parking.py SpareBuffers): which spare a park takes, and how many stay."""

from __future__ import annotations

from backends.llamacpp.parking import SpareBuffers

MIB = 1 << 20


def test_a_new_buffer_is_rounded_up_to_whole_mebibytes() -> None:
    spares = SpareBuffers()
    assert len(spares.take(1)) == MIB
    assert len(spares.take(MIB)) == MIB
    assert len(spares.take(3 * MIB + 5)) == 4 * MIB
    assert spares.reused_count == 0


def test_a_park_takes_the_smallest_spare_that_fits() -> None:
    spares = SpareBuffers(keep=3)
    small, mid, big = spares.take(MIB), spares.take(3 * MIB), spares.take(8 * MIB)
    for b in (big, small, mid):
        spares.give(b)
    assert spares.take(2 * MIB) is mid
    assert spares.take(2 * MIB) is big  # the only one left that fits
    assert spares.reused_count == 2
    fresh = spares.take(2 * MIB)
    assert fresh is not small and len(fresh) == 2 * MIB  # nothing spare fits: a new one
    assert spares.spare_bytes() == MIB


def test_beyond_keep_spares_the_smallest_are_let_go() -> None:
    spares = SpareBuffers(keep=2)
    bufs = [spares.take(n * MIB) for n in (2, 1, 4)]
    for b in bufs:
        spares.give(b)
    assert spares.spare_bytes() == 6 * MIB  # the 1 MiB one went
    assert spares.take(MIB) is bufs[0]
