"""Chat templates are untrusted code (a downloaded GGUF carries one): the sandbox must stop
every attempt to read files, reach Python objects or exhaust memory, with a clear error."""

from __future__ import annotations

import pytest

from common.formats.templating import ChatTemplate, TemplateError

MESSAGES = [{"role": "user", "content": "hi"}]

ESCAPES = {
    "mro": "{{ ''.__class__.__mro__ }}",
    "subclasses": "{{ messages.__class__.__base__.__subclasses__() }}",
    "template_context": "{{ self._TemplateReference__context }}",
    "lipsum_globals": "{{ lipsum.__globals__ }}",
    "cycler_globals": "{{ cycler.__init__.__globals__.os }}",
    "joiner_globals": "{{ joiner.__init__.__globals__ }}",
    "namespace_globals": "{{ namespace.__init__.__globals__ }}",
    "our_globals": "{{ raise_exception.__globals__ }}",
    "strftime_globals": "{{ strftime_now.__globals__['os'] }}",
    "bound_self": "{{ (messages|first).items.__self__ }}",
    "format_attribute": "{{ '{0.__class__}'.format(messages) }}",
    "mutate_list": "{{ messages.append(1) }}",
    "mutate_dict": "{{ (messages|first).update({'role': 'system'}) }}",
    "include": "{% include '/etc/passwd' %}",
    "import": "{% import 'os' as os %}{{ os }}",
    "extends": "{% extends '/etc/passwd' %}",
    "from_import": "{% from '/etc/passwd' import x %}",
    "huge_string": "{{ 'a' * 10**10 }}",
    "huge_list": "{{ [0] * 10**9 }}",
    "huge_range": "{{ range(10**9)|list|length }}",
}


@pytest.mark.parametrize("source", list(ESCAPES.values()), ids=list(ESCAPES))
def test_escape_attempts_fail_safely(source: str) -> None:
    with pytest.raises(TemplateError) as exc:
        ChatTemplate.from_string(source, name="evil").render(MESSAGES)
    message = exc.value.message
    assert exc.value.status == 400 and "'evil'" in message
    assert "root:" not in message and "<module" not in message and "<function" not in message
    # It says what happened and what to do: change or replace the template.
    assert "sandbox" in message or "failed to render" in message
    assert "template" in message.lower() and ("use a different template" in message or "another template" in message)


def test_sandbox_errors_name_what_was_blocked() -> None:
    with pytest.raises(TemplateError, match="attribute '__class__'"):
        ChatTemplate.from_string(ESCAPES["mro"]).render(MESSAGES)
    with pytest.raises(TemplateError, match="over the limit"):
        ChatTemplate.from_string(ESCAPES["huge_string"]).render(MESSAGES)
    with pytest.raises(TemplateError, match="no loader"):
        ChatTemplate.from_string(ESCAPES["include"]).render(MESSAGES)


def test_broken_template_fails_when_loaded() -> None:
    with pytest.raises(TemplateError, match="syntax error on line 1"):
        ChatTemplate.from_string("{% for m in messages %}{{ m.__class__ ", name="broken")


def test_content_is_data_and_ordinary_operators_still_work() -> None:
    template = ChatTemplate.from_string(
        "{% for m in messages %}{{ '-' * 3 }}{{ m.content }}{{ 2 ** 10 }}{{ [1] * 2 }}{% endfor %}"
    )
    hostile = "{{ cycler.__init__.__globals__ }}{% include '/etc/passwd' %}"
    out = template.render([{"role": "user", "content": hostile}])
    assert out == f"---{hostile}1024[1, 1]"
    assert MESSAGES == [{"role": "user", "content": "hi"}]  # the sandbox never mutates the input
