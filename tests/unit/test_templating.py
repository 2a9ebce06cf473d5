"""Chat template rendering, sandboxing, metadata and template lookup."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from common.errors import BadRequestError
from common.formats.templating import (
    ChatTemplate,
    TemplateError,
    TemplateMetadata,
    list_templates,
    resolve_template,
)

TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "templates"

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "How are you?"},
]

# What each shipped template renders for CONVERSATION with a generation prompt,
# bos_token="<s>" and eos_token="</s>".
EXPECTED = {
    "chatml": (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nHow are you?<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "alpaca": (
        "Be brief.\n\n"
        "### Instruction:\nHi\n\n"
        "### Response:\nHello!\n\n"
        "### Instruction:\nHow are you?\n\n"
        "### Response:\n"
    ),
    "llama3": (
        "<s>"
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHow are you?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "mistral": "<s>[INST] Be brief.\n\nHi [/INST] Hello!</s>[INST] How are you? [/INST]",
    "vicuna": (
        "Be brief.\n\n"
        "USER: Hi\n"
        "ASSISTANT: Hello!</s>\n"
        "USER: How are you?\n"
        "ASSISTANT:"
    ),
}

STOP_STRINGS = {
    "chatml": ["<|im_end|>"],
    "alpaca": ["### Instruction:"],
    "llama3": ["<|eot_id|>"],
    "mistral": ["[INST]"],
    "vicuna": ["USER:"],
}

SMOLLM2_TEMPLATE = (
    r"{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    r"{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    r"{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    r"{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def shipped(name: str) -> ChatTemplate:
    return ChatTemplate.from_file(resolve_template(TEMPLATES_DIR, name))


# --- shipped templates -------------------------------------------------------


def test_all_shipped_templates_are_listed() -> None:
    assert list_templates(TEMPLATES_DIR) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_template_renders_conversation(name: str) -> None:
    template = shipped(name)
    assert template.name == name
    out = template.render(CONVERSATION, bos_token="<s>", eos_token="</s>")
    assert out == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_template_stop_strings(name: str) -> None:
    assert shipped(name).metadata.stop_strings == STOP_STRINGS[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_template_accepts_content_parts(name: str) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "Describe this"}]}]
    assert "Describe this" in shipped(name).render(messages)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_template_continue_final_message(name: str) -> None:
    messages = [*CONVERSATION[:3], {"role": "user", "content": "More"}, {"role": "assistant", "content": "Well,"}]
    out = shipped(name).render(
        messages, add_generation_prompt=False, continue_final_message=True, eos_token="</s>"
    )
    assert out.endswith("Well,")


def test_chatml_metadata_tool_start() -> None:
    assert shipped("chatml").metadata == TemplateMetadata(
        stop_strings=["<|im_end|>"], tool_start="<tool_call>"
    )


def test_chatml_without_generation_prompt() -> None:
    out = shipped("chatml").render(CONVERSATION[:2], add_generation_prompt=False)
    assert out == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_chatml_tools_calls_and_responses() -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Zürich?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "12C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "sunny"},
    ]
    out = shipped("chatml").render(messages, tools=tools)
    assert out.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert "<tools>\n" + json.dumps(tools[0], ensure_ascii=False) + "\n</tools>" in out
    assert out.count("<|im_start|>system") == 1
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n'
        "</tool_call><|im_end|>\n"
    ) in out
    assert (
        "<|im_start|>user\n<tool_response>\n12C\n</tool_response>\n"
        "<tool_response>\nsunny\n</tool_response><|im_end|>\n"
    ) in out
    assert out.endswith("<|im_start|>assistant\n")


def test_chatml_no_tools_section_without_tools() -> None:
    assert "<tools>" not in shipped("chatml").render(CONVERSATION)


def test_alpaca_and_vicuna_default_system_prompt() -> None:
    messages = [{"role": "user", "content": "Hi"}]
    assert shipped("alpaca").render(messages).startswith("Below is an instruction")
    assert shipped("vicuna").render(messages).startswith("A chat between a curious user")


# --- Hugging Face compatibility ---------------------------------------------


def test_smollm2_template_renders_as_hf() -> None:
    template = ChatTemplate.from_string(SMOLLM2_TEMPLATE, name="smollm2")
    out = template.render([{"role": "user", "content": "Hi"}])
    assert out == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    out = template.render(CONVERSATION, add_generation_prompt=False)
    assert out == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nHow are you?<|im_end|>\n"
    )
    assert template.metadata == TemplateMetadata(stop_strings=[], tool_start=None)


def test_trim_and_lstrip_blocks_like_hf() -> None:
    source = "{% for m in messages %}\n    {{ m.content }}\n{% endfor %}"
    out = ChatTemplate.from_string(source).render([{"role": "user", "content": "a"}])
    assert out == "    a\n"


def test_loopcontrols_extension() -> None:
    source = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}"
    out = ChatTemplate.from_string(source).render(CONVERSATION)
    assert out == "Be brief."


def test_generation_tag_renders_its_body() -> None:
    source = "{% for m in messages %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}"
    assert ChatTemplate.from_string(source).render(CONVERSATION[:2]) == "[Be brief.][Hi]"


def test_undefined_is_lenient() -> None:
    source = "{{ missing }}|{% if not message_extra %}ok{% endif %}|{{ messages[0].nope }}"
    assert ChatTemplate.from_string(source).render(CONVERSATION) == "|ok|"


def test_tools_is_none_when_absent_and_passed_when_given() -> None:
    source = "{% if tools is not none %}{{ tools | length }} tools{% else %}none{% endif %}"
    template = ChatTemplate.from_string(source)
    assert template.render(CONVERSATION) == "none"
    assert template.render(CONVERSATION, tools=[{"type": "function"}]) == "1 tools"


def test_bos_eos_and_add_generation_prompt_are_passed() -> None:
    source = "{{ bos_token }}{{ eos_token }}{{ add_generation_prompt }}"
    template = ChatTemplate.from_string(source)
    assert template.render([], bos_token="<s>", eos_token="</s>") == "<s></s>True"
    assert template.render([], add_generation_prompt=False) == "False"


def test_template_vars_extend_but_do_not_override_messages() -> None:
    source = "{{ messages | length }}{% if enable_thinking %}+think{% endif %}"
    template = ChatTemplate.from_string(source)
    out = template.render(
        CONVERSATION, template_vars={"enable_thinking": True, "messages": [], "add_generation_prompt": 1}
    )
    assert out == "4+think"


# --- globals and filters -----------------------------------------------------


def test_raise_exception_becomes_template_error() -> None:
    source = (
        "{% if messages[0].role != 'user' %}"
        "{{ raise_exception('Conversation must start with a user message') }}"
        "{% endif %}"
    )
    template = ChatTemplate.from_string(source, name="strict")
    with pytest.raises(TemplateError) as info:
        template.render(CONVERSATION)
    assert "Conversation must start with a user message" in str(info.value)
    assert "strict" in str(info.value)
    assert template.render(CONVERSATION[1:]) == ""


def test_template_error_is_a_400() -> None:
    error = TemplateError("bad")
    assert isinstance(error, BadRequestError)
    assert error.status == 400
    assert error.message == "bad"


def test_strftime_now() -> None:
    template = ChatTemplate.from_string("{{ strftime_now('%Y-%m-%d') }}")
    before = datetime.now().strftime("%Y-%m-%d")
    out = template.render([])
    after = datetime.now().strftime("%Y-%m-%d")
    assert out in {before, after}


def test_tojson_keeps_non_ascii_and_does_not_html_escape() -> None:
    template = ChatTemplate.from_string("{{ messages[0] | tojson }}")
    out = template.render([{"role": "user", "content": "Grüße, 世界 <b>&'"}])
    assert out == '{"role": "user", "content": "Grüße, 世界 <b>&\'"}'


def test_tojson_options() -> None:
    value = {"b": 1, "a": [1, 2]}
    template = ChatTemplate.from_string(
        "{{ v | tojson(indent=2, sort_keys=true) }}|{{ v | tojson(separators=(',', ':')) }}"
        "|{{ 'é' | tojson(ensure_ascii=true) }}"
    )
    out = template.render([], template_vars={"v": value})
    assert out == (
        json.dumps(value, indent=2, sort_keys=True)
        + "|"
        + json.dumps(value, separators=(",", ":"))
        + '|"\\u00e9"'
    )


# --- sandbox -----------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ ''.__class__ }}",
        "{{ messages.__class__.__subclasses__() }}",
        "{{ raise_exception.__globals__ }}",
        "{{ namespace.__init__ }}",
        "{{ messages['__class__'] }}",
    ],
)
def test_sandbox_blocks_python_internals(source: str) -> None:
    template = ChatTemplate.from_string(source, name="probe")
    with pytest.raises(TemplateError) as info:
        template.render(CONVERSATION)
    assert "probe" in str(info.value)


@pytest.mark.parametrize(
    "source",
    [
        "{% include '/etc/passwd' %}",
        "{% import '/etc/passwd' as x %}",
        "{% extends '/etc/passwd' %}",
    ],
)
def test_sandbox_cannot_read_files(source: str) -> None:
    template = ChatTemplate.from_string(source)
    with pytest.raises(TemplateError):
        template.render(CONVERSATION)


def test_sandbox_is_immutable() -> None:
    template = ChatTemplate.from_string("{% set _ = messages.append({'role': 'user'}) %}ok")
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(TemplateError):
        template.render(messages)
    assert len(messages) == 1


# --- errors ------------------------------------------------------------------


def test_syntax_error_names_template_and_line() -> None:
    source = "{% for m in messages %}\n{{ m.content }}\n{% if %}\n{% endfor %}"
    with pytest.raises(TemplateError) as info:
        ChatTemplate.from_string(source, name="broken")
    message = str(info.value)
    assert "broken" in message
    assert "line 3" in message


def test_unknown_filter_is_a_template_error() -> None:
    with pytest.raises(TemplateError, match="nosuchfilter"):
        ChatTemplate.from_string("{{ messages | nosuchfilter }}")


def test_render_error_is_template_error_with_line() -> None:
    template = ChatTemplate.from_string("ok\n{{ messages[0]['content'] + 1 }}", name="adder")
    with pytest.raises(TemplateError) as info:
        template.render([{"role": "user", "content": "Hi"}])
    assert "adder" in str(info.value)
    assert "line 2" in str(info.value)


def test_content_parts_do_not_crash_string_templates() -> None:
    template = ChatTemplate.from_string(SMOLLM2_TEMPLATE, name="smollm2")
    parts = [{"type": "text", "text": "Hi"}]
    with pytest.raises(TemplateError, match="smollm2"):
        template.render([{"role": "user", "content": parts}])
    # Templates that print content directly see the parts as given.
    echo = ChatTemplate.from_string("{{ messages[0].content[0].text }}")
    assert echo.render([{"role": "user", "content": parts}]) == "Hi"


# --- continue_final_message ----------------------------------------------------


def test_continue_final_message_cuts_after_last_occurrence() -> None:
    template = ChatTemplate.from_string(SMOLLM2_TEMPLATE)
    messages = [
        {"role": "system", "content": "Say Hello"},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hello"},
    ]
    out = template.render(messages, add_generation_prompt=False, continue_final_message=True)
    assert out == (
        "<|im_start|>system\nSay Hello<|im_end|>\n"
        "<|im_start|>user\nHello<|im_end|>\n"
        "<|im_start|>assistant\nHello"
    )


def test_continue_final_message_keeps_trailing_space_when_template_does() -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure, "}]
    kept = shipped("chatml").render(messages, add_generation_prompt=False, continue_final_message=True)
    assert kept.endswith("<|im_start|>assistant\nSure, ")
    trimmed = shipped("llama3").render(messages, add_generation_prompt=False, continue_final_message=True)
    assert trimmed.endswith("<|end_header_id|>\n\nSure,")


def test_continue_final_message_with_content_parts() -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "Once upon"}]},
    ]
    out = shipped("chatml").render(messages, add_generation_prompt=False, continue_final_message=True)
    assert out.endswith("<|im_start|>assistant\nOnce upon")


def test_continue_final_message_requires_assistant_last() -> None:
    with pytest.raises(TemplateError, match="assistant"):
        shipped("chatml").render(CONVERSATION, add_generation_prompt=False, continue_final_message=True)
    with pytest.raises(TemplateError):
        shipped("chatml").render([], add_generation_prompt=False, continue_final_message=True)


def test_continue_final_message_content_missing_from_output() -> None:
    template = ChatTemplate.from_string("{% for m in messages %}{{ m.role }}{% endfor %}", name="roles")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Partial"}]
    with pytest.raises(TemplateError, match="roles"):
        template.render(messages, add_generation_prompt=False, continue_final_message=True)


def test_generation_prompt_and_continue_conflict() -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Partial"}]
    with pytest.raises(TemplateError, match="add_generation_prompt"):
        shipped("chatml").render(messages, add_generation_prompt=True, continue_final_message=True)


# --- metadata -----------------------------------------------------------------


def test_metadata_read_without_rendering() -> None:
    source = (
        "{# header #}\n"
        "{%- set stop_strings = ['</s>', 'User:'] -%}\n"
        "{%- set tool_start = '<|tool|>' -%}\n"
        "{{ raise_exception('needs real messages') if not messages }}"
    )
    template = ChatTemplate.from_string(source)
    assert template.metadata == TemplateMetadata(stop_strings=["</s>", "User:"], tool_start="<|tool|>")


def test_metadata_ignores_non_constant_and_nested_sets() -> None:
    source = (
        "{% set stop_strings = [eos_token] %}"
        "{% for m in messages %}{% set tool_start = '<x>' %}{% endfor %}"
    )
    assert ChatTemplate.from_string(source).metadata == TemplateMetadata([], None)


def test_metadata_single_string_stop() -> None:
    template = ChatTemplate.from_string("{% set stop_strings = '###' %}")
    assert template.metadata.stop_strings == ["###"]


# --- lookup ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["../x", "/etc/passwd", "a/b", "..", "", "  ", "a\\b", "C:evil", "..\\x", "x\x00"],
)
def test_resolve_template_rejects_paths(name: str) -> None:
    with pytest.raises(ValueError):
        resolve_template(TEMPLATES_DIR, name)


def test_resolve_template_missing_lists_available() -> None:
    with pytest.raises(FileNotFoundError) as info:
        resolve_template(TEMPLATES_DIR, "nope")
    message = str(info.value)
    assert "nope" in message
    for name in EXPECTED:
        assert name in message


def test_resolve_template_finds_file(tmp_path: Path) -> None:
    (tmp_path / "mine.jinja").write_text("{{ messages | length }}", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("x", encoding="utf-8")
    (tmp_path / "sub.jinja").mkdir()
    assert list_templates(tmp_path) == ["mine"]
    assert resolve_template(tmp_path, "mine") == tmp_path / "mine.jinja"
    assert resolve_template(tmp_path, "mine.jinja") == tmp_path / "mine.jinja"
    with pytest.raises(FileNotFoundError, match="mine"):
        resolve_template(tmp_path, "sub")


def test_list_templates_missing_directory(tmp_path: Path) -> None:
    assert list_templates(tmp_path / "absent") == []
