"""Reasoning split: markers, implicit start, no markers, and chunking invariance."""

from __future__ import annotations

import random

import pytest

from common.formats.reasoning import ReasoningParser, prompt_opens_reasoning, split_reasoning

CASES: list[tuple[str, bool, str | None, str]] = [
    ("<think>\nLet me think.\n</think>\n\nThe answer is 4.", False, "Let me think.", "The answer is 4."),
    ("  <think>a</think>b", False, "a", "b"),
    ("<think></think>Just the answer", False, "", "Just the answer"),
    ("No reasoning here.", False, None, "No reasoning here."),
    ("  leading spaces kept\n", False, None, "  leading spaces kept\n"),
    ("Talking about <think> tags mid-text", False, None, "Talking about <think> tags mid-text"),
    ("<thinking is not the marker", False, None, "<thinking is not the marker"),
    ("<thi", False, None, "<thi"),
    ("Step 1, step 2.\n</think>\n\nDone.", True, "Step 1, step 2.", "Done."),
    ("cut off while thinking <", True, "cut off while thinking <", ""),
    ("<think>unterminated and long", False, "unterminated and long", ""),
    ("<think>uses </thin in text</think>ok </think> stays", False, "uses </thin in text", "ok </think> stays"),
    ("", False, None, ""),
    ("", True, "", ""),
]


@pytest.mark.parametrize(("text", "implicit", "reasoning", "content"), CASES)
def test_split_reasoning(text: str, implicit: bool, reasoning: str | None, content: str) -> None:
    assert split_reasoning(text, starts_in_reasoning=implicit) == (reasoning, content)


def _stream(text: str, implicit: bool, rng: random.Random, **markers: str) -> tuple[list[str], list[str]]:
    parser = ReasoningParser(starts_in_reasoning=implicit, **markers)
    reasoning: list[str] = []
    content: list[str] = []
    i = 0
    while i < len(text):
        size = rng.choice([1, 1, 2, 3, 4, 7, 11])
        r, c = parser.feed(text[i : i + size])
        reasoning.append(r)
        content.append(c)
        i += size
    r, c = parser.finish()
    return reasoning + [r], content + [c]


@pytest.mark.parametrize(("text", "implicit", "reasoning", "content"), CASES)
def test_streaming_matches_whole_text(text: str, implicit: bool, reasoning: str | None, content: str) -> None:
    for seed in range(30):
        r, c = _stream(text, implicit, random.Random(seed))
        assert "".join(r) == (reasoning or "")
        assert "".join(c) == content


def test_partial_markers_are_held_back() -> None:
    parser = ReasoningParser()
    assert parser.feed("<th") == ("", "")
    assert parser.feed("ink>I wonder") == ("I wonder", "")
    assert parser.in_reasoning
    assert parser.feed(" about it</th") == (" about it", "")
    assert parser.feed("ink>\n") == ("", "")
    assert not parser.in_reasoning
    assert parser.feed("\nYes.") == ("", "Yes.")
    assert parser.finish() == ("", "")


def test_content_streams_without_delay_when_no_marker() -> None:
    parser = ReasoningParser()
    assert parser.feed("Hello") == ("", "Hello")
    assert parser.feed(" <think>") == ("", " <think>")


def test_custom_markers() -> None:
    text = "[THINK]plan[/THINK] answer"
    assert split_reasoning(text, "[THINK]", "[/THINK]") == ("plan", "answer")
    r, c = _stream(text, False, random.Random(1), start="[THINK]", end="[/THINK]")
    assert ("".join(r), "".join(c)) == ("plan", "answer")


def test_prompt_opens_reasoning() -> None:
    assert prompt_opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n")


def test_markers_must_be_non_empty() -> None:
    with pytest.raises(ValueError):
        ReasoningParser(start="")
