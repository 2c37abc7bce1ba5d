"""ShareGPT rows, rows that almost match a format, byte-order marks and broken encodings.

The ShareGPT tests train nothing: they format rows on the tiny model's real tokenizer and
decode exactly the tokens that carry loss, so they fail if a ShareGPT answer is masked or a
prompt trains. The near-miss table pins the exact ``dataset`` mapping each error suggests;
each suggestion is then applied and must read the same row.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from runner.errors import DataError
from runner.spec.model import DatasetSpec
from runner.train.data_formats import reads_as_sharegpt, suggest_layout
from runner.train.dataset import Row, load_rows
from runner.train.formatting import format_rows, resolve_chat_template
from runner.train.preflight import preflight


def _spec(**kw: Any) -> DatasetSpec:
    return DatasetSpec.model_validate({"sources": ["unused.jsonl"], **kw})


def _rows(*records: dict[str, Any]) -> list[Row]:
    return [Row(f"dataset.sources[0]: row {n}", r) for n, r in enumerate(records, start=1)]


def _format(tok: Any, spec: DatasetSpec, *records: dict[str, Any]) -> list[Any]:
    return format_rows(_rows(*records), spec, tok, resolve_chat_template(spec, tok))


def _loss_text(tok: Any, spec: DatasetSpec, *records: dict[str, Any]) -> list[str]:
    examples, _ = preflight(_format(tok, spec, *records), tok, 256)
    return [
        tok.decode([i for i, m in zip(e.input_ids, e.completion_mask, strict=True) if m])
        for e in examples
    ]


SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "be brief"},
        {"from": "human", "value": "opposite of hot?"},
        {"from": "gpt", "value": "cold"},
        {"from": "human", "value": "and of up?"},
        {"from": "gpt", "value": "down"},
    ]
}
MESSAGES = {
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "opposite of hot?"},
        {"role": "assistant", "content": "cold"},
        {"role": "user", "content": "and of up?"},
        {"role": "assistant", "content": "down"},
    ]
}


@pytest.mark.parametrize(
    ("kw", "record"),
    [
        pytest.param({"format": "sharegpt"}, SHAREGPT, id="format-sharegpt"),
        pytest.param({}, SHAREGPT, id="auto-detected-under-default-messages"),
        pytest.param(
            {"format": "sharegpt", "fields": {"conversations": "chat"}},
            {"chat": SHAREGPT["conversations"]},
            id="renamed-column",
        ),
        pytest.param(
            {"format": "sharegpt"},
            {
                "conversations": [
                    {"from": "user", "value": "hi"},
                    {"from": "assistant", "value": "yo"},
                ]
            },
            id="role-names-as-from",
        ),
    ],
)
def test_sharegpt_trains_like_the_same_messages(
    tiny_tokenizer: Any, kw: dict[str, Any], record: dict[str, Any]
) -> None:
    turns = next(iter(record.values()))
    roles = {"system": "system", "human": "user", "user": "user", "gpt": "assistant"}
    equivalent = {
        "messages": [
            {"role": roles.get(t["from"], t["from"]), "content": t["value"]} for t in turns
        ]
    }
    ours = _format(tiny_tokenizer, _spec(**kw), record)[0]
    reference = _format(tiny_tokenizer, _spec(), equivalent)[0]
    assert (ours.text, ours.loss_spans) == (reference.text, reference.loss_spans)
    assert "<|assistant|>" in ours.text


def test_sharegpt_loss_is_on_the_gpt_turns_only(tiny_tokenizer: Any) -> None:
    assert _loss_text(tiny_tokenizer, _spec(), SHAREGPT) == ["cold<|end|>down<|end|>"]


def test_auto_detection_needs_the_default_layout() -> None:
    assert reads_as_sharegpt(SHAREGPT, _spec())
    assert not reads_as_sharegpt(MESSAGES, _spec())
    # A user who named the messages column, or another format, gets exactly what they asked.
    assert not reads_as_sharegpt(SHAREGPT, _spec(fields={"messages": "conversations"}))
    assert not reads_as_sharegpt(SHAREGPT, _spec(format="alpaca"))
    # conversations in the role/content layout are not ShareGPT
    roles = {"conversations": MESSAGES["messages"]}
    assert not reads_as_sharegpt(roles, _spec())


@pytest.mark.parametrize(
    ("kw", "record", "message"),
    [
        pytest.param(
            {"format": "sharegpt"},
            {"conversations": [{"from": "robot", "value": "x"}]},
            r"row 1: conversations\[0\]: 'from' must be one of system, human, user, gpt",
            id="unknown-speaker",
        ),
        pytest.param(
            {"format": "sharegpt"},
            {"conversations": [{"from": "human", "value": 3}]},
            r"row 1: conversations\[0\]: 'value' must be a string",
            id="value-not-text",
        ),
        pytest.param(
            {"format": "sharegpt"},
            {"conversations": [{"from": "human", "value": "hi"}]},
            r"row 1: no assistant message",
            id="no-gpt-turn",
        ),
        pytest.param(
            {"format": "sharegpt"},
            {"conversations": MESSAGES["messages"]},
            r"conversations\[0\]: has 'role'/'content' keys, which is the messages layout; use "
            r"dataset: \{format: messages, fields: \{messages: conversations\}\}",
            id="role-content-under-sharegpt",
        ),
    ],
)
def test_bad_sharegpt_rows_are_named(
    tiny_tokenizer: Any, kw: dict[str, Any], record: dict[str, Any], message: str
) -> None:
    with pytest.raises(DataError, match=message):
        _format(tiny_tokenizer, _spec(**kw), record)


# Each row lacks the column its spec's format needs; the error must name the mapping that reads it.
NEAR_MISSES = [
    pytest.param(
        {},
        {"messages": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        "dataset: {format: sharegpt, fields: {conversations: messages}}",
        id="messages-with-from-value",
    ),
    pytest.param(
        {},
        {"dialog": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        "dataset: {format: messages, fields: {messages: dialog}}",
        id="messages-under-another-name",
    ),
    pytest.param(
        {},
        {"chat": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        "dataset: {format: sharegpt, fields: {conversations: chat}}",
        id="sharegpt-under-another-name",
    ),
    pytest.param(
        {"format": "alpaca"},
        {"prompt": "Say hi.", "response": "hi"},
        "dataset: {format: alpaca, fields: {instruction: prompt, output: response}}",
        id="alpaca-with-prompt-response",
    ),
    pytest.param(
        {"format": "alpaca"},
        {"instruction": "Translate.", "context": "Hallo", "response": "Hello"},
        "dataset: {format: alpaca, fields: {output: response, input: context}}",
        id="alpaca-dolly-columns",
    ),
    pytest.param(
        {"format": "prompt-completion"},
        {"question": "2+2?", "answer": "4"},
        "dataset: {format: prompt-completion, fields: {prompt: question, completion: answer}}",
        id="question-answer",
    ),
    pytest.param(
        {},
        {"question": "2+2?", "answer": "4"},
        "dataset: {format: prompt-completion, fields: {prompt: question, completion: answer}}",
        id="question-answer-under-default-messages",
    ),
    pytest.param(
        {},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        "dataset: {format: alpaca}",
        id="alpaca-under-default-messages",
    ),
    pytest.param(
        {"format": "prompt-completion"},
        {"prompt": "2+2=", "response": "4"},
        "dataset: {format: prompt-completion, fields: {completion: response}}",
        id="prompt-response",
    ),
    pytest.param(
        {"format": "text", "train_on": "all"},
        {"content": "free text"},
        "dataset: {format: text, fields: {text: content}, train_on: all}",
        id="text-under-content",
    ),
]


@pytest.mark.parametrize(("kw", "record", "suggestion"), NEAR_MISSES)
def test_near_misses_name_the_format_and_mapping(
    tiny_tokenizer: Any, kw: dict[str, Any], record: dict[str, Any], suggestion: str
) -> None:
    with pytest.raises(DataError, match=re.escape(suggestion)) as caught:
        _format(tiny_tokenizer, _spec(**kw), record)
    assert caught.value.message.startswith("dataset.sources[0]: row 1: ")
    # Following the advice reads the row.
    advice = json.loads(_flow_to_json(suggestion.removeprefix("dataset: ")))
    formatted = _format(tiny_tokenizer, _spec(**advice), record)
    assert formatted[0].loss_spans, "the suggested mapping finds something to learn"


def _flow_to_json(flow: str) -> str:
    # "{format: alpaca, fields: {instruction: prompt}}" -> JSON (the hints use bare words only)
    return re.sub(r"([A-Za-z_][\w-]*)", r'"\1"', flow)


def test_nothing_recognisable_gets_no_guess() -> None:
    assert suggest_layout({"id": 3, "label": 1}, _spec()) is None


# --- bytes on disk -------------------------------------------------------------------------

BOM = b"\xef\xbb\xbf"
ROW = {"prompt": "2+2=", "completion": "4"}


@pytest.mark.parametrize(
    ("name", "content"),
    [
        pytest.param("d.jsonl", BOM + (json.dumps(ROW) + "\n").encode() * 2, id="jsonl"),
        pytest.param("d.json", BOM + json.dumps([ROW, ROW]).encode(), id="json"),
        pytest.param("d.json", BOM + (json.dumps(ROW) + "\n").encode() * 2, id="jsonl-as-json"),
        pytest.param("d.jsonl", BOM + (json.dumps(ROW) + "\r\n").encode() * 2, id="jsonl-crlf"),
    ],
)
def test_a_byte_order_mark_is_tolerated(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    spec = DatasetSpec(sources=[str(path)], format="prompt-completion")
    assert [r.data for r in load_rows(spec, None, seed=0).train] == [ROW, ROW]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(
            b'{"text": "a"}\n\n{"text": "b\xff"}\n',
            r"d.jsonl: row 2 \(line 3\): not valid UTF-8 \(byte 0xff at column 12\); re-save",
            id="bad-byte-in-row-2",
        ),
        pytest.param(
            b'{"text": "\xc3"}\n',
            r"d.jsonl: row 1 \(line 1\): not valid UTF-8 \(byte 0xc3",
            id="truncated-sequence",
        ),
        pytest.param(b"\xff\xfe{\x00", r"d.jsonl: the file is UTF-16", id="utf-16"),
        pytest.param(
            b'{"text": ' + b"[" * 5000 + b"]" * 5000 + b"}\n",
            r"row 1 \(line 1\): invalid JSON",
            id="nested",
        ),
        pytest.param(
            b'{"text": ' + b"1" * 5000 + b"}\n", r"row 1 \(line 1\): invalid JSON", id="huge-int"
        ),
    ],
)
def test_undecodable_data_names_file_row_and_line(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    spec = DatasetSpec(sources=[str(path)], format="text", train_on="all")
    with pytest.raises(DataError, match=r"^dataset.sources\[0\]: .*" + message):
        load_rows(spec, None, seed=0)


def test_line_separators_inside_json_strings_do_not_split_rows(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    text = "a\u2028b\u0085c"
    path.write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n", encoding="utf-8")
    spec = DatasetSpec(sources=[str(path)], format="text", train_on="all")
    assert [r.data["text"] for r in load_rows(spec, None, seed=0).train] == [text]


def test_an_unpaired_surrogate_is_a_data_error(tiny_tokenizer: Any) -> None:
    record = json.loads('{"prompt": "a\\ud800", "completion": "b"}')
    with pytest.raises(DataError, match=r"row 1: contains an unpaired surrogate \(\\ud800\)"):
        _format(tiny_tokenizer, _spec(format="prompt-completion"), record)
