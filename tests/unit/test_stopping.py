"""TokenTextStream: whole UTF-8, held-back stop strings, banned-string rewinds."""

from common.stopping import Release, Rewind, StopHit, TokenTextStream


def run(stream: TokenTextStream, pieces: list[bytes]) -> tuple[str, object]:
    out = []
    for i, p in enumerate(pieces):
        got = stream.push(i, p)
        if isinstance(got, Release):
            out.append(got.text)
        else:
            if isinstance(got, StopHit):
                out.append(got.release.text)
            return "".join(out), got
    out.append(stream.flush().text)
    return "".join(out), None


def test_utf8_split_across_tokens_is_held_until_whole() -> None:
    data = "é🙂".encode()
    s = TokenTextStream()
    outs = [s.push(i, data[i : i + 1]) for i in range(len(data))]
    assert "".join(o.text for o in outs if isinstance(o, Release)) == "é🙂"
    assert [o.tokens for o in outs if isinstance(o, Release) and o.text] == [(0, 1), (2, 3, 4, 5)]


def test_stop_string_across_tokens_is_never_emitted() -> None:
    s = TokenTextStream(["</end>"])
    outs = [s.push(0, b"Hello </"), s.push(1, b"en")]
    assert all(isinstance(o, Release) and "<" not in o.text for o in outs)
    hit = s.push(2, b"d> more")
    assert isinstance(hit, StopHit) and hit.stop == "</end>"
    assert "".join(o.text for o in outs) + hit.release.text == "Hello "


def test_partial_match_is_released_when_it_diverges() -> None:
    s = TokenTextStream(["STOP"])
    assert s.push(0, b"ab").text == "ab"
    assert s.push(1, b" ST").text == ""  # held: may be the start of STOP
    assert s.push(2, b"OX").text == " STOX"
    assert s.flush().text == ""


def test_held_text_is_flushed_at_the_end() -> None:
    s = TokenTextStream(["STOP"])
    assert s.push(0, b"x ST").text == ""
    assert s.flush().text == "x ST"
    assert s.text_emitted == "x ST"


def test_earliest_stop_wins() -> None:
    text, hit = run(TokenTextStream(["world", "lo w"]), [b"hel", b"lo world"])
    assert isinstance(hit, StopHit) and hit.stop == "lo w" and text == "hel"


def test_banned_string_rewinds_to_the_token_where_it_starts() -> None:
    s = TokenTextStream(banned=["bad word"])
    assert s.push(0, b"a ").text == "a "
    assert s.push(1, b"ba").text == ""  # could be the start of "bad word"
    assert s.push(2, b"d wo").text == ""
    got = s.push(3, b"rd!")
    assert isinstance(got, Rewind)
    assert got.n_tokens == 3 and got.banned_token == 1
    assert s.pending_tokens == 0 and s.text_emitted == "a "
    # After the rewind the engine samples other tokens; they flow normally.
    assert s.push(4, b"good").text == "good"


def test_no_watch_fast_path_releases_each_token() -> None:
    s = TokenTextStream()
    assert s.push(7, b"hi").tokens == (7,)
