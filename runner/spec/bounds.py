"""Limits on a spec document, enforced before any work is done on it.

A job spec is a few hundred bytes of YAML written by a person. Anything far larger, deeper or
more repetitive is a mistake or an attack, and must be turned away in milliseconds with bounded
memory, not after the secret scan or pydantic has walked it: a YAML "alias bomb" of a few
hundred bytes (nine levels of anchors, each used ten times) expands to a billion nodes, a deeply
nested document overflows Python's recursion limit, a 40 MB flow list costs gigabytes.

Two gates, the same limits (:class:`Limits`):

* :func:`parse_yaml` reads YAML with a composer that counts while it builds the node graph:
  every node, every alias use and the size an alias expands to (the anchored subtree's own
  expanded size), the nesting depth, the items of each collection and the length of each
  scalar. It stops at the first limit crossed, so an alias bomb costs as much as the limit,
  not as much as its expansion. Merge keys (``<<: *a``) are aliases too and are counted.
* :func:`check_document` walks an already-parsed object (a FineTuneJob read from the
  Kubernetes API) iteratively with the same limits, so the operator applies them too.

Every crossed limit is a :class:`runner.errors.SpecError` (exit code 2) with one
``path: message`` line naming the limit and the fix.

Scalars are resolved as in YAML 1.2, not PyYAML's YAML 1.1, in two places that matter: only
``true``/``false`` (any case) are booleans, so an unquoted ``yes``, ``on`` or ``y`` stays a
string and a boolean field rejects it (nothing but a literal ``true`` turns remote code on);
and ``2e-4`` is a number, as every YAML 1.2 and JSON reader takes it.
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
import yaml.composer
import yaml.constructor
import yaml.events
import yaml.nodes
import yaml.parser
import yaml.reader
import yaml.resolver
import yaml.scanner

from runner.errors import SpecError
from runner.local_files import read_file

# libyaml's parser emits the events ~10x faster; the counting composer stays Python.
_FastParser: Any = (
    getattr(importlib.import_module("yaml.cyaml"), "CParser", None)
    if yaml.__with_libyaml__
    else None
)


@dataclass(frozen=True)
class Limits:
    """Bounds on one spec document. Real specs are far inside every one of them.

    Attributes:
        max_bytes: Size of the file (UTF-8 bytes). A real spec is 1-5 KiB.
        max_nodes: Values in the document after alias expansion (a real spec has ~100).
        max_aliases: Uses of ``*anchor`` (and ``<<: *anchor`` merges).
        max_depth: Nesting of mappings and lists (a real spec is 4 deep).
        max_items: Entries of one mapping or list (e.g. ``dataset.sources``).
        max_scalar_chars: Characters of one key or value (e.g. an inline chat template).
    """

    max_bytes: int = 1024 * 1024
    max_nodes: int = 10_000
    max_aliases: int = 100
    max_depth: int = 32
    max_items: int = 1_000
    max_scalar_chars: int = 64 * 1024


DEFAULT_LIMITS = Limits()


class _LimitExceeded(Exception):  # noqa: N818 - internal signal, turned into SpecError
    def __init__(self, where: str, message: str) -> None:
        super().__init__(message)
        self.where = where
        self.message = message


class _BoundedComposer(yaml.composer.Composer):
    """PyYAML's composer, counting what it builds and stopping at the first limit."""

    limits: Limits = DEFAULT_LIMITS

    def _init_bounds(self, limits: Limits) -> None:
        self.limits = limits
        self._nodes = 0
        self._aliases = 0
        self._depth = 0
        self._anchor_sizes: dict[str, int] = {}
        self._path: list[str] = []

    def _stop(self, event: Any, message: str) -> None:
        mark = getattr(event, "start_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise _LimitExceeded("".join(self._path).lstrip(".") or "(root)", message + line)

    def _count(self, n: int, event: Any) -> None:
        self._nodes += n
        if self._nodes > self.limits.max_nodes:
            self._stop(
                event,
                f"more than {self.limits.max_nodes} values (after expanding aliases); a job "
                "spec is a short document: remove repeated anchors/aliases or generated content",
            )

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()  # type: ignore[attr-defined]  # from the parser mixed in
        self._path.append(_part(parent, index))
        try:
            return self._compose_counted(event, parent, index)
        finally:
            self._path.pop()

    def _compose_counted(self, event: Any, parent: Any, index: Any) -> Any:
        if isinstance(event, yaml.events.AliasEvent):
            self._aliases += 1
            if self._aliases > self.limits.max_aliases:
                self._stop(
                    event,
                    f"more than {self.limits.max_aliases} alias uses (*name); write the values "
                    "out instead of repeating anchors",
                )
            self._count(self._anchor_sizes.get(str(event.anchor), 1), event)
            return super().compose_node(parent, index)
        if isinstance(index, int) and index >= self.limits.max_items:
            self._stop(event, f"a list with more than {self.limits.max_items} items")
        if isinstance(event, yaml.events.CollectionStartEvent):
            self._depth += 1
            if self._depth > self.limits.max_depth:
                self._stop(
                    event,
                    f"nested deeper than {self.limits.max_depth} levels; a job spec is about "
                    "4 levels deep",
                )
        elif (
            isinstance(event, yaml.events.ScalarEvent)
            and len(event.value) > self.limits.max_scalar_chars
        ):
            self._stop(
                event,
                f"a value of {len(event.value)} characters (limit "
                f"{self.limits.max_scalar_chars}); put large content in a file the spec names",
            )
        before = self._nodes
        self._count(1, event)
        node = super().compose_node(parent, index)
        if isinstance(event, yaml.events.CollectionStartEvent):
            self._depth -= 1
            if isinstance(node, yaml.nodes.MappingNode) and len(node.value) > (
                self.limits.max_items
            ):
                self._stop(event, f"a mapping with more than {self.limits.max_items} keys")
            if isinstance(node, yaml.nodes.MappingNode):
                _check_unique_keys(node)
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            self._anchor_sizes[str(anchor)] = self._nodes - before
        return node


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping names the same key twice (PyYAML would silently keep the last)."""


def _check_unique_keys(node: yaml.nodes.MappingNode) -> None:
    seen: dict[str, yaml.nodes.Node] = {}
    for key, _ in node.value:
        if not isinstance(key, yaml.nodes.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
            continue
        if key.value in seen:
            raise DuplicateKeyError(
                None,
                None,
                f"duplicate key '{str(key.value)[:80]}' (first on line "
                f"{seen[key.value].start_mark.line + 1}); a key may appear once",
                key.start_mark,
            )
        seen[key.value] = key


MAX_INT_DIGITS = 100
"""Digits of an integer scalar (Python refuses to convert more than 4300 anyway)."""


class _Constructor(yaml.constructor.SafeConstructor):
    """SafeConstructor building YAML 1.2 core values; a mapping is built once per node.

    Explicit tags (``!!bool yes``) go through the same strict rules as plain scalars, so a
    tag cannot smuggle a YAML 1.1 boolean or a sexagesimal number past the resolver.
    """

    def construct_yaml_bool(self, node: Any) -> bool:
        value = str(self.construct_scalar(node))
        if value.lower() not in ("true", "false"):
            raise yaml.constructor.ConstructorError(
                None, None, f"!!bool {value!r} is not a boolean; write true or false",
                node.start_mark,
            )
        return value.lower() == "true"

    def construct_yaml_int(self, node: Any) -> int:
        value = str(self.construct_scalar(node))
        if not _INT_RE.fullmatch(value):
            raise yaml.constructor.ConstructorError(
                None, None, f"!!int {value[:40]!r} is not an integer", node.start_mark
            )
        digits = value.lstrip("+-")
        if len(digits) > MAX_INT_DIGITS:
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {len(digits)} digits (limit {MAX_INT_DIGITS})",
                node.start_mark,
            )
        sign = -1 if value.startswith("-") else 1
        if digits.startswith("0x"):
            return sign * int(digits[2:], 16)
        if digits.startswith("0o"):
            return sign * int(digits[2:], 8)
        return sign * int(digits, 10)  # YAML 1.2: a leading zero is not octal

    def construct_yaml_float(self, node: Any) -> float:
        value = str(self.construct_scalar(node))
        low = value.lower()
        if low in (".inf", "+.inf", "-.inf", ".nan"):
            return float(low.replace(".", ""))
        if not _FLOAT_RE.fullmatch(value) and not _INT_RE.fullmatch(value):
            raise yaml.constructor.ConstructorError(
                None, None, f"!!float {value[:40]!r} is not a number", node.start_mark
            )
        if len(value) > MAX_INT_DIGITS:
            raise yaml.constructor.ConstructorError(
                None, None, f"a number of {len(value)} characters (limit {MAX_INT_DIGITS})",
                node.start_mark,
            )
        return float(self.construct_yaml_int(node)) if _INT_RE.fullmatch(value) else float(value)


for _tag, _method in (
    ("bool", _Constructor.construct_yaml_bool),
    ("int", _Constructor.construct_yaml_int),
    ("float", _Constructor.construct_yaml_float),
):
    _Constructor.add_constructor(f"tag:yaml.org,2002:{_tag}", _method)  # type: ignore[type-var]
for _tag in ("timestamp", "value", "yaml"):  # YAML 1.1 types: never built, even when tagged
    _Constructor.yaml_constructors.pop(f"tag:yaml.org,2002:{_tag}", None)


class _Resolver(yaml.resolver.BaseResolver):
    """The YAML 1.2 core schema: null, ``true``/``false``, decimal/0x/0o ints, floats.

    Everything else is a string: ``yes``, ``on``, ``y`` (YAML 1.1 booleans), ``1:20``
    (sexagesimal), ``1_000``, ``2001-12-14`` (timestamps), ``=``. Merge keys stay.
    """


_INT_RE = re.compile(r"[-+]?(?:[0-9]+|0x[0-9a-fA-F]+|0o[0-7]+)")
_FLOAT_RE = re.compile(
    r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)"
    r"|\.(?:nan|NaN|NAN)"
)
for _tag, _regexp, _first in (
    ("null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""]),
    ("bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")),
    ("int", re.compile(f"^(?:{_INT_RE.pattern})$"), list("-+0123456789")),
    ("float", re.compile(f"^(?:{_FLOAT_RE.pattern})$"), list("-+0123456789.")),
    ("merge", re.compile(r"^(?:<<)$"), ["<"]),
):
    _Resolver.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", _regexp, _first)


if _FastParser is not None:

    class _FastLoader(_BoundedComposer, _FastParser, _Constructor, _Resolver):  # type: ignore[misc]
        def __init__(self, stream: str, limits: Limits) -> None:
            _FastParser.__init__(self, stream)
            yaml.composer.Composer.__init__(self)
            _Constructor.__init__(self)
            _Resolver.__init__(self)
            self._init_bounds(limits)


class _PyLoader(
    yaml.reader.Reader,
    yaml.scanner.Scanner,
    yaml.parser.Parser,
    _BoundedComposer,
    _Constructor,
    _Resolver,
):
    def __init__(self, stream: str, limits: Limits) -> None:
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        yaml.composer.Composer.__init__(self)
        _Constructor.__init__(self)
        _Resolver.__init__(self)
        self._init_bounds(limits)


def check_size(size: int, source: str, limits: Limits = DEFAULT_LIMITS) -> None:
    """Reject a file larger than ``limits.max_bytes`` before it is read.

    Raises:
        SpecError: the file is too large (exit code 2).
    """
    if size > limits.max_bytes:
        raise SpecError(
            f"{source}: the spec is {size} bytes; the limit is {limits.max_bytes} bytes "
            f"({limits.max_bytes // 1024} KiB). A job spec names its data and model by path or "
            "URI; it does not contain them"
        )


def parse_yaml(text: str, source: str, limits: Limits = DEFAULT_LIMITS) -> object:
    """Parse one YAML (or JSON) document within ``limits``.

    Raises:
        SpecError: a limit is crossed (``source:line N: message``), or the text is not YAML.
    """
    check_size(len(text.encode("utf-8", "surrogatepass")), source, limits)
    loader: Any = _FastLoader(text, limits) if _FastParser is not None else _PyLoader(text, limits)
    try:
        return loader.get_single_data()
    except _LimitExceeded as e:
        raise SpecError(f"{source}: invalid spec", [f"{e.where}: {e.message}"]) from None
    except RecursionError:  # unreachable within max_depth; kept so it can never be exit 1
        raise SpecError(f"{source}: nested too deeply") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"{where}: not valid YAML: {problem}") from e
    finally:
        dispose = getattr(loader, "dispose", None)
        if dispose is not None:
            dispose()


def decode_text(raw: bytes, source: str, what: str = "spec") -> str:
    """File bytes as text: UTF-8 (a byte-order mark is tolerated), nothing else.

    Raises:
        SpecError: the bytes are UTF-16/32 or not valid UTF-8, naming the byte offset.
    """
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(raw) > 1 and b"\x00" in raw[:4]):
        raise SpecError(f"{source}: the {what} is UTF-16 or UTF-32 encoded; save it as UTF-8")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SpecError(
            f"{source}: not valid UTF-8 at byte {e.start}; save the {what} as UTF-8"
        ) from None


def load_yaml_file(
    path: Path, *, what: str, label: str | None = None, limits: Limits = DEFAULT_LIMITS
) -> object:
    """Read and parse a YAML file other than a spec (a values file, the GPU class table) with
    the same bounds and the same YAML 1.2 reading as a spec.

    Raises:
        SpecError: unreadable, not a regular file, too large, not UTF-8, not YAML, or a limit
            crossed (exit code 2).
    """
    where = label or str(path)
    raw = read_file(path, where, max_bytes=limits.max_bytes, what=what)
    return parse_yaml(decode_text(raw, where, what), where, limits)


def check_document(doc: object, source: str, limits: Limits = DEFAULT_LIMITS) -> None:
    """Apply ``limits`` to an already-parsed document, without recursion.

    Shared sub-objects are counted at every place they appear (as aliases expand).

    Raises:
        SpecError: the first limit crossed, as ``source: path: message``.
    """
    nodes = 0
    stack: list[tuple[object, str, int]] = [(doc, "", 0)]
    while stack:
        node, path, depth = stack.pop()
        nodes += 1
        where = path or "(root)"
        if nodes > limits.max_nodes:
            _fail(source, where, f"more than {limits.max_nodes} values in the document")
        if isinstance(node, dict | list):
            if depth + 1 > limits.max_depth:
                _fail(source, where, f"nested deeper than {limits.max_depth} levels")
            if len(node) > limits.max_items:
                _fail(source, where, f"more than {limits.max_items} entries")
            if isinstance(node, dict):
                for key, value in node.items():
                    k = str(key)
                    if len(k) > limits.max_scalar_chars:
                        _fail(source, where, f"a key of {len(k)} characters")
                    stack.append((value, _join(path, k), depth + 1))
            else:
                stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(node))
        elif isinstance(node, str) and len(node) > limits.max_scalar_chars:
            _fail(
                source,
                where,
                f"a value of {len(node)} characters (limit {limits.max_scalar_chars}); put "
                "large content in a file the spec names",
            )


def _part(parent: object, index: object) -> str:
    """The path step to a node being composed: ``[3]``, ``.key``, or ``.(key)``."""
    if isinstance(index, int):
        return f"[{index}]"
    if isinstance(index, yaml.nodes.ScalarNode):
        key = str(index.value)[:80]
        return f".{key}" if key.isidentifier() else _join("", key)
    return "" if parent is None else ".(key)"


def _fail(source: str, where: str, message: str) -> None:
    raise SpecError(f"{source}: invalid spec", [f"{where}: {message}"])


def _join(path: str, key: str) -> str:
    if key.isidentifier():
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)[:80]}]"
