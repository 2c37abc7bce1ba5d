"""Chat templates rendered in a sandbox whose work and output are bounded by construction.

A chat template is code the user supplies (``dataset.chat_template``) or that came with the
model (``tokenizer_config.json``, ``chat_template.jinja``). transformers renders it in jinja2's
``ImmutableSandboxedEnvironment``, which stops attribute tricks but not cost: a template that
loops ``range(100000)`` inside ``range(100000)``, doubles a string fifty times, or asks for
``'x' * 10**10`` hangs the preflight or exhausts memory. The runner renders every template
through :class:`ChatTemplate` instead (same environment options, filters and globals as
transformers, so the text is the same), where:

* every unit of work is charged to a per-render budget: each loop iteration, call, attribute
  or item lookup, operator, filter and test, plus the size of the strings and lists they
  produce; every chunk of output (literal text included) is charged to an output budget;
* no single operation can be expensive: operators and methods that multiply sizes
  (``*``, ``**``, ``%``, ``+``, ``~``, ``str.format``, ``replace``, ``join``, ``indent``, ...)
  have their result size estimated *before* they run and are refused above the budget, and
  integer arguments to calls are capped at :data:`MAX_INT_ARG`;
* a wall-clock deadline is checked as the budget is charged, which is frequent because nothing
  runs long between two charges.

So a render either finishes within :data:`MAX_STEPS` + small per-message allowances, or stops
with a ``line N: ...`` error naming the template's origin (exit code 2). No thread, no
subprocess, no timer: a hang is impossible because there is nothing left that can run
unmetered.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, cast

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension, loopcontrols
from jinja2.runtime import Context, LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import _PassArg, pass_context
from jinja2.visitor import NodeTransformer

from runner.errors import DataError, SpecError

MAX_TEMPLATE_CHARS = 256 * 1024
"""Longest template source accepted (real chat templates are under 20 KiB)."""
MAX_STEPS = 100_000
"""Work units one render may use, before the per-message and per-character allowances."""
STEPS_PER_MESSAGE = 1_000
MAX_OUTPUT_CHARS = 1024 * 1024
"""Characters one render may produce, before the allowance of 4 per input character."""
OUTPUT_PER_INPUT_CHAR = 4
MAX_RENDER_S = 10.0
"""Wall-clock limit of one render, checked as work is charged."""
MAX_INT_ARG = 100_000
"""Largest integer a template may pass to a function or filter (jinja2's own range limit)."""
MAX_WRAP_CHARS = 64 * 1024
"""Longest text the ``wordwrap`` filter may wrap (its cost grows with the square of a word)."""
MAX_INT_BITS = 4096
"""Largest integer result of ``*`` and ``**``."""
_SIZE_UNIT = 1024
"""Producing this many characters or items costs one more work unit."""
_TIME_CHECK_EVERY = 1024

_FORMAT_WIDTH = re.compile(r"%[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[a-zA-Z%]")
_BRACE_FIELD = re.compile(r"\{[^{}]*\}")
_NUMBER = re.compile(r"\d+")


class TemplateBudgetError(Exception):
    """A render used more work, output or time than its budget (raised inside a render)."""


@dataclass(frozen=True)
class TemplateSource:
    """A chat template's text and where it came from.

    Attributes:
        text: The Jinja source.
        origin: What to name in errors: ``dataset.chat_template``, a model file, or
            ``built-in template 'chatml'``.
    """

    text: str
    origin: str


class _Budget:
    def __init__(self, steps: int, chars: int, seconds: float) -> None:
        self.steps_left = steps
        self.chars_left = chars
        self.max_value = chars
        self.deadline = time.monotonic() + seconds
        self.limits = (steps, chars, seconds)
        self._until_clock = _TIME_CHECK_EVERY

    def charge(self, units: int = 1) -> None:
        self.steps_left -= units
        if self.steps_left < 0:
            raise TemplateBudgetError(
                f"does more than {self.limits[0]} steps of work for one conversation "
                "(a loop that never ends, or one far too large)"
            )
        self._until_clock -= units
        if self._until_clock <= 0:
            self._until_clock = _TIME_CHECK_EVERY
            if time.monotonic() > self.deadline:
                raise TemplateBudgetError(
                    f"took more than {self.limits[2]:g} s for one conversation"
                )

    def produced(self, value: object) -> None:
        size = _size(value)
        if size > self.max_value:
            raise TemplateBudgetError(
                f"builds a value of {size} characters or items, over the limit of "
                f"{self.max_value} for this conversation"
            )
        self.charge(1 + size // _SIZE_UNIT)

    def output(self, text: str) -> None:
        self.chars_left -= len(text)
        if self.chars_left < 0:
            raise TemplateBudgetError(
                f"writes more than {self.limits[1]} characters for one conversation"
            )
        self.charge(1 + len(text) // _SIZE_UNIT)

    def allow_size(self, estimate: int, what: str) -> None:
        if estimate > self.max_value:
            raise TemplateBudgetError(
                f"asks for {what} of about {estimate} characters or items, over the limit of "
                f"{self.max_value} for this conversation"
            )


def _size(value: object) -> int:
    if isinstance(value, str | bytes | list | tuple | dict | set | frozenset):
        return len(value)
    return 0


def _check_int_args(args: Iterable[object]) -> None:
    for a in args:
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_INT_ARG:
            raise TemplateBudgetError(
                f"passes the number {a} to a function; the limit is {MAX_INT_ARG}"
            )


def _format_estimate(fmt: str, values: Sequence[object]) -> int:
    """Upper bound of ``fmt % values`` / ``fmt.format(*values)`` without running it."""
    widths = [0]
    fields = 0
    for m in _FORMAT_WIDTH.finditer(fmt):
        fields += 1
        if "*" in m.group(0):
            raise TemplateBudgetError("uses a '*' width in a format string; write the number")
        widths += [int(n) for n in (m.group(1), m.group(2)) if n]
    for m in _BRACE_FIELD.finditer(fmt):
        fields += 1
        widths += [int(n) for n in _NUMBER.findall(m.group(0))]
    widest = max((len(str(v)) for v in values), default=0)
    return len(fmt) + fields * (max(widths) + widest)


def _json_indent_extra(value: object, indent: int) -> int:
    """Characters ``json.dumps(indent=...)`` adds to the compact form (newlines, indents)."""
    extra = 0
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        children = (
            list(item.values())
            if isinstance(item, dict)
            else list(item)
            if isinstance(item, list | tuple)
            else []
        )
        if children:
            extra += len(children) * (1 + indent * (depth + 1)) + 1 + indent * depth
            stack.extend((c, depth + 1) for c in children)
    return extra


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask marker).

    The runner finds assistant spans itself, so the block just renders its body.
    """

    tags = {"generation"}  # noqa: RUF012 (jinja2 declares it as an instance attribute)

    def parse(self, parser: jinja2.parser.Parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _Instrument(NodeTransformer):
    """Rewrites a parsed template so that iteration, ``~`` and literal text are charged."""

    def visit_For(self, node: nodes.For) -> nodes.Node:  # noqa: N802 (jinja2's visitor names)
        self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, "qlora_iter", [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:  # noqa: N802 (jinja2's visitor names)
        self.generic_visit(node)
        items = nodes.List(node.nodes, lineno=node.lineno)
        return nodes.Filter(items, "qlora_concat", [], [], None, None, lineno=node.lineno)

    def visit_TemplateData(self, node: nodes.TemplateData) -> nodes.Node:  # noqa: N802 (jinja2's visitor names)
        # Literal text becomes a constant expression, so `finalize` charges it like any output.
        return nodes.Const(node.data, lineno=node.lineno)

    def visit_Include(self, node: nodes.Node) -> nodes.Node:  # noqa: N802 (jinja2's visitor names)
        raise jinja2.TemplateSyntaxError(
            "{% include %}, {% import %} and {% extends %} are not available in a chat "
            "template; write the template as one text",
            node.lineno,
        )

    visit_Import = visit_FromImport = visit_Extends = visit_Include  # noqa: N815


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """transformers' chat-template environment with every operation charged to a budget."""

    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})

    def __init__(self) -> None:
        super().__init__(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_GenerationTag, loopcontrols],
            finalize=self._finalize,
        )
        self.budget: _Budget | None = None
        self.globals.pop("lipsum", None)
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now
        self.filters["tojson"] = self._tojson
        for unsafe in ("pprint", "urlize"):  # debugging aids; unbounded regex/recursion work
            self.filters.pop(unsafe, None)
        self.filters = {
            name: self._metered(f, _FILTER_CHECKS.get(name)) for name, f in self.filters.items()
        }
        self.filters["qlora_iter"] = self._iter
        self.filters["qlora_concat"] = self._concat
        self.tests = {
            name: self._metered(cast(Callable[..., Any], f), None) for name, f in self.tests.items()
        }

    # -- budget ---------------------------------------------------------------------------

    @property
    def _b(self) -> _Budget:
        if self.budget is None:  # compile-time constant folding: nothing to charge yet
            return _Budget(MAX_STEPS, MAX_OUTPUT_CHARS, MAX_RENDER_S)
        return self.budget

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        out = _Instrument().visit(tree)
        assert isinstance(out, nodes.Template)
        return out

    @pass_context
    def _finalize(self, context: Context, value: Any) -> str:
        text = str(value)
        self._b.output(text)
        return text

    @pass_context
    def _iter(self, context: Context, iterable: Any) -> Iterator[Any]:
        return self._metered_iter(iterable)

    def _metered_iter(self, iterable: Any) -> Iterator[Any]:
        budget = self._b
        for item in iterable:
            budget.charge()
            yield item

    @pass_context
    def _concat(self, context: Context, parts: list[Any]) -> str:
        texts = [str(p) for p in parts]
        self._b.allow_size(sum(len(t) for t in texts), "a joined text")
        text = "".join(texts)
        self._b.produced(text)
        return text

    def _metered(self, func: Callable[..., Any], check: _Check | None) -> Callable[..., Any]:
        pass_arg = _PassArg.from_obj(func)

        @pass_context
        def metered(context: Context, *args: Any, **kwargs: Any) -> Any:
            budget = self._b
            budget.charge(1 + (_size(args[0]) // _SIZE_UNIT if args else 0))
            _check_int_args((*args, *kwargs.values()))
            if check is not None:
                args = check(budget, args, kwargs)
            if pass_arg is _PassArg.context:
                result = func(context, *args, **kwargs)
            elif pass_arg is _PassArg.eval_context:
                result = func(context.eval_ctx, *args, **kwargs)
            elif pass_arg is _PassArg.environment:
                result = func(self, *args, **kwargs)
            else:
                result = func(*args, **kwargs)
            budget.produced(result)
            return result

        metered.__name__ = getattr(func, "__name__", "filter")
        return metered

    # -- sandbox hooks ----------------------------------------------------------------------

    def getattr(self, obj: Any, attribute: str) -> Any:
        self._b.charge()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        self._b.charge()
        value = super().getitem(obj, argument)
        if isinstance(argument, slice):
            self._b.produced(value)
        return value

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = self._b
        budget.charge()
        _check_binop(budget, operator, left, right)
        result = super().call_binop(context, operator, left, right)
        budget.produced(result)
        return result

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        budget = __self._b
        budget.charge()
        _check_int_args((*args, *kwargs.values()))
        if isinstance(__obj, LoopContext) and args:  # `loop(children)` in a recursive loop
            args = (__self._metered_iter(args[0]), *args[1:])
        args = _check_method(budget, __obj, args)
        result = super().call(__context, __obj, *args, **kwargs)
        if isinstance(result, range):
            budget.charge(len(result))
        budget.produced(result)
        return result

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        sandboxed = super().wrap_str_format(value)
        if sandboxed is None:
            return None
        fmt = str(value.__self__)

        def bounded(*args: Any, **kwargs: Any) -> str:
            values = [*args, *kwargs.values()]
            if value.__name__ == "format_map" and args and isinstance(args[0], Mapping):
                values = list(args[0].values())
            self._b.allow_size(_format_estimate(fmt, values), "a formatted text")
            return sandboxed(*args, **kwargs)

        return bounded

    # -- transformers' helpers ------------------------------------------------------------

    def _tojson(
        self,
        x: Any,
        ensure_ascii: bool = False,
        indent: int | str | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        compact = json.dumps(x, ensure_ascii=ensure_ascii, separators=separators)
        if indent is not None:
            width = indent if isinstance(indent, int) else len(str(indent))
            extra = _json_indent_extra(x, max(width, 0))
            self._b.allow_size(len(compact) + extra, "a JSON text")
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    if len(str(fmt)) > 256:
        raise TemplateBudgetError("passes a date format over 256 characters to strftime_now")
    return datetime.now().strftime(fmt)


def _check_binop(budget: _Budget, op: str, left: Any, right: Any) -> None:
    if op == "*":
        if isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise TemplateBudgetError(f"multiplies numbers past {MAX_INT_BITS} bits")
        elif (isinstance(right, int) and _size(left)) or (isinstance(left, int) and _size(right)):
            n, seq = (right, left) if isinstance(right, int) else (left, right)
            budget.allow_size(_size(seq) * max(n, 0), "a repeated text or list")
    elif op == "**":
        ints = isinstance(left, int) and isinstance(right, int)
        if ints and right > 0 and abs(left) > 1 and left.bit_length() * right > MAX_INT_BITS:
            raise TemplateBudgetError(f"raises a number past {MAX_INT_BITS} bits")
    elif op == "+":
        budget.allow_size(_size(left) + _size(right), "a joined text or list")
    elif op == "%" and isinstance(left, str):
        values = (
            list(right.values())
            if isinstance(right, Mapping)
            else list(right)
            if isinstance(right, tuple)
            else [right]
        )
        budget.allow_size(_format_estimate(left, values), "a formatted text")


def _check_method(budget: _Budget, obj: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Estimate the result of the str/bytes methods that can multiply their input's size."""
    owner = getattr(obj, "__self__", None)
    if not isinstance(owner, str | bytes):
        return args
    name = getattr(obj, "__name__", "")
    if name == "replace" and len(args) >= 2:
        old, new = args[0], args[1]
        hits = owner.count(old) if old else len(owner) + 1
        budget.allow_size(len(owner) + hits * max(len(new) - len(old), 0), "a replaced text")
    elif name == "join" and args:
        items = list(args[0])
        budget.allow_size(
            len(owner) * max(len(items) - 1, 0) + sum(_size(i) for i in items), "a joined text"
        )
        return (items, *args[1:])
    elif name == "expandtabs":
        tab = args[0] if args and isinstance(args[0], int) else 8
        tabs = owner.count("\t") if isinstance(owner, str) else owner.count(b"\t")
        budget.allow_size(len(owner) + tabs * max(tab, 0), "an expanded text")
    elif name == "translate" and args and isinstance(args[0], Mapping):
        widest = max((_size(v) for v in args[0].values()), default=1)
        budget.allow_size(len(owner) * max(widest, 1), "a translated text")
    return args


# Filters whose result can be much larger than their input: estimate first, then run.
_Check = Callable[["_Budget", tuple[Any, ...], dict[str, Any]], tuple[Any, ...]]


def _check_indent(budget: _Budget, args: tuple[Any, ...], kw: dict[str, Any]) -> tuple[Any, ...]:
    text = str(args[0]) if args else ""
    width = args[1] if len(args) > 1 else kw.get("width", 4)
    pad = width if isinstance(width, int) else len(str(width))
    budget.allow_size(len(text) + (text.count("\n") + 1) * max(pad, 0), "an indented text")
    return args


def _check_replace(budget: _Budget, args: tuple[Any, ...], kw: dict[str, Any]) -> tuple[Any, ...]:
    if len(args) >= 3:
        s, old, new = (str(a) for a in args[:3])
        hits = s.count(old) if old else len(s) + 1
        budget.allow_size(len(s) + hits * max(len(new) - len(old), 0), "a replaced text")
    return args


def _check_join(budget: _Budget, args: tuple[Any, ...], kw: dict[str, Any]) -> tuple[Any, ...]:
    if not args:
        return args
    items = list(args[0])
    sep = args[1] if len(args) > 1 else kw.get("d", "")
    total = _size(sep) * max(len(items) - 1, 0) + sum(len(str(i)) for i in items)
    budget.allow_size(total, "a joined text")
    return (items, *args[1:])


def _check_format(budget: _Budget, args: tuple[Any, ...], kw: dict[str, Any]) -> tuple[Any, ...]:
    if args:
        budget.allow_size(
            _format_estimate(str(args[0]), [*args[1:], *kw.values()]), "a formatted text"
        )
    return args


def _check_wordwrap(budget: _Budget, args: tuple[Any, ...], kw: dict[str, Any]) -> tuple[Any, ...]:
    text = str(args[0]) if args else ""
    if len(text) > MAX_WRAP_CHARS:  # textwrap is quadratic in a long word: time, not size
        raise TemplateBudgetError(
            f"wraps a text of {len(text)} characters (limit {MAX_WRAP_CHARS}); wrapping "
            "costs time quadratic in the text"
        )
    wrap = kw.get("wrapstring") or (args[3] if len(args) > 3 else None) or "\n"
    budget.allow_size(len(text) * (1 + len(str(wrap))), "a wrapped text")
    return args


def _check_sum(budget: _Budget, args: tuple[Any, ...], kw: dict[str, Any]) -> tuple[Any, ...]:
    start = kw.get("start", args[2] if len(args) > 2 else 0)
    if not isinstance(start, int | float):
        raise TemplateBudgetError("sums texts or lists; |sum adds numbers only, use |join")
    return args


_FILTER_CHECKS: dict[str, _Check] = {
    "indent": _check_indent,
    "replace": _check_replace,
    "join": _check_join,
    "format": _check_format,
    "wordwrap": _check_wordwrap,
    "sum": _check_sum,
}


class ChatTemplate:
    """A compiled chat template that renders conversations within a budget.

    Args:
        source: The template and where it came from.
        variables: Extra variables every render sees (``bos_token``, ``eos_token``, ...).

    Raises:
        SpecError: the template is too long, has a syntax error, uses an unknown filter or
            test, or includes other templates (exit code 2).
    """

    def __init__(self, source: TemplateSource, variables: Mapping[str, Any] | None = None):
        self.origin = source.origin
        self.variables = dict(variables or {})
        self._source = source
        if len(source.text) > MAX_TEMPLATE_CHARS:
            raise SpecError(
                f"{self.origin}: the chat template is {len(source.text)} characters long; the "
                f"limit is {MAX_TEMPLATE_CHARS}"
            )
        self._env = BoundedEnvironment()
        try:
            self._template = self._env.from_string(source.text)
        except jinja2.TemplateSyntaxError as e:
            problem = e.message.rstrip(".") if e.message else "syntax error"
            fix = "" if "; " in problem else "; fix the chat template's syntax"
            raise SpecError(f"{self.origin}: line {e.lineno}: {problem}{fix}") from e
        except RecursionError as e:
            raise SpecError(
                f"{self.origin}: the chat template nests too deeply to compile; simplify it"
            ) from e

    def __reduce__(self) -> tuple[Any, ...]:
        # Rank 0 hands the formatted data, template included, to the other DDP ranks by
        # pickling; a compiled Jinja template does not pickle, so the source travels instead.
        return (ChatTemplate, (self._source, self.variables))

    def render(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool, where: str
    ) -> str:
        """The template's text for ``messages``.

        Args:
            messages: ``{role, content}`` dicts.
            add_generation_prompt: Open an assistant turn at the end.
            where: The row, for error messages (``dataset.sources[0]: row 3``).

        Raises:
            DataError: the template refused the conversation, failed on it, touched what the
                sandbox forbids, or ran over its budget (exit code 2).
        """
        chars = sum(len(str(m.get("content", ""))) for m in messages)
        self._env.budget = _Budget(
            MAX_STEPS + STEPS_PER_MESSAGE * len(messages) + chars,
            MAX_OUTPUT_CHARS + OUTPUT_PER_INPUT_CHAR * chars,
            MAX_RENDER_S,
        )
        try:
            return self._template.render(
                **self.variables,
                messages=[dict(m) for m in messages],
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
            )
        except TemplateBudgetError as e:
            raise self._error(where, e, f"the chat template {e}; fix the template") from e
        except SecurityError as e:
            raise self._error(
                where,
                e,
                f"the chat template does something the sandbox forbids ({e}); a chat "
                "template may only read the conversation and write text",
            ) from e
        except jinja2.TemplateError as e:
            raise self._error(where, e, f"the chat template refused this conversation: {e}") from e
        # The template is the user's code: whatever else it raises (a TypeError adding a
        # number to a text, a RecursionError from a macro calling itself) is its failure.
        except Exception as e:
            raise self._error(where, e, f"the chat template failed: {type(e).__name__}: {e}") from e
        finally:
            self._env.budget = None

    def _error(self, where: str, e: BaseException, message: str) -> DataError:
        line = _template_line(e.__traceback__)
        at = f"{self.origin}: line {line}" if line else self.origin
        return DataError(f"{where}: {at}: {message}")


def _template_line(tb: TracebackType | None) -> int | None:
    """The template line the error happened on (jinja2 rewrites tracebacks to template
    lines, in frames named after the template)."""
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line
