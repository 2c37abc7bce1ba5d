"""Hostile and careless model files, templates and data through a real ``qlora run``.

Every case is the user's own input gone wrong: a ``config.json`` with a string layer count or
a list where an object belongs, a broken tokenizer file, a chat template that loops for ever,
floods its output or pokes at the sandbox, data that is not UTF-8. Each must end the real
entrypoint with exit 2 and a line naming the file, row or field, never exit 1 or a traceback,
in bounded time and memory (measured by the kernel, see ``tests/qlora_child.py``).

The bulk of the generated cases run in process (``tests/test_config_schema.py``,
``tests/test_template_sandbox.py``); the few here are pre-filtered with the same shared checks
and confirm the real command agrees, with its whole import and loading path.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings

from runner.errors import RunnerError, SpecError
from runner.plan.config_schema import check_model_config
from runner.train.template_sandbox import ChatTemplate, TemplateSource
from tests.fixtures.tiny_model import need_train_extra
from tests.qlora_child import DATA, run_qlora, tiny_job
from tests.test_config_schema import BAD_MUTATIONS
from tests.test_template_sandbox import _templates

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

FEW = settings(
    max_examples=3,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.fixture(autouse=True)
def _train_extra() -> None:
    need_train_extra()


def _model_copy(tiny: Path, dest: Path) -> Path:
    model = dest / "model"
    shutil.copytree(tiny, model)
    return model


def _patch_json(path: Path, **changes: Any) -> None:
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc.update(changes)
    path.write_text(json.dumps(doc), encoding="utf-8")


# --- config.json ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        pytest.param(
            {"num_hidden_layers": "2"},
            'config.json: num_hidden_layers: must be an integer, got a string "2"',
            id="string-layer-count",
        ),
        pytest.param(
            {"hidden_size": -64}, "config.json: hidden_size: must be greater than 0", id="negative"
        ),
        pytest.param(
            {"rope_parameters": ["default"]},
            "config.json: rope_parameters: must be an object, got a list",
            id="list-for-object",
        ),
    ],
)
def test_a_bad_config_json_exits_2_naming_the_field(
    tiny_model_dir: Path, tmp_path: Path, changes: dict[str, Any], fragment: str
) -> None:
    model = _model_copy(tiny_model_dir, tmp_path)
    _patch_json(model / "config.json", **changes)
    result = run_qlora(tiny_job(tmp_path, model), tmp_path / "work")
    result.assert_user_error(fragment, str(model / "config.json"))


@FEW
@given(mutation=BAD_MUTATIONS)
def test_generated_bad_configs_exit_2_through_qlora_run(
    tiny_model_dir: Path, mutation: tuple[str, Any]
) -> None:
    field, value = mutation
    config = json.loads((tiny_model_dir / "config.json").read_text(encoding="utf-8"))
    config[field] = value
    with pytest.raises(SpecError):  # the shared check, in process, picks what to send
        check_model_config(config, "config.json")
    with tempfile.TemporaryDirectory() as tmp:
        model = _model_copy(tiny_model_dir, Path(tmp))
        (model / "config.json").write_text(json.dumps(config), encoding="utf-8")
        result = run_qlora(tiny_job(Path(tmp), model), Path(tmp) / "work")
    result.assert_user_error(f"config.json: {field}")


# --- chat templates ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        pytest.param(
            "{% for m in messages %}{{ m.content }}\n"
            "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
            "{% endfor %}",
            "dataset.chat_template: line 2: the chat template does more than",
            id="loops-for-ever",
        ),
        pytest.param(
            "{% for i in range(1000) %}{% for j in range(1000) %}" + "y" * 5000 + "{% endfor %}"
            "{% endfor %}",
            "dataset.chat_template: line 1: the chat template writes more than",
            id="output-flood",
        ),
        pytest.param(
            "{% for m in messages %}\n{{ m.content }\n{% endfor %}",
            "dataset.chat_template: line 2: unexpected '}'",
            id="syntax-error",
        ),
        pytest.param(
            "{{ messages.__class__.__mro__[1].__subclasses__() }}",
            "dataset.chat_template: line 1: the chat template does something the sandbox forbids",
            id="sandbox-escape",
        ),
    ],
)
def test_a_hostile_spec_template_exits_2_naming_the_line(
    tiny_model_dir: Path, tmp_path: Path, template: str, fragment: str
) -> None:
    spec = tiny_job(tmp_path, tiny_model_dir, dataset={"chat_template": template})
    result = run_qlora(spec, tmp_path / "work")
    result.assert_user_error(fragment, wall_s=180)


def test_a_hostile_template_shipped_with_the_model_names_its_file(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    model = _model_copy(tiny_model_dir, tmp_path)
    (model / "chat_template.jinja").write_text(
        "{{ bos_token }}\n{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
        encoding="utf-8",
    )
    result = run_qlora(tiny_job(tmp_path, model), tmp_path / "work")
    result.assert_user_error(
        f"{model / 'chat_template.jinja'}: line 2: the chat template asks for a joined text",
        "dataset.sources[0]: row ",
        wall_s=180,
    )


@FEW
@given(template=_templates)
def test_generated_hostile_templates_exit_2_through_qlora_run(
    tiny_model_dir: Path, tiny_tokenizer: Any, template: str
) -> None:
    # The same renderer, in process, on the run's first row, picks the templates that must fail.
    first_row = json.loads(DATA.read_text(encoding="utf-8").splitlines()[0])["messages"]
    variables = tiny_tokenizer.special_tokens_map
    try:
        ChatTemplate(TemplateSource(template, "dataset.chat_template"), variables).render(
            first_row, add_generation_prompt=False, where="row"
        )
    except RunnerError:
        pass
    else:
        assume(False)
    with tempfile.TemporaryDirectory() as tmp:
        spec = tiny_job(Path(tmp), tiny_model_dir, dataset={"chat_template": template})
        result = run_qlora(spec, Path(tmp) / "work")
    result.assert_user_error("dataset.chat_template", wall_s=180)


# --- tokenizer files and data --------------------------------------------------------------


def test_a_truncated_tokenizer_json_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = _model_copy(tiny_model_dir, tmp_path)
    text = (model / "tokenizer.json").read_text(encoding="utf-8")
    (model / "tokenizer.json").write_text(text[: len(text) // 2], encoding="utf-8")
    result = run_qlora(tiny_job(tmp_path, model), tmp_path / "work")
    result.assert_user_error(f"{model / 'tokenizer.json'}: not valid JSON at line")


def test_a_wrongly_typed_tokenizer_config_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = _model_copy(tiny_model_dir, tmp_path)
    _patch_json(model / "tokenizer_config.json", eos_token=5)
    result = run_qlora(tiny_job(tmp_path, model), tmp_path / "work")
    result.assert_user_error(f"{model / 'tokenizer_config.json'}: eos_token")


def test_invalid_utf8_data_names_file_and_row(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    lines = DATA.read_bytes().splitlines(keepends=True)
    data.write_bytes(b"".join(lines[:2]) + lines[2].replace(b"opposite", b"oppos\xe9te") + b"")
    result = run_qlora(tiny_job(tmp_path, tiny_model_dir, data=data), tmp_path / "work")
    result.assert_user_error(f"{data}: row 3 (line 3): not valid UTF-8 (byte 0xe9")


def test_a_near_miss_layout_gets_the_mapping(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "qa.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"q{i}?", "answer": f"a{i}"}) + "\n" for i in range(4)),
        encoding="utf-8",
    )
    result = run_qlora(
        tiny_job(tmp_path, tiny_model_dir, data=data, dataset={"format": "alpaca"}),
        tmp_path / "work",
    )
    result.assert_user_error(
        "missing field 'instruction' (the row has 'question', 'answer')",
        "use dataset: {format: alpaca, fields: {instruction: question, output: answer}}",
    )
