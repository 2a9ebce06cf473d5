"""TextAssembler: UTF-8 across tokens and held-back stop strings."""

from common.stopping import StopHit, TextAssembler


def feed_all(asm: TextAssembler, pieces: list[bytes]) -> tuple[list[str], StopHit | None]:
    out: list[str] = []
    for p in pieces:
        got = asm.feed(p)
        if isinstance(got, StopHit):
            return out + [got.text], got
        out.append(got)
    out.append(asm.flush())
    return out, None


def test_utf8_split_across_tokens_is_held_until_whole() -> None:
    data = "é🙂".encode()
    asm = TextAssembler()
    outs = [asm.feed(data[i : i + 1]) for i in range(len(data))]
    assert "".join(outs) == "é🙂"
    assert all(o in ("", "é", "🙂") for o in outs)


def test_stop_string_across_tokens_is_never_emitted() -> None:
    outs, hit = feed_all(TextAssembler(["</end>"]), [b"Hello </", b"en", b"d> more"])
    assert hit is not None and hit.stop == "</end>"
    assert "".join(outs) == "Hello "
    assert all("<" not in o for o in outs)


def test_partial_match_is_released_when_it_diverges() -> None:
    asm = TextAssembler(["STOP"])
    assert asm.feed(b"ab ST") == "ab "
    assert asm.feed(b"OX") == "STOX"
    assert asm.flush() == ""


def test_held_text_is_flushed_at_the_end() -> None:
    asm = TextAssembler(["STOP"])
    assert asm.feed(b"x ST") == "x "
    assert asm.flush() == "ST"
    assert asm.text_emitted == "x ST"


def test_earliest_of_several_stops_wins() -> None:
    outs, hit = feed_all(TextAssembler(["world", "lo w"]), [b"hello world"])
    assert hit is not None and hit.stop == "lo w" and "".join(outs) == "hel"
