"""Data reading, formatting and the completion mask, on the tiny model's real tokenizer.

The mask tests decode exactly the tokens that carry loss, so they fail if a prompt token ever
trains or an answer token does not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from runner.errors import DataError, SpecError
from runner.spec.model import DatasetSpec
from runner.train.dataset import Row, load_rows, split_rows
from runner.train.formatting import format_rows, resolve_chat_template
from runner.train.preflight import preflight


def _spec(**kw: Any) -> DatasetSpec:
    return DatasetSpec.model_validate({"sources": ["unused.jsonl"], **kw})


def _rows(*records: dict[str, Any]) -> list[Row]:
    return [Row(f"dataset.sources[0]: row {n}", r) for n, r in enumerate(records, start=1)]


def _loss_text(tok: Any, rows: list[Row], spec: DatasetSpec, max_len: int = 256) -> list[str]:
    template = resolve_chat_template(spec, tok)
    examples, _ = preflight(format_rows(rows, spec, tok, template), tok, max_len)
    return [
        tok.decode([i for i, m in zip(e.input_ids, e.completion_mask, strict=True) if m])
        for e in examples
    ]


CHAT = {
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "opposite of hot?"},
        {"role": "assistant", "content": "cold"},
        {"role": "user", "content": "and of up?"},
        {"role": "assistant", "content": "down"},
    ]
}


@pytest.mark.parametrize(
    ("kw", "record", "expected"),
    [
        pytest.param({}, CHAT, "cold<|end|>down<|end|>", id="messages-every-assistant-turn"),
        pytest.param(
            {"format": "alpaca"},
            {"instruction": "Opposite.", "input": "hot", "output": "cold"},
            "cold<|end|>",
            id="alpaca-with-input",
        ),
        pytest.param(
            {"format": "alpaca"},
            {"instruction": "Say hi.", "output": "hi"},
            "hi<|end|>",
            id="alpaca-without-input",
        ),
        pytest.param(
            {"format": "prompt-completion"},
            {"prompt": "2+2=", "completion": "4"},
            "4<|end|>",
            id="prompt-completion",
        ),
        pytest.param(
            {"format": "prompt-completion", "fields": {"prompt": "q", "completion": "a"}},
            {"q": "2+2=", "a": "4"},
            "4<|end|>",
            id="field-mapping",
        ),
        pytest.param(
            {"format": "text", "train_on": "all"},
            {"text": "free text"},
            "free text<|end|>",
            id="text-all",
        ),
        pytest.param(
            {"format": "prompt-completion", "train_on": "all"},
            {"prompt": "2+2=", "completion": "4"},
            "2+2=4<|end|>",
            id="train-on-all",
        ),
    ],
)
def test_loss_tokens_are_exactly_the_answer(
    tiny_tokenizer: Any, kw: dict[str, Any], record: dict[str, Any], expected: str
) -> None:
    assert _loss_text(tiny_tokenizer, _rows(record), _spec(**kw)) == [expected]


def test_named_chat_template_overrides_the_tokenizers(tiny_tokenizer: Any) -> None:
    spec = _spec(chat_template="chatml")
    rows = format_rows(
        _rows(CHAT), spec, tiny_tokenizer, resolve_chat_template(spec, tiny_tokenizer)
    )
    assert rows[0].text.startswith("<|im_start|>system\nbe brief<|im_end|>")
    assert _loss_text(tiny_tokenizer, _rows(CHAT), spec) == ["cold<|im_end|>\ndown<|im_end|>\n"]


def test_template_that_rewrites_earlier_turns_is_refused(tiny_tokenizer: Any) -> None:
    # renders the final assistant turn differently, so earlier prefixes are not prefixes
    template = (
        "{% for m in messages %}{% if loop.last %}[last]{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    spec = _spec(chat_template=template)
    with pytest.raises(DataError, match=r"row 1: the chat template does not render turn 2"):
        format_rows(_rows(CHAT), spec, tiny_tokenizer, resolve_chat_template(spec, tiny_tokenizer))


def test_unknown_chat_template_names_the_choices(tiny_tokenizer: Any) -> None:
    with pytest.raises(SpecError, match=r"dataset.chat_template: unknown template 'nope'.*chatml"):
        resolve_chat_template(_spec(chat_template="nope"), tiny_tokenizer)


@pytest.mark.parametrize(
    ("kw", "records", "message"),
    [
        pytest.param(
            {"format": "prompt-completion"},
            [{"prompt": "a", "completion": "b"}, {"prompt": "a"}],
            r"^dataset.sources\[0\]: row 2: missing field 'completion' \(the row has 'prompt'\)$",
            id="missing-field",
        ),
        pytest.param(
            {"format": "prompt-completion"},
            [{"prompt": "a", "completion": 3}],
            r"row 1: field 'completion' must be a string, got int",
            id="wrong-type",
        ),
        pytest.param(
            {"format": "alpaca"},
            [{"instruction": "x", "output": "  "}],
            r"row 1: field 'output' is empty",
            id="empty-answer",
        ),
        pytest.param(
            {},
            [CHAT, {"messages": [{"role": "robot", "content": "x"}]}],
            r"row 2: messages\[0\]: role must be one of .*got 'robot'",
            id="bad-role",
        ),
        pytest.param(
            {},
            [{"messages": [{"role": "user", "content": "hi"}]}],
            r"row 1: no assistant message",
            id="no-assistant-turn",
        ),
        pytest.param(
            {}, [{"messages": []}], r"row 1: field 'messages' must be a non-empty list", id="empty"
        ),
        pytest.param(
            {},
            [{"messages": [{"role": "user", "content": ["x"]}]}],
            r"row 1: messages\[0\]: 'content' must be a string",
            id="content-not-string",
        ),
        pytest.param(
            {"format": "text", "train_on": "all"},
            [{"body": "x"}],
            r"missing field 'text'",
            id="text",
        ),
    ],
)
def test_malformed_rows_are_named(
    tiny_tokenizer: Any, kw: dict[str, Any], records: list[dict[str, Any]], message: str
) -> None:
    spec = _spec(**kw)
    with pytest.raises(DataError, match=message):
        format_rows(
            _rows(*records), spec, tiny_tokenizer, resolve_chat_template(spec, tiny_tokenizer)
        )


def _write(tmp_path: Path, name: str, content: str | bytes) -> str:
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(p)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        pytest.param(
            "d.jsonl", '{"a": 1}\n\n{"a": 2\n', r"row 2 \(line 3\): invalid JSON", id="jsonl"
        ),
        pytest.param(
            "d.jsonl", '{"a": 1}\n[1]\n', r"row 2: expected an object, got list", id="row"
        ),
        pytest.param("d.jsonl", "", r"no rows in .*the training data is empty", id="empty"),
        pytest.param("d.json", '{"a": 1}', r"must be a list of objects", id="json-not-list"),
        pytest.param("d.csv", "a,b", r"unsupported file type", id="suffix"),
        pytest.param("d.jsonl", b"\xff\xfe", r"UTF-16", id="utf-16"),
        pytest.param("d.parquet", b"PAR1garbage", r"not a readable Parquet file", id="parquet"),
    ],
)
def test_unreadable_files_are_data_errors(
    tmp_path: Path, name: str, content: str | bytes, message: str
) -> None:
    spec = DatasetSpec(sources=[_write(tmp_path, name, content)])
    with pytest.raises(DataError, match=r"^dataset.sources(\[0\])?: .*" + message):
        load_rows(spec, None, seed=0)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"dataset.sources\[0\]: .*nope.jsonl: no such file"):
        load_rows(DatasetSpec(sources=[str(tmp_path / "nope.jsonl")]), None, seed=0)


def test_json_parquet_and_jsonl_read_alike(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)]
    jl = _write(tmp_path, "a.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    js = _write(tmp_path, "b.json", json.dumps(records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "c.parquet")
    spec = DatasetSpec(sources=[jl, js, str(tmp_path / "c.parquet")])
    data = load_rows(spec, None, seed=0)
    assert [r.data for r in data.train] == records * 3
    assert data.train[7].where == "dataset.sources[1]: row 3"
    assert [f.rows for f in data.files] == [5, 5, 5]
    assert len(data.fingerprint) == 64


def test_json_lines_saved_as_json_are_read(tmp_path: Path) -> None:
    path = _write(tmp_path, "d.json", '{"text": "a"}\n{"text": "b"}\n')
    data = load_rows(DatasetSpec(sources=[path], format="text", train_on="all"), None, seed=0)
    assert [r.data["text"] for r in data.train] == ["a", "b"]


def test_max_samples_eval_split_and_fingerprint(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "a.jsonl", "".join(json.dumps({"text": str(i)}) + "\n" for i in range(40))
    )
    spec = DatasetSpec(
        sources=[path], format="text", train_on="all", max_samples=20, eval_fraction=0.25
    )
    a, b = load_rows(spec, None, seed=1), load_rows(spec, None, seed=1)
    assert (len(a.train), len(a.eval)) == (15, 5)
    assert a.eval == b.eval, "the split is deterministic for a seed"
    assert {r.data["text"] for r in a.train + a.eval} == {str(i) for i in range(20)}
    assert a.fingerprint == b.fingerprint
    Path(path).write_text(Path(path).read_text() + '{"text": "x"}\n')
    assert load_rows(spec, None, seed=1).fingerprint != a.fingerprint, "content changes it"


@pytest.mark.parametrize(("n", "fraction", "expected"), [(1, 0.3, 0), (2, 0.01, 1), (10, 0.2, 2)])
def test_split_sizes(n: int, fraction: float, expected: int) -> None:
    rows = _rows(*({"i": i} for i in range(n)))
    train, held = split_rows(rows, fraction, seed=0)
    assert (len(train), len(held)) == (n - expected, expected)
