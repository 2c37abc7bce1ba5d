"""YAML/JSON text → :class:`JobSpec`, with every problem reported at once.

Errors come out as ``path: message`` lines (``spec.training.max_seq_length: ...``) that name
the fix. Unknown keys get a "did you mean" hint. Anything that looks like a credential is
rejected before validation, because specs end up in ConfigMaps, logs and manifests.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from runner.errors import SpecError
from runner.local_files import access_problem
from runner.spec.bounds import (
    DEFAULT_LIMITS,
    check_document,
    check_size,
    decode_text,
    parse_yaml,
)
from runner.spec.model import JobSpec

DEFAULT_SPEC_PATH = "/etc/qlora/job.yaml"
SPEC_PATH_ENV = "QLORA_SPEC"
RUN_SPEC_HINT = f"pass --spec FILE or set ${SPEC_PATH_ENV}"
"""How ``qlora run`` is told its spec (:func:`resolve_spec_path`), for ``load_spec(hint=...)``."""

# Key names and value shapes that mean a secret was pasted into the spec.
_SECRET_KEY_RE = re.compile(
    r"(secret|password|passwd|token|api[_-]?key|access[_-]?key|credential|private[_-]?key)",
    re.IGNORECASE,
)
_SECRET_VALUE_RES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("an AWS access key id", re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("a Hugging Face token", re.compile(r"\bhf_[A-Za-z0-9]{30}")),
    ("a private key", re.compile(r"-----BEGIN [A-Z ]{0,40}PRIVATE KEY-----")),
    # Bounded repeats: every pattern stays linear on a hostile 64 KiB value (runner.spec.bounds).
    (
        "credentials in a URL",
        re.compile(r"\b[a-z][a-z0-9+.-]{0,31}://[^/\s:@]{1,256}:[^/\s@]{1,1024}@"),
    ),
    ("a GitHub token", re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30}")),
    ("a bearer token", re.compile(r"\bBearer\s{1,8}[A-Za-z0-9._~+/-]{20}", re.IGNORECASE)),
)
# Keys whose names look secret-ish but are ordinary spec fields.
_ALLOWED_SECRETISH_KEYS = frozenset({"max_steps"})


def resolve_spec_path(path: str | None) -> str:
    """The spec file to read: the argument, else ``$QLORA_SPEC``, else the container default."""
    return path or os.environ.get(SPEC_PATH_ENV) or DEFAULT_SPEC_PATH


def load_spec(path: str | os.PathLike[str], *, hint: str | None = None) -> JobSpec:
    """Read and validate a spec file.

    Args:
        path: YAML or JSON file.
        hint: How the command at hand takes its spec, added to the error when ``path`` does
            not exist (:data:`RUN_SPEC_HINT` for ``qlora run``; a command that takes the file
            as an argument says so). Commands differ, so the loader names none by default.

    Returns:
        The validated spec.

    Raises:
        SpecError: unreadable file, bad YAML, or any invalid field (all listed in ``details``).
    """
    p = Path(path)
    try:
        # Opened without blocking so a FIFO or device named as the spec cannot hang the read.
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise SpecError(f"{p}: not a regular file; pass the spec file itself")
            check_size(st.st_size, str(p))
            raw = f.read(DEFAULT_LIMITS.max_bytes + 1)  # bounded even if it grows meanwhile
    except FileNotFoundError as e:
        raise SpecError(f"{p}: no such file" + (f"; {hint}" if hint else "")) from e
    except IsADirectoryError as e:
        raise SpecError(f"{p}: is a directory; pass the spec file itself") from e
    except OSError as e:
        raise SpecError(f"{p}: cannot read the spec: {access_problem(e)}") from e
    check_size(len(raw), str(p))
    return load_spec_text(decode_spec_bytes(raw, str(p)), source=str(p))


def decode_spec_bytes(raw: bytes, source: str) -> str:
    """Spec file bytes as text: UTF-8 (a byte-order mark is tolerated), nothing else.

    Raises:
        SpecError: the bytes are UTF-16/32 or not valid UTF-8, naming the byte offset.
    """
    return decode_text(raw, source, "spec")


def load_spec_text(text: str, source: str = "<spec>") -> JobSpec:
    """Validate spec text (YAML or JSON).

    Args:
        text: The document.
        source: Name used in error messages.

    Returns:
        The validated spec.

    Raises:
        SpecError: on any problem; ``details`` lists every ``path: message``.
    """
    doc = parse_yaml(text, source)  # bounded: size, aliases, depth, items (runner.spec.bounds)
    return validate_document(doc, source=source)


def validate_document(doc: object, source: str = "<spec>") -> JobSpec:
    """Validate an already-parsed document (e.g. a FineTuneJob read from the API).

    The document is first held to the same bounds as a parsed file
    (:func:`runner.spec.bounds.check_document`), so nothing below walks an unbounded object.

    Raises:
        SpecError: listing every problem as ``path: message``.
    """
    check_document(doc, source)
    if not isinstance(doc, dict):
        raise SpecError(
            f"{source}: invalid spec",
            [
                f"(root): expected a mapping with apiVersion, kind, metadata, spec; got "
                f"{type(doc).__name__}"
            ],
        )
    problems = list(_find_secrets(doc))
    bad_text = [
        f"{path}: not valid Unicode text (a lone surrogate escape such as \\ud800)"
        for path, key, value in _walk(doc)
        if (isinstance(value, str) and not _is_utf8(value))
        or (key is not None and not _is_utf8(key))
    ]
    if bad_text:  # pydantic cannot even look at such strings: report them alone
        raise SpecError(f"{source}: invalid spec ({len(bad_text)} problem(s))", _one_line(bad_text))
    secret_paths = {p.split(": ", 1)[0] for p in problems}
    try:
        spec = JobSpec.model_validate(doc)
    except ValidationError as e:
        # Never echo a secret back: drop other errors about a path already flagged as one.
        problems.extend(
            line for line in _format_errors(e, doc) if line.split(": ", 1)[0] not in secret_paths
        )
        spec = None
    # One problem per line, whatever the user typed into keys and values.
    problems = _one_line(problems)
    if problems:
        raise SpecError(f"{source}: invalid spec ({len(problems)} problem(s))", problems)
    assert spec is not None
    return spec


def spec_hash(spec: JobSpec) -> str:
    """A stable 64-hex-digit sha256 of the spec's normalised content (defaults filled in).

    ``metadata.labels`` are excluded: relabelling a job does not make it a different job.
    """
    body = {"name": spec.metadata.name, "spec": spec.spec.model_dump(mode="json")}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def dump_spec(spec: JobSpec) -> str:
    """The spec as YAML with defaults filled in, as mounted into the pod."""
    doc = spec.model_dump(mode="json", by_alias=True)
    return yaml.safe_dump(doc, sort_keys=False)


# Messages for the strict types of runner.spec.model, naming the fix.
_STRICT_MESSAGES = {
    "bool_type": "must be true or false, unquoted (a YAML/JSON boolean; 'yes', 'on', 1 and "
    "quoted strings are not booleans)",
    "int_type": "must be a whole number, unquoted (not a string, a boolean or a decimal)",
}

_PLAIN_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def _join(path: str, key: object) -> str:
    """Append a key to a dotted path, quoting keys that are not plain identifiers."""
    k = str(key)
    if not _PLAIN_KEY_RE.fullmatch(k):
        return f"{path}[{json.dumps(k)}]"
    return f"{path}.{k}" if path else k


def _walk(node: object, path: str = "") -> Iterator[tuple[str, str | None, object]]:
    """Yield ``(path, key, value)`` for every value in a nested document, in document order.

    Iterative, so depth costs no stack; the document was bounded by
    :func:`runner.spec.bounds.check_document` before anything walks it.
    """
    stack: list[tuple[str, str | None, object]] = [(path, None, node)]
    first = True
    while stack:
        here, key, value = stack.pop()
        if not first:
            yield here, key, value
        first = False
        children: list[tuple[str, str | None, object]] = []
        if isinstance(value, dict):
            children = [(_join(here, k), str(k), v) for k, v in value.items()]
        elif isinstance(value, list):
            children = [(f"{here}[{i}]", None, v) for i, v in enumerate(value)]
        stack.extend(reversed(children))


def _one_line(problems: list[str]) -> list[str]:
    """One printable line per problem, whatever the user typed into keys and values."""
    return [
        p.replace("\r", "\\r")
        .replace("\n", "\\n")
        .encode("utf-8", "backslashreplace")  # lone surrogates from "\ud800" escapes
        .decode("utf-8")
        for p in problems
    ]


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _find_secrets(doc: dict[str, Any]) -> Iterator[str]:
    hint = (
        "credentials never go in a spec; use the standard AWS environment/files locally or a "
        "Kubernetes Secret in the cluster"
    )
    for path, key, value in _walk(doc):
        if (
            key is not None
            and key not in _ALLOWED_SECRETISH_KEYS
            and _SECRET_KEY_RE.search(key)
            and isinstance(value, str | int | float)
        ):
            yield f"{path}: looks like a secret field; {hint}"
            continue
        if isinstance(value, str):
            for what, pattern in _SECRET_VALUE_RES:
                if pattern.search(value):
                    yield f"{path}: value looks like {what}; {hint}"
                    break


def _format_loc(loc: tuple[int | str, ...], doc: object) -> str:
    """Turn a pydantic location into ``spec.training.max_seq_length`` / ``dataset.sources[0]``.

    Pydantic puts union-member tags (``literal['auto']``, ``int``) and validator names into
    ``loc``; those are dropped when they are not keys of the document.
    """
    out = ""
    node: object = doc
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
            continue
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, dict) and part == "api_version":
            part = "apiVersion"
        elif node is not None and not isinstance(node, dict):
            continue  # a union tag such as 'int' or "literal['auto']"
        elif isinstance(node, dict) and ("[" in part or part in {"int", "float", "str"}):
            continue
        else:
            node = None
        out = _join(out, part)
    return out or "(root)"


def _quote(key: str) -> str:
    return f"'{key}'" if _PLAIN_KEY_RE.fullmatch(key) else json.dumps(key)


def _allowed_keys(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The pydantic model class that owns the mapping at ``loc`` (for "did you mean")."""
    model: type[BaseModel] | None = JobSpec
    for part in loc:
        if model is None or isinstance(part, int):
            continue
        field = model.model_fields.get(part) or next(
            (f for f in model.model_fields.values() if f.alias == part), None
        )
        if field is None:
            return None
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return model


def _format_errors(e: ValidationError, doc: object) -> list[str]:
    lines: list[str] = []
    by_path: dict[str, list[str]] = {}
    for err in e.errors(include_url=False):
        loc = tuple(err["loc"])
        path = _format_loc(loc, doc)
        kind = err["type"]
        if kind == "extra_forbidden":
            key = str(loc[-1])
            parent = _model_at(loc[:-1])
            allowed = _allowed_keys(parent) if parent else []
            close = difflib.get_close_matches(key, allowed, n=1)
            msg = f"unknown field {_quote(key)}"
            if close:
                msg += f"; did you mean '{close[0]}'?"
            elif allowed:
                msg += f"; allowed: {', '.join(allowed)}"
        elif kind == "missing":
            msg = "required field is missing"
        elif kind in _STRICT_MESSAGES:
            msg = _STRICT_MESSAGES[kind]
            if path.endswith("trust_remote_code"):
                msg += "; remote code runs only with trust_remote_code: true"
            got = err.get("input")
            if isinstance(got, str | int | float | bool) and len(repr(got)) < 80:
                msg += f" (got {got!r})"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if "input" in err and kind not in {"value_error", "assertion_error"}:
                got = err["input"]
                if isinstance(got, str | int | float | bool) or got is None:
                    msg += f" (got {got!r})"
        if path in by_path:
            if msg not in by_path[path]:
                by_path[path].append(msg)
        else:
            by_path[path] = [msg]
    # Union fields (e.g. `'auto' | int >= 1`) fail once per member: merge them into one line.
    for path, msgs in by_path.items():
        if len(msgs) > 1:
            got = re.search(r" \(got .*\)$", msgs[-1])
            tail = got.group(0) if got else ""
            msgs = [re.sub(r" \(got .*\)$", "", m) for m in msgs]
            lines.append(f"{path}: {' or '.join(m[0].lower() + m[1:] for m in msgs)}{tail}")
        else:
            lines.append(f"{path}: {msgs[0]}")
    return lines
