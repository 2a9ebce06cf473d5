"""tests/neartie.py on synthetic logprobs: where two generations may differ, and where they must not."""

from __future__ import annotations

import pytest

from backends.base import TokenLogprob
from tests.neartie import (
    MARGIN,
    Step,
    assert_agree,
    compare_steps,
    steps_from_engine,
    steps_from_entries,
    steps_from_openai,
    steps_from_stream,
    text_of,
)


def step(token: str, margin: float, other: str = "~") -> Step:
    """A greedy step choosing `token`, `margin` nats ahead of `other`."""
    return Step(token, token, ((token, -0.5), (other, -0.5 - margin)))  # exact in binary at MARGIN


def run(*tokens: str, margin: float = 3.0) -> list[Step]:
    return [step(t, margin) for t in tokens]


def test_identical_runs_agree_in_full() -> None:
    got = compare_steps(run("a", "b", "c"), run("a", "b", "c"))
    assert got and got.compared == 3 and got.stopped_at is None


def test_decisive_difference_disagrees() -> None:
    got = compare_steps(run("a", "b", "c"), run("a", "x", "c"))
    assert not got and got.compared == 1 and got.stopped_at == 1
    assert "decisive in both runs" in got.detail and "'b' vs 'x'" in got.detail


@pytest.mark.parametrize("which", ["first", "second", "both"])
def test_difference_at_a_near_tie_in_either_run_agrees(which: str) -> None:
    a, b = run("a", "b", "c"), run("a", "x", "y")
    if which in ("first", "both"):
        a[1] = step("b", MARGIN / 10, other="x")
    if which in ("second", "both"):
        b[1] = step("x", MARGIN / 10, other="b")
    got = compare_steps(a, b)
    assert got and got.stopped_at == 1 and "near-tie" in got.detail


def test_margin_at_the_threshold_is_decisive() -> None:
    a, b = run("a", "b"), run("a", "x")
    a[1], b[1] = step("b", MARGIN), step("x", MARGIN)
    assert not compare_steps(a, b)
    assert compare_steps(a, b, margin=MARGIN + 0.01)


def test_agreeing_near_tie_does_not_end_the_comparison() -> None:
    # Same choice at a near-tie: the prefixes are still equal, so a later decisive difference is a bug.
    a, b = run("a", "b", "c"), run("a", "b", "z")
    a[1] = b[1] = step("b", 0.01)
    got = compare_steps(a, b)
    assert not got and got.stopped_at == 2


def test_one_run_ending_early() -> None:
    longer = run("a", "b", "c")
    assert not compare_steps(run("a", "b"), longer)  # the other run went on decisively
    longer[2] = step("c", 0.2, other="<|im_end|>")
    assert compare_steps(run("a", "b"), longer)  # ending there was a near-tie


def test_sampled_difference_needs_the_same_distribution() -> None:
    def sampled(token: str, probs: dict[str, float]) -> Step:
        return Step(token, token, tuple(sorted(probs.items(), key=lambda kv: -kv[1])))

    same = {"x": -0.7, "y": -0.9, "z": -3.0}
    a = [sampled("a", {"a": 0.0, "b": -9}), sampled("x", same)]
    b = [sampled("a", {"a": 0.0, "b": -9}), sampled("y", {k: v + 0.01 for k, v in same.items()})]
    assert compare_steps(a, b, sampled=True)
    b[1] = sampled("y", {"x": -2.0, "y": -0.2, "z": -3.0})  # a different distribution: not rounding
    assert not compare_steps(a, b, sampled=True)
    b[1] = sampled("w", {"w": -0.5, "y": -0.9})  # a token the other run did not list
    assert not compare_steps(a, b, sampled=True)


def test_too_few_candidates_is_an_error_that_says_what_to_request() -> None:
    lone = [Step("a", "a", (("a", -0.1),))]
    with pytest.raises(ValueError, match="top_logprobs >= 2"):
        compare_steps(lone, lone)


def test_assert_agree_explains_a_disagreement() -> None:
    assert assert_agree(run("a"), run("a")).compared == 1
    with pytest.raises(AssertionError, match=r"batched: .*first difference at token 1 after 'a'"):
        assert_agree(run("a", "b"), run("a", "c"), label="batched")


CHAT = {"choices": [{"logprobs": {"content": [
    {"token": "Hi", "logprob": -0.1, "bytes": [72, 105],
     "top_logprobs": [{"token": "Hello", "logprob": -2.5, "bytes": [72, 101, 108, 108, 111]},
                      {"token": "Hi", "logprob": -0.1, "bytes": [72, 105]}]},
    {"token": "!", "logprob": -0.3, "bytes": [33],
     "top_logprobs": [{"token": "!", "logprob": -0.3, "bytes": [33]},
                      {"token": ".", "logprob": -0.5, "bytes": [46]}]},
]}}]}
COMPLETION = {"choices": [{"logprobs": {
    "tokens": ["Hi", "!"], "token_logprobs": [-0.1, -0.3],
    "top_logprobs": [{"Hi": -0.1, "Hello": -2.5}, {".": -0.5, "!": -0.3}], "text_offset": [0, 2]}}]}


def test_openai_chat_and_completion_shapes() -> None:
    chat, comp = steps_from_openai(CHAT), steps_from_openai(COMPLETION)
    assert text_of(chat) == text_of(comp) == "Hi!"
    assert [round(s.margin, 3) for s in chat] == [round(s.margin, 3) for s in comp] == [2.4, 0.2]
    assert chat[0].token == b"Hi" and comp[0].token == "Hi"  # bytes when the shape has them
    with pytest.raises(ValueError, match="top_logprobs=2"):
        steps_from_openai({"choices": [{"logprobs": None}]})


def test_stream_chunks_join() -> None:
    frames = [{"choices": [{"index": 0, "logprobs": {"content": [entry]}}]}
              for entry in CHAT["choices"][0]["logprobs"]["content"]]
    frames.append({"choices": [], "usage": {}})
    assert steps_from_stream(frames) == steps_from_openai(CHAT)


def test_ollama_and_kobold_entry_lists() -> None:
    ollama = [{"token": "Hi", "logprob": -0.1, "top_logprobs": [{"token": "Hi", "logprob": -0.1},
                                                                 {"token": "Yo", "logprob": -1.0}]}]
    steps = steps_from_entries(ollama)
    assert steps[0].token == "Hi" and abs(steps[0].margin - 0.9) < 1e-9


def test_engine_token_logprobs() -> None:
    items = [TokenLogprob("Hi", 5, -0.1, [72, 105], [("Hi", 5, -0.1), ("Yo", 9, -1.1)])]
    steps = steps_from_engine(items)
    assert steps[0].token == 5 and steps[0].text == "Hi" and abs(steps[0].margin - 1.0) < 1e-9


def test_clearly_differ_sees_a_moved_distribution_not_rounding() -> None:
    from tests.neartie import Step, clearly_differ

    base = [Step(1, "a", ((1, -0.30), (2, -2.40))), Step(3, "b", ((3, -0.5), (4, -1.0)))]
    rounded = [Step(1, "a", ((1, -0.32), (2, -2.38))), Step(4, "c", ((4, -0.74), (3, -0.76)))]
    moved = [Step(1, "a", ((1, -0.9), (2, -1.1))), Step(3, "b", ((3, -0.5), (4, -1.0)))]
    elsewhere = [Step(7, "x", ((7, -0.1), (8, -3.0)))]
    assert not clearly_differ(base, rounded)  # a near-tie flipped at step 1, nothing moved
    assert clearly_differ(base, moved)  # same tokens, but step 0's candidates moved by 0.6
    assert clearly_differ(base, elsewhere)  # no candidate in common
    assert not clearly_differ(base, base)
