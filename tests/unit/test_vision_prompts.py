"""Where images land in a chat prompt: templates see image parts as HF processors show them."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from backends.base import ImageInput
from common.formats.templating import ChatTemplate
from common.generation.prompts import chat_prompt, text_prompt

MARKER = "<__media__>"

# Shaped like SmolVLM's / Idefics3's template: content is a list of typed parts.
VISION_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}:"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT_PARTS_ONLY = (
    "{% for m in messages %}{% for p in m['content'] %}{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}"
    "{% endfor %}\n{% endfor %}"
)


def model(source: str) -> Any:
    engine = SimpleNamespace(image_marker=MARKER, tokenize=lambda text, add_bos, special: [1, 2, 3])
    info = SimpleNamespace(bos_token="", eos_token="", add_bos_token=False, n_ctx=4096)
    return SimpleNamespace(template=ChatTemplate.from_string(source), info=info, engine=engine,
                           may_fit=lambda chars, tokens: chars <= tokens * 64)


def image(i: int) -> ImageInput:
    return ImageInput(b"\0\0\0", 1, 1, f"digest{i}")


def messages(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": list(parts)}]


def test_the_template_placeholder_is_found_by_rendering() -> None:
    assert ChatTemplate.from_string(VISION_TEMPLATE).image_placeholder() == "<image>"
    assert ChatTemplate.from_string(CHATML).image_placeholder() is None
    assert ChatTemplate.from_string(TEXT_PARTS_ONLY).image_placeholder() is None


def test_a_vision_template_places_the_images_and_the_engine_marker_replaces_its_placeholder() -> None:
    m = model(VISION_TEMPLATE)
    msgs = messages({"type": "text", "text": "Compare "}, {"type": "image", "image": 0},
                    {"type": "text", "text": " and "}, {"type": "image", "image": 1})
    prompt = chat_prompt(m, msgs, images=[image(0), image(1)])
    assert prompt.text == f"System:Be brief.<end_of_utterance>\nUser:Compare {MARKER} and {MARKER}<end_of_utterance>\nAssistant:"
    assert prompt.tokens == [] and len(prompt.images) == 2  # tokenized with the images later, off the loop


def test_a_text_template_gets_the_marker_where_the_image_part_was() -> None:
    prompt = chat_prompt(model(CHATML), messages({"type": "image", "image": 0}, {"type": "text", "text": "What?"}),
                         images=[image(0)])
    assert f"<|im_start|>user\n{MARKER}What?<|im_end|>" in (prompt.text or "")


def test_user_text_that_looks_like_the_placeholder_falls_back_to_inline_markers() -> None:
    prompt = chat_prompt(model(VISION_TEMPLATE), messages({"type": "text", "text": "<image> is a tag; "},
                                                          {"type": "image", "image": 0}), images=[image(0)])
    assert (prompt.text or "").count(MARKER) == 1 and "<image> is a tag" in (prompt.text or "")


def test_raw_prompts_put_images_at_their_markers_or_first() -> None:
    m = model(CHATML)
    assert text_prompt(m, "Look: ", images=[image(0)]).text == f"{MARKER}\nLook: "
    assert text_prompt(m, f"A {MARKER} B", images=[image(0)]).text == f"A {MARKER} B"
