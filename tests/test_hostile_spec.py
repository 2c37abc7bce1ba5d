"""Hostile and careless spec documents: every one is exit 2, fast, small, and never a traceback.

Hypothesis builds the documents an attacker or a careless user would write: YAML alias bombs,
deep nesting, huge values and collections, lax-typed booleans (``"yes"``, ``on``, ``1``, the
string ``"true"``), files past the size limit and bad encodings (invalid UTF-8, UTF-16). Each
goes through the real loader in-process (``qlora validate`` and the library entry point) with
a one-second budget, and a handful through real ``qlora validate/plan/render`` processes with
their wall time and peak RSS measured by ``os.wait4``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.cli import main
from runner.errors import SpecError
from runner.spec import load_spec, load_spec_text
from runner.spec.bounds import DEFAULT_LIMITS, check_document
from tests.conftest import REPO
from tests.qlora_child import run_qlora_batch

BASE_TEXT = (REPO / "examples" / "tiny-cpu.yaml").read_text(encoding="utf-8")
BASE = yaml.safe_load(BASE_TEXT)
BUDGET_S = 1.0
"""CPU seconds one hostile document may cost in-process (CPU time, not wall time: the CI box is
shared, and what is bounded is the work the document causes)."""
PEAK_BYTES = 32 * 1024 * 1024
"""Python memory one hostile document may cost while it is rejected, beyond 8 bytes per
character of its own text (the str and its parse)."""
HOSTILE = settings(
    max_examples=25,
    deadline=None,  # timed by the test itself, with its own budget
    derandomize=True,  # the same documents on every CI run
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def with_body(extra: str) -> str:
    """The valid tiny spec with ``extra`` YAML lines appended under ``spec.dataset``."""
    return BASE_TEXT.replace("    format: messages\n", f"    format: messages\n{extra}")


def alias_bomb(levels: int, fan: int) -> str:
    lines = ['a0: &a0 ["lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * fan) + "]")
    return BASE_TEXT + "\n".join(lines) + "\n"


def deep(depth: int, style: str) -> str:
    if style == "flow-list":
        inner = "[" * depth + "]" * depth
    elif style == "flow-map":
        inner = "{a: " * depth + "1" + "}" * depth
    else:  # block mappings, each level indented
        return BASE_TEXT + "".join("  " * i + "k:\n" for i in range(depth)) + "  " * depth + "1\n"
    return BASE_TEXT.replace("  metrics:\n", f"  deep: {inner}\n  metrics:\n")


def huge_scalar(size: int, where: str) -> str:
    value = "x" * size
    if where == "key":
        return with_body(f"    {value}: 1\n")
    if where == "source":
        return BASE_TEXT.replace(".qlora-work/models/tiny-llama", value)
    return with_body(f"    chat_template: {value}\n")


def huge_collection(n: int, kind: str) -> str:
    if kind == "sources":
        items = ", ".join(f"s{i}.jsonl" for i in range(n))
        return BASE_TEXT.replace("[examples/data/antonyms-chat.jsonl]", f"[{items}]")
    keys = ", ".join(f"k{i}: v" for i in range(n))
    return BASE_TEXT.replace("  name: tiny-demo\n", f"  name: tiny-demo\n  labels: {{{keys}}}\n")


BOOL_FIELDS = [
    ("model", "trust_remote_code"),
    ("lora", "use_rslora"),
    ("quantization", "double_quant"),
    ("training", "packing"),
    ("training", "gradient_checkpointing"),
    ("metrics", "enabled"),
]
LAX_BOOLS = ['"yes"', "yes", "on", "On", "y", "1", "0", '"true"', "'True'", "off", '"false"', "1.0"]


def lax_bool(field: tuple[str, str], value: str) -> str:
    section, name = field
    line = re.compile(rf"^    {name}: .*$", re.MULTILINE)
    if line.search(BASE_TEXT):  # already set in the base spec: change it there
        return line.sub(f"    {name}: {value}", BASE_TEXT, count=1)
    return BASE_TEXT.replace(f"  {section}:\n", f"  {section}:\n    {name}: {value}\n", 1)


alias_bombs = st.builds(alias_bomb, st.integers(4, 12), st.integers(6, 16))
deep_docs = st.builds(
    deep,
    st.integers(DEFAULT_LIMITS.max_depth + 1, 3000),
    st.sampled_from(["flow-list", "flow-map"]),
) | st.builds(deep, st.integers(DEFAULT_LIMITS.max_depth + 1, 400), st.just("block"))
huge_scalars = st.builds(
    huge_scalar,
    st.integers(DEFAULT_LIMITS.max_scalar_chars + 1, 900_000),
    st.sampled_from(["key", "source", "template"]),
)
huge_collections = st.builds(
    huge_collection,
    st.integers(DEFAULT_LIMITS.max_items + 1, 60_000),
    st.sampled_from(["sources", "labels"]),
)
lax_bools = st.builds(lax_bool, st.sampled_from(BOOL_FIELDS), st.sampled_from(LAX_BOOLS))
hostile_texts = alias_bombs | deep_docs | huge_scalars | huge_collections | lax_bools


def assert_rejected_fast(text: str) -> SpecError:
    started = time.process_time()
    with pytest.raises(SpecError) as caught:
        load_spec_text(text, source="hostile.yaml")
    took = time.process_time() - started
    assert took < BUDGET_S, f"took {took:.2f} s"
    assert caught.value.exit_code == 2
    # Again, under tracemalloc (slower, so not timed): what the rejection allocates is bounded
    # by the limits, not by what the document would expand to.
    tracemalloc.start()
    try:
        with pytest.raises(SpecError):
            load_spec_text(text, source="hostile.yaml")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < PEAK_BYTES + 8 * len(text), f"peak {peak / 2**20:.1f} MiB"
    for line in caught.value.lines():
        assert "\n" not in line and len(line) < 2000, line[:200]
    return caught.value


@HOSTILE
@given(hostile_texts)
def test_hostile_documents_are_invalid_input_within_a_second(text: str) -> None:
    assert_rejected_fast(text)


@HOSTILE
@given(text=hostile_texts)
def test_qlora_validate_exits_2_with_path_message_and_no_traceback(
    text: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("hostile") / "job.yaml"
    data = text.encode("utf-8")
    if len(data) > DEFAULT_LIMITS.max_bytes:
        data = data[: DEFAULT_LIMITS.max_bytes + 10]  # still over the limit
    path.write_bytes(data)
    started = time.process_time()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["validate", str(path)])
    took = time.process_time() - started
    assert rc == 2, err.getvalue()[-2000:]
    assert took < BUDGET_S, f"took {took:.2f} s"
    out = err.getvalue()
    assert "Traceback" not in out and "internal error" not in out
    assert out.startswith("error: "), out[:300]
    assert len(out.splitlines()) >= 1


@pytest.mark.parametrize(("field", "value"), [(f, v) for f in BOOL_FIELDS for v in LAX_BOOLS])
def test_only_a_literal_boolean_is_a_boolean(field: tuple[str, str], value: str) -> None:
    err = assert_rejected_fast(lax_bool(field, value))
    section, name = field
    assert any(
        line.startswith(f"spec.{section}.{name}: must be true or false") for line in err.details
    ), err.lines()


@pytest.mark.parametrize("value", ["true", "True", "TRUE"])
def test_a_literal_true_turns_remote_code_on(value: str) -> None:
    spec = load_spec_text(lax_bool(("model", "trust_remote_code"), value))
    assert spec.spec.model.trust_remote_code is True
    assert load_spec_text(BASE_TEXT).spec.model.trust_remote_code is False


def test_yaml_12_numbers_and_strings() -> None:
    text = BASE_TEXT.replace("learning_rate: 0.02", "learning_rate: 2e-4").replace(
        "  name: tiny-demo\n", "  name: tiny-demo\n  labels: {team: yes, tier: on}\n"
    )
    spec = load_spec_text(text)
    assert spec.spec.training.learning_rate == pytest.approx(2e-4)
    assert spec.metadata.labels == {"team": "yes", "tier": "on"}  # strings, as YAML 1.2 reads


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("r", "true", "must be a whole number"),
        ("r", '"16"', "must be a whole number"),
        ("r", "16.0", "must be a whole number"),
        ("dropout", "true", "must be a number, not a boolean"),
        ("dropout", ".nan", "must be a finite number"),
        ("target_modules", "[q_proj, q_proj]", "'q_proj' is listed more than once"),
        ("target_modules", "[" + ", ".join(f"m{i}" for i in range(65)) + "]", "at most 64"),
    ],
)
def test_lax_numbers_and_duplicate_modules(field: str, value: str, message: str) -> None:
    if field == "r":
        text = BASE_TEXT.replace("    r: 16\n", f"    r: {value}\n")
    else:
        text = BASE_TEXT.replace("    r: 16\n", f"    r: 16\n    {field}: {value}\n")
    err = assert_rejected_fast(text)
    prefix = f"spec.lora.{field}: "
    assert any(line.startswith(prefix) and message in line for line in err.details), err.lines()


def test_the_alias_bomb_from_the_issue_stops_at_the_node_limit() -> None:
    err = assert_rejected_fast(alias_bomb(9, 10))
    assert any("values (after expanding aliases)" in line for line in err.lines()), err.lines()


def test_a_duplicate_key_is_an_error_not_the_last_one_wins() -> None:
    text = BASE_TEXT.replace("  model:\n", "  model:\n    trust_remote_code: false\n").replace(
        "  lora:\n", "  lora:\n    r: 8\n"
    )
    text = text.replace("    r: 8\n", "    r: 8\n").replace(
        "    source: .qlora", "    trust_remote_code: true\n    source: .qlora"
    )
    err = assert_rejected_fast(text)
    assert "duplicate key 'trust_remote_code'" in err.message, err.lines()


def test_a_few_harmless_aliases_are_fine() -> None:
    text = BASE_TEXT.replace("  lora:\n", "  lora: &lora\n").replace(
        "  quantization:\n", "  x-copy: *lora\n  quantization:\n"
    )
    err = assert_rejected_fast(text)  # the alias itself is fine; the unknown key is not
    assert any(line.startswith("spec.x-copy: unknown field") for line in err.details), err.lines()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (BASE_TEXT.encode("utf-16"), "UTF-16 or UTF-32"),
        (BASE_TEXT.encode("utf-16-le"), "UTF-16 or UTF-32"),
        (BASE_TEXT.encode("utf-32"), "UTF-16 or UTF-32"),
        (BASE_TEXT.encode() + b"\n# \xff\xfe\n", "not valid UTF-8 at byte"),
        (BASE_TEXT.encode().replace(b"tiny-demo\n", b"tiny-\xc3\x28demo\n", 1), "not valid UTF-8"),
        (b"\xed\xa0\x80: 1\n", "not valid UTF-8"),
        (b"# pad\n" * (DEFAULT_LIMITS.max_bytes // 6 + 1), "the limit is 1048576 bytes"),
    ],
    ids=["utf16-bom", "utf16-le", "utf32", "stray-bytes", "bad-sequence", "surrogate", "too-big"],
)
def test_bad_encodings_and_sizes(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "job.yaml"
    path.write_bytes(data)
    started = time.process_time()
    with pytest.raises(SpecError, match=message) as caught:
        load_spec(path)
    assert time.process_time() - started < BUDGET_S
    assert caught.value.exit_code == 2


def test_a_utf8_bom_is_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + BASE_TEXT.encode())
    assert load_spec(path).metadata.name == "tiny-demo"


def test_a_fifo_or_directory_is_not_read(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    with pytest.raises(SpecError, match="not a regular file"):
        load_spec(fifo)
    with pytest.raises(SpecError, match="directory"):
        load_spec(tmp_path)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"spec": {"a": "x" * (DEFAULT_LIMITS.max_scalar_chars + 1)}}, "spec.a: a value of"),
        (
            {"spec": {"sources": list(range(DEFAULT_LIMITS.max_items + 1))}},
            "more than 1000 entries",
        ),
        ("nested", "nested deeper than 32 levels"),
        ({"k": [[0] * 900] * 20}, "more than 10000 values"),
    ],
    ids=["scalar", "items", "depth", "shared-subtrees"],
)
def test_an_api_object_is_held_to_the_same_bounds(doc: object, message: str) -> None:
    if doc == "nested":
        doc = {}
        node = doc
        for _ in range(50_000):  # far past the recursion limit: the walk is iterative
            node["a"] = {}
            node = node["a"]
    with pytest.raises(SpecError) as caught:
        check_document(doc, "finetunejob ns/x")
    assert any(message in line for line in caught.value.lines()), caught.value.lines()


def test_the_secret_scan_stays_linear_on_hostile_values() -> None:
    nasty = [
        "a." * 30_000 + "://",
        "Bearer " + " " * 60_000,
        "s3://" + "a:" * 30_000,
        "-----BEGIN " + "A " * 30_000,
    ]
    for value in nasty:
        doc = yaml.safe_load(BASE_TEXT)
        doc["spec"]["dataset"]["chat_template"] = value[: DEFAULT_LIMITS.max_scalar_chars]
        text = yaml.safe_dump(doc, width=10**9)
        started = time.process_time()
        load_spec_text(text)  # valid: long, but no secret in it, and scanned in linear time
        assert time.process_time() - started < BUDGET_S


# -- real processes: wall time and peak memory ----------------------------------------------


# The child reports its own peak RSS (VmHWM, which starts afresh at exec); the rusage of a
# forked child would include the pages it shared with this big pytest process before exec.
_MEASURED = (
    "import atexit, os, sys\n"
    "def _hwm():\n"
    "    with open('/proc/self/status') as f, open(os.environ['QLORA_TEST_HWM'], 'w') as out:\n"
    "        out.write(next(l for l in f if l.startswith('VmHWM')).split()[1])\n"
    "atexit.register(_hwm)\n"
    "from runner.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def run_measured(argv: list[str], cwd: Path) -> tuple[int, str, float, float]:
    """Run ``qlora ARGV``; return (exit code, stderr, wall seconds, peak RSS MiB) of that child."""
    hwm = cwd / "hwm"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", _MEASURED, *argv],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "QLORA_WORK_DIR": str(cwd / "work"), "QLORA_TEST_HWM": str(hwm)},
        check=False,
        timeout=120,
    )
    took = time.monotonic() - started
    rss_mib = int(hwm.read_text()) / 1024  # kB
    return done.returncode, done.stderr.decode("utf-8", "replace"), took, rss_mib


HOSTILE_FILES = {
    "alias-bomb": alias_bomb(9, 10),
    "deep": deep(3000, "flow-list"),
    "huge-file": BASE_TEXT + "# " + "x" * (40 * 1024 * 1024) + "\n",
}


@pytest.mark.timeout(180)
def test_real_commands_reject_hostile_files_in_under_a_second_each(tmp_path: Path) -> None:
    # validate, plan, render and submit (no cluster: the spec fails before any connection) on
    # each file, all in one child interpreter: each command's own CPU time is under a second
    # and the child's peak RSS bounds them all.
    runs = []
    for case, text in HOSTILE_FILES.items():
        path = tmp_path / case / "job.yaml"
        path.parent.mkdir()
        path.write_text(text, encoding="utf-8")
        for command in ("validate", "plan", "render", "submit"):
            runs.append(([command, str(path)], tmp_path / case / command))
    for (argv, _), result in zip(runs, run_qlora_batch(runs, limit_s=150), strict=True):
        assert result.rc == 2, (argv, result.stderr[-2000:])
        err = result.stderr
        assert "Traceback" not in err and "internal error" not in err, err[-2000:]
        assert any(line.startswith("error: ") for line in err.splitlines()), err[:500]
        assert result.cpu_s < BUDGET_S, (argv, result.cpu_s)
        assert result.max_rss_bytes < 256 * 1024**2, (argv, result.max_rss_bytes)


@pytest.mark.timeout(180)
def test_qlora_run_rejects_the_alias_bomb_quickly_and_small(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(HOSTILE_FILES["alias-bomb"], encoding="utf-8")
    rc, err, took, rss_mib = run_measured(["run", "--spec", str(path)], tmp_path)
    assert rc == 2, err[-2000:]
    assert "Traceback" not in err and "internal error" not in err, err[-2000:]
    assert "values (after expanding aliases)" in err, err[-2000:]
    assert took < 60, took  # process start-up (torch) on a shared 2-core box
    assert rss_mib < 1024, rss_mib


@pytest.mark.parametrize(
    "text",
    [alias_bomb(9, 10), deep(200, "block"), huge_collection(2000, "sources"), BASE_TEXT],
    ids=["bomb", "deep", "items", "valid"],
)
def test_the_pure_python_parser_keeps_the_same_bounds(
    text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runner.spec import bounds

    def outcome() -> str:
        try:
            return repr(bounds.parse_yaml(text, "x.yaml"))
        except SpecError as e:
            return "\n".join(e.lines())

    fast = outcome()
    monkeypatch.setattr(bounds, "_FastParser", None)  # PyYAML built without libyaml
    assert outcome() == fast
