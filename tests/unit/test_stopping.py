"""TokenTextStream: whole UTF-8, held-back stop strings, banned-string rewinds (any case)."""

from backends.text_stream import Release, Rewind, StopHit, TokenTextStream, fold_case


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


def test_banned_strings_ignore_case_both_ways() -> None:
    for banned, said in (("cat", b"The Cat"), ("cat", b"The CAT"), ("Cat", b"the cat"), ("cAt", b"a caT")):
        got = TokenTextStream(banned=[banned]).push(0, said)
        assert isinstance(got, Rewind) and got.banned == banned, (banned, said)


def test_banned_partial_match_is_held_back_ignoring_case() -> None:
    s = TokenTextStream(banned=["bad word"])
    assert s.push(0, b"a ").text == "a "
    assert s.push(1, b"BA").text == ""  # could be the start of "Bad Word"
    assert s.push(2, b"d Wo").text == ""
    got = s.push(3, b"RD!")
    assert isinstance(got, Rewind) and got.n_tokens == 3 and got.banned_token == 1
    assert s.text_emitted == "a "


def test_diverging_banned_prefix_is_released_in_its_own_case() -> None:
    s = TokenTextStream(banned=["cathedral"])
    assert s.push(0, b"The ").text == "The "
    assert s.push(1, b"Ca").text == ""  # held: "ca" starts "cathedral"
    assert s.push(2, b"T sat").text == "CaT sat"
    assert s.flush().text == "" and s.text_emitted == "The CaT sat"


def test_stop_strings_stay_case_sensitive() -> None:
    s = TokenTextStream(["STOP"], banned=["zzz"])
    assert s.push(0, b"please stop").text == "please stop"  # "stop" is not "STOP", nor held
    assert s.push(1, b" now St").text == " now St"  # "St" is no prefix of "STOP"
    hit = s.push(2, b" STOP here")
    assert isinstance(hit, StopHit) and hit.release.text == " "


def test_stop_and_ban_together_earliest_rules_apply_per_kind() -> None:
    s = TokenTextStream(["END"], banned=["end"])
    got = s.push(0, b"the End")  # not the stop (case differs), but the ban (any case)
    assert isinstance(got, Rewind) and got.banned == "end"


def test_fold_case_keeps_length_and_index() -> None:
    for text in ("The CAT", "İstanbul CAT", "STRASSE Straße", "ΟΔΟΣ οδος", "🙂 É"):
        assert len(fold_case(text)) == len(text), text
    assert fold_case("İstanbul CAT").endswith("stanbul cat")
    assert fold_case("ΟΔΟΣ") == fold_case("οδος")  # final sigma matches plain sigma
    s = TokenTextStream(banned=["cat"])
    got = s.push(0, "İİ ".encode())
    assert isinstance(got, Release) and got.text == "İİ "
    assert isinstance(s.push(1, b"CAT"), Rewind) and s.text_emitted == "İİ "
