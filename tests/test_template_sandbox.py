"""The bounded chat-template renderer: same text as transformers, and no way to hang or flood.

Three parts: real-world templates render byte-for-byte as ``tokenizer.apply_chat_template``
does (so the runner trains on the text inference will see); a table of hostile templates, each
built to hang, exhaust memory or escape the sandbox, must stop with exit 2, the template's
origin and line, in well under a second; and hypothesis composes many more from the same
ingredients, in process. ``tests/test_hostile_model_inputs.py`` sends a few through
``qlora run``.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.errors import DataError, ExitCode, RunnerError, SpecError
from runner.train.formatting import CHAT_TEMPLATES
from runner.train.template_sandbox import (
    MAX_OUTPUT_CHARS,
    ChatTemplate,
    TemplateSource,
)
from runner.train.tiny import CHAT_TEMPLATE as TINY

CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "opposite of hot?"},
    {"role": "assistant", "content": "cold"},
    {"role": "user", "content": "and   of up? "},
    {"role": "assistant", "content": "down"},
]

# Shaped like the Qwen 3 and Llama 3.1 templates: namespaces, reverse loops, slicing, loop
# variables, string methods, |tojson with an indent, |format, raise_exception, strftime_now.
QWEN_LIKE = """\
{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_query_index=messages|length - 1, seen=0) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if message.role == "user" and ns.seen == 0 %}
        {%- set ns.last_query_index = index %}{%- set ns.seen = 1 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('unexpected role ' ~ message.role) }}
    {%- elif message.role != 'system' %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content | trim + '<|im_end|>\\n' }}
    {%- endif %}
    {%- if loop.last and loop.index0 == ns.last_query_index %}
        {{- '%d turns, %s'|format(loop.length, message.content.split()|join('-')) }}
    {%- endif %}
{%- endfor %}
{{- {"tools": [{"name": "f", "args": [1, 2]}]}|tojson(indent=2) }}
{{- ('x'|center(5)) ~ (messages|map(attribute='role')|unique|list|length|string) }}
{{- strftime_now('%Y')|length }}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

GENERATION_TAG = (
    "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}"
    "{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}"
)


@pytest.mark.parametrize(
    "template",
    [
        pytest.param(TINY, id="tiny"),
        pytest.param(CHAT_TEMPLATES["chatml"], id="chatml"),
        pytest.param(CHAT_TEMPLATES["llama-3.1"], id="llama-3.1"),
        pytest.param(QWEN_LIKE, id="qwen-like"),
        pytest.param(GENERATION_TAG, id="generation-tag"),
    ],
)
@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("turns", [1, 3, 5])
def test_renders_exactly_like_transformers(
    tiny_tokenizer: Any, template: str, gen: bool, turns: int
) -> None:
    messages = CHAT[:turns]
    theirs = tiny_tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=gen
    )
    ours = ChatTemplate(TemplateSource(template, "t"), tiny_tokenizer.special_tokens_map).render(
        messages, add_generation_prompt=gen, where="row 1"
    )
    assert ours == theirs


# (template, exception type, expected fragment of the message)
HOSTILE = [
    pytest.param(
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
        DataError,
        "line 1: the chat template does more than",
        id="loop-for-ever",
    ),
    pytest.param(
        "{% for a in messages %}" * 12 + "x" + "{% endfor %}" * 12,
        DataError,
        "steps of work",
        id="nested-loops-over-the-data",
    ),
    pytest.param(
        "{% for x in [0] recursive %}{{ loop([x, x]) }}{% endfor %}",
        DataError,
        "the chat template",
        id="recursive-loop",
    ),
    pytest.param(
        "{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(60) }}",
        DataError,
        "steps of work",
        id="exponential-macro",
    ),
    pytest.param(
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
        DataError,
        "asks for a joined text of about",
        id="doubling-string",
    ),
    pytest.param(
        "{% for i in range(1000) %}{% for j in range(1000) %}" + "y" * 5000 + "{% endfor %}"
        "{% endfor %}",
        DataError,
        "writes more than",
        id="literal-flood",
    ),
    pytest.param(
        "{% set x %}{% for i in range(100000) %}" + "y" * 5000 + "{% endfor %}{% endset %}",
        DataError,
        "writes more than",
        id="flood-inside-a-set-block",
    ),
    pytest.param("{{ 'x' * 10**10 }}", DataError, "repeated text", id="string-times-huge"),
    pytest.param(
        "{% set ns = namespace(x=3) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}"
        "{% endfor %}",
        DataError,
        "multiplies numbers past",
        id="bigint-squaring",
    ),
    pytest.param("{{ 7 ** 100000 }}", DataError, "raises a number past", id="power"),
    pytest.param("{{ 'x'.ljust(10**9) }}", DataError, "passes the number", id="ljust"),
    pytest.param("{{ 'x'|center(10**9) }}", DataError, "passes the number", id="center"),
    pytest.param("{{ ('a\\n' * 50000)|indent(99999) }}", DataError, "indented text", id="indent"),
    pytest.param(
        "{{ ('a' * 100000).replace('a', 'b' * 100000) }}", DataError, "replaced", id="replace"
    ),
    pytest.param(
        "{{ ('a' * 100000)|replace('a', 'b' * 100000) }}",
        DataError,
        "replaced",
        id="replace-filter",
    ),
    pytest.param("{{ '%099999999d' % 1 }}", DataError, "formatted text", id="percent-width"),
    pytest.param("{{ '{:>99999999}'.format(1) }}", DataError, "formatted text", id="format"),
    pytest.param(
        "{{ '%s'|format('x' * 1000000) ~ 'x' * 1000000 }}",
        DataError,
        "the chat template",
        id="format-filter",
    ),
    pytest.param("{{ ('x' * 90000)|list|join('y' * 90000) }}", DataError, "joined text", id="join"),
    pytest.param(
        "{{ range(100000)|map('string')|map('list')|sum(start=[]) }}",
        DataError,
        "|sum adds numbers only",
        id="quadratic-sum",
    ),
    pytest.param("{{ messages|tojson(indent=99999) }}", DataError, "JSON text", id="tojson-indent"),
    pytest.param(
        "{{ ('a' * 100000).translate({97: 'b' * 100000}) }}",
        DataError,
        "translated",
        id="translate",
    ),
    pytest.param(
        "{{ ('\\t' * 100000).expandtabs(100000) }}", DataError, "expanded", id="expandtabs"
    ),
    pytest.param("{{ lipsum(100000) }}", DataError, "lipsum", id="no-lipsum"),
    pytest.param(
        "ok\n{{ messages.__class__.__mro__ }}",
        DataError,
        "line 2: the chat template does something the sandbox forbids",
        id="dunder",
    ),
    pytest.param(
        "{{ ''.__class__.__subclasses__() }}", DataError, "sandbox forbids", id="subclasses"
    ),
    pytest.param("{{ messages.append(1) }}", DataError, "sandbox forbids", id="mutation"),
    pytest.param(
        "{{ raise_exception('only user and assistant roles') }}",
        DataError,
        "refused this conversation: only user and assistant roles",
        id="raise-exception",
    ),
    pytest.param(
        "a\nb\n{{ 1 + 'a' }}",
        DataError,
        "line 3: the chat template failed: TypeError",
        id="type-error",
    ),
    pytest.param(
        "{% for m in messages %}\n{{ m }\n", SpecError, "line 2: unexpected '}'", id="syntax-error"
    ),
    pytest.param("{{ x|urlize }}", SpecError, "line 1: No filter named 'urlize'", id="urlize"),
    pytest.param("{% include 'other' %}", SpecError, "{% include %}", id="include"),
    pytest.param("{% extends 'base' %}", SpecError, "{% include %}", id="extends"),
    pytest.param(
        "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}",
        SpecError,
        "nests too deeply",
        id="deep-nesting",
    ),
    pytest.param("x" * 300_000, SpecError, "the limit is", id="too-long"),
    pytest.param(  # textwrap is quadratic in one long word: this took ~40 s before the limit
        "{{ ('a' * 500000)|wordwrap(1) }}",
        DataError,
        "wraps a text of 500000 characters (limit 65536)",
        id="wordwrap-quadratic",
    ),
]


@pytest.mark.parametrize(("template", "error", "fragment"), HOSTILE)
def test_hostile_templates_stop_fast_with_exit_2(
    template: str, error: type[RunnerError], fragment: str
) -> None:
    started = time.monotonic()
    with pytest.raises(error) as caught:
        ChatTemplate(TemplateSource(template, "dataset.chat_template"), {}).render(
            CHAT, add_generation_prompt=False, where="dataset.sources[0]: row 4"
        )
    elapsed = time.monotonic() - started
    assert caught.value.exit_code is ExitCode.INVALID_INPUT
    assert fragment in caught.value.message
    assert "dataset.chat_template" in caught.value.message
    if error is DataError:
        assert caught.value.message.startswith("dataset.sources[0]: row 4: dataset.chat_template")
    assert elapsed < 8, f"took {elapsed:.1f} s"


def test_a_template_may_write_more_for_longer_conversations() -> None:
    """The output budget grows with the input, so a long real conversation is never refused."""
    long = [{"role": "user", "content": "x" * (2 * MAX_OUTPUT_CHARS)}]
    tpl = ChatTemplate(TemplateSource(TINY, "t"), {"bos_token": "<s>"})
    assert len(tpl.render(long, add_generation_prompt=True, where="r")) > 2 * MAX_OUTPUT_CHARS


def test_budget_is_per_render() -> None:
    """A template that uses most of its budget on one row still renders the next one."""
    heavy = "{% for a in range(200) %}{% for b in range(200) %}{% endfor %}{% endfor %}ok"
    tpl = ChatTemplate(TemplateSource(heavy, "t"), {})
    for _ in range(3):
        assert tpl.render(CHAT, add_generation_prompt=False, where="r") == "ok"


# --- hypothesis: compose hostile templates from the same ingredients -----------------------

_int = st.one_of(st.integers(-3, 3), st.sampled_from([10**5, 10**6, 10**9, 10**30]))
_text = st.sampled_from(["'ab'", "'x' * 1000", "messages[0].content", "'%s %d'", "'{:>40}'"])


_FILTERS = [
    "center(100000)",
    "indent(100000)",
    "replace('a', 'bbbb')",
    "join('--')",
    "tojson",
    "tojson(indent=100000)",
    "list",
    "length",
    "string",
    "upper",
    "batch(3)",
    "format(1)",
    "sum",
    "first",
]


def _exprs() -> st.SearchStrategy[str]:
    def extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        return st.one_of(
            st.tuples(inner, st.sampled_from(["+", "*", "~", "**", "%", "//"]), inner).map(
                lambda t: f"({t[0]} {t[1]} {t[2]})"
            ),
            st.tuples(inner, st.sampled_from(_FILTERS)).map(lambda t: f"({t[0]}|{t[1]})"),
            st.tuples(
                inner,
                st.sampled_from(["ljust", "zfill", "expandtabs", "split", "strip", "count"]),
                _int,
            ).map(lambda t: f"{t[0]}.{t[1]}({t[2]})"),
            st.tuples(
                inner, st.sampled_from(["__class__", "mro", "append", "role", "content"])
            ).map(lambda t: f"{t[0]}.{t[1]}"),
        )

    base = st.one_of(_int.map(str), _text, st.just("messages"), st.just("range(1000)"))
    return st.recursive(base, extend, max_leaves=6)


def _blocks() -> st.SearchStrategy[str]:
    def extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        return st.one_of(
            st.tuples(
                st.sampled_from(["range(1000)", "messages", "range(100000)", "'abc'"]), inner
            ).map(lambda t: f"{{% for i in {t[0]} %}}{t[1]}{{% endfor %}}"),
            st.tuples(inner, inner).map(lambda t: t[0] + t[1]),
            inner.map(lambda b: f"{{% set ns.s = ns.s ~ ns.s %}}{b}"),
            inner.map(
                lambda b: f"{{% macro m(n) %}}{b}{{{{ m(n) }}}}{{% endmacro %}}{{{{ m(1) }}}}"
            ),
            inner.map(lambda b: f"{{% set blk %}}{b}{{% endset %}}{{{{ blk }}}}"),
        )

    leaf = st.one_of(_exprs().map(lambda e: f"{{{{ {e} }}}}"), st.just("text "))
    return st.recursive(leaf, extend, max_leaves=5)


_templates = st.tuples(_blocks(), st.integers(0, 40), st.booleans()).map(
    # A prefix for namespaces, and sometimes a cut at a random point (a syntax error).
    lambda t: ("{% set ns = namespace(s='ab') %}" + t[0])[: len(t[0]) - t[1] if t[2] else None]
)


@settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(template=_templates)
def test_generated_templates_render_or_fail_with_exit_2_in_bounded_time(template: str) -> None:
    started = time.monotonic()
    try:
        out = ChatTemplate(TemplateSource(template, "dataset.chat_template"), {}).render(
            CHAT, add_generation_prompt=False, where="dataset.sources[0]: row 1"
        )
    except RunnerError as e:
        assert e.exit_code is ExitCode.INVALID_INPUT, e.message
        assert "dataset.chat_template" in e.message
    else:
        assert len(out) <= MAX_OUTPUT_CHARS + 4 * sum(len(m["content"]) for m in CHAT)
    assert time.monotonic() - started < 12
