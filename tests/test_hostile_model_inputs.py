"""Hostile and careless model files, templates and data through a real ``qlora run``.

Every case is the user's own input gone wrong: a ``config.json`` with a string layer count or
a list where an object belongs, a broken tokenizer file, a chat template that loops for ever,
floods its output or pokes at the sandbox, data that is not UTF-8. Each must end the real
entrypoint with exit 2 and a line naming the file, row or field, never exit 1 or a traceback,
in bounded time and memory (measured by the kernel, see ``tests/qlora_child.py``).

The bulk of the generated cases run in process (``tests/test_config_schema.py``,
``tests/test_template_sandbox.py``); the few here are pre-filtered with the same shared checks
and confirm the real command agrees, with its whole import and loading path.

Every case, fixed and generated, runs in ONE child interpreter
(:func:`tests.qlora_child.run_qlora_batch`): each through the real ``runner.cli.main`` with
its own stdout/stderr, exit code and timing, so each keeps its own assertion; the child's peak
RSS bounds every case. That pays the torch/transformers import once instead of per case (this
file took about 9 minutes of a loaded 2-core box as one process per case).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings

from runner.errors import RunnerError, SpecError
from runner.plan.config_schema import check_model_config
from runner.train.template_sandbox import ChatTemplate, TemplateSource
from tests.fixtures.tiny_model import need_train_extra
from tests.qlora_child import DATA, ChildResult, run_qlora_batch, tiny_job
from tests.test_config_schema import BAD_MUTATIONS
from tests.test_template_sandbox import _templates

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

GENERATED = settings(
    max_examples=5,
    deadline=None,
    derandomize=True,  # the same cases on every CI run
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
SLOW_TEMPLATE_S = 180.0
"""Wall-time bound of a hostile template case (the sandbox's own limit is 10 s per render)."""


def _model_copy(tiny: Path, dest: Path) -> Path:
    model = dest / "model"
    shutil.copytree(tiny, model)
    return model


def _patch_json(path: Path, **changes: Any) -> None:
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc.update(changes)
    path.write_text(json.dumps(doc), encoding="utf-8")


Case = Callable[[Path, Path], tuple[Path, list[str]]]
"""(case dir, tiny model) -> (spec, fragments stderr must hold)."""


# --- config.json ---------------------------------------------------------------------------

BAD_CONFIGS = {
    "string-layer-count": (
        {"num_hidden_layers": "2"},
        'config.json: num_hidden_layers: must be an integer, got a string "2"',
    ),
    "negative": ({"hidden_size": -64}, "config.json: hidden_size: must be greater than 0"),
    "list-for-object": (
        {"rope_parameters": ["default"]},
        "config.json: rope_parameters: must be an object, got a list",
    ),
}


def _bad_config(changes: dict[str, Any], fragment: str) -> Case:
    def case(tmp: Path, tiny: Path) -> tuple[Path, list[str]]:
        model = _model_copy(tiny, tmp)
        _patch_json(model / "config.json", **changes)
        return tiny_job(tmp, model), [fragment, str(model / "config.json")]

    return case


# --- chat templates ------------------------------------------------------------------------

SPEC_TEMPLATES = {
    "loops-for-ever": (
        "{% for m in messages %}{{ m.content }}\n"
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
        "{% endfor %}",
        "dataset.chat_template: line 2: the chat template does more than",
    ),
    "output-flood": (
        "{% for i in range(1000) %}{% for j in range(1000) %}" + "y" * 5000 + "{% endfor %}"
        "{% endfor %}",
        "dataset.chat_template: line 1: the chat template writes more than",
    ),
    "syntax-error": (
        "{% for m in messages %}\n{{ m.content }\n{% endfor %}",
        "dataset.chat_template: line 2: unexpected '}'",
    ),
    "sandbox-escape": (
        "{{ messages.__class__.__mro__[1].__subclasses__() }}",
        "dataset.chat_template: line 1: the chat template does something the sandbox forbids",
    ),
}


def _spec_template(template: str, fragment: str) -> Case:
    def case(tmp: Path, tiny: Path) -> tuple[Path, list[str]]:
        return tiny_job(tmp, tiny, dataset={"chat_template": template}), [fragment]

    return case


def _model_template(tmp: Path, tiny: Path) -> tuple[Path, list[str]]:
    model = _model_copy(tiny, tmp)
    (model / "chat_template.jinja").write_text(
        "{{ bos_token }}\n{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
        encoding="utf-8",
    )
    return tiny_job(tmp, model), [
        f"{model / 'chat_template.jinja'}: line 2: the chat template asks for a joined text",
        "dataset.sources[0]: row ",
    ]


# --- tokenizer files and data --------------------------------------------------------------


def _truncated_tokenizer(tmp: Path, tiny: Path) -> tuple[Path, list[str]]:
    model = _model_copy(tiny, tmp)
    text = (model / "tokenizer.json").read_text(encoding="utf-8")
    (model / "tokenizer.json").write_text(text[: len(text) // 2], encoding="utf-8")
    return tiny_job(tmp, model), [f"{model / 'tokenizer.json'}: not valid JSON at line"]


def _typed_tokenizer_config(tmp: Path, tiny: Path) -> tuple[Path, list[str]]:
    model = _model_copy(tiny, tmp)
    _patch_json(model / "tokenizer_config.json", eos_token=5)
    return tiny_job(tmp, model), [f"{model / 'tokenizer_config.json'}: eos_token"]


def _invalid_utf8_data(tmp: Path, tiny: Path) -> tuple[Path, list[str]]:
    data = tmp / "bad.jsonl"
    lines = DATA.read_bytes().splitlines(keepends=True)
    data.write_bytes(b"".join(lines[:2]) + lines[2].replace(b"opposite", b"oppos\xe9te"))
    return tiny_job(tmp, tiny, data=data), [
        f"{data}: row 3 (line 3): not valid UTF-8 (byte 0xe9"
    ]


def _near_miss(tmp: Path, tiny: Path) -> tuple[Path, list[str]]:
    data = tmp / "qa.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"q{i}?", "answer": f"a{i}"}) + "\n" for i in range(4)),
        encoding="utf-8",
    )
    return tiny_job(tmp, tiny, data=data, dataset={"format": "alpaca"}), [
        "missing field 'instruction' (the row has 'question', 'answer')",
        "use dataset: {format: alpaca, fields: {instruction: question, output: answer}}",
    ]


FIXED: dict[str, Case] = {
    **{f"config-{k}": _bad_config(*v) for k, v in BAD_CONFIGS.items()},
    **{f"template-{k}": _spec_template(*v) for k, v in SPEC_TEMPLATES.items()},
    "template-shipped-with-the-model": _model_template,
    "truncated-tokenizer-json": _truncated_tokenizer,
    "wrongly-typed-tokenizer-config": _typed_tokenizer_config,
    "invalid-utf8-data": _invalid_utf8_data,
    "near-miss-layout": _near_miss,
}


# --- generated cases, drawn once (derandomized) and pre-filtered in process ----------------


def _generated_configs(tiny: Path) -> list[tuple[str, dict[str, Any]]]:
    base = json.loads((tiny / "config.json").read_text(encoding="utf-8"))
    found: list[tuple[str, dict[str, Any]]] = []

    @GENERATED
    @given(mutation=BAD_MUTATIONS)
    def draw(mutation: tuple[str, Any]) -> None:
        field, value = mutation
        config = {**base, field: value}
        with pytest.raises(SpecError):  # the shared check, in process, must refuse it
            check_model_config(config, "config.json")
        found.append((field, config))

    draw()
    return found


def _generated_templates(tokenizer: Any) -> list[str]:
    # The same renderer, in process, on the run's first row, picks the templates that must fail.
    first_row = json.loads(DATA.read_text(encoding="utf-8").splitlines()[0])["messages"]
    variables = tokenizer.special_tokens_map
    found: list[str] = []

    @GENERATED
    @given(template=_templates)
    def draw(template: str) -> None:
        try:
            ChatTemplate(TemplateSource(template, "dataset.chat_template"), variables).render(
                first_row, add_generation_prompt=False, where="row"
            )
        except RunnerError:
            found.append(template)
        else:
            assume(False)

    draw()
    return found


Outcomes = dict[str, tuple[ChildResult, list[str]]]


@pytest.fixture(scope="module")
def outcomes(
    tiny_model_dir: Path, tiny_tokenizer: Any, tmp_path_factory: pytest.TempPathFactory
) -> Outcomes:
    """Every case of this file, run in one batch child."""
    need_train_extra()
    root = tmp_path_factory.mktemp("hostile-inputs")
    cases: dict[str, tuple[Path, list[str]]] = {}
    for name, build in FIXED.items():
        (root / name).mkdir()
        cases[name] = build(root / name, tiny_model_dir)
    for i, (field, config) in enumerate(_generated_configs(tiny_model_dir)):
        tmp = root / f"generated-config-{i}"
        tmp.mkdir()
        model = _model_copy(tiny_model_dir, tmp)
        (model / "config.json").write_text(json.dumps(config), encoding="utf-8")
        cases[tmp.name] = (tiny_job(tmp, model), [f"config.json: {field}"])
    for i, template in enumerate(_generated_templates(tiny_tokenizer)):
        tmp = root / f"generated-template-{i}"
        tmp.mkdir()
        spec = tiny_job(tmp, tiny_model_dir, dataset={"chat_template": template})
        cases[tmp.name] = (spec, ["dataset.chat_template"])
    runs = [(["run", "--spec", str(s)], root / name / "work") for name, (s, _) in cases.items()]
    results = run_qlora_batch(runs, limit_s=800)
    return {
        name: (result, fragments)
        for (name, (_, fragments)), result in zip(cases.items(), results, strict=True)
    }


def _wall_s(name: str) -> float:
    return SLOW_TEMPLATE_S if "template" in name else 150.0


@pytest.mark.parametrize("name", list(FIXED))
def test_a_hostile_model_file_template_or_row_exits_2_naming_it(
    outcomes: Outcomes, name: str
) -> None:
    result, fragments = outcomes[name]
    result.assert_user_error(*fragments, wall_s=_wall_s(name))


@pytest.mark.parametrize("kind", ["config", "template"])
def test_generated_hostile_inputs_exit_2_through_qlora_run(outcomes: Outcomes, kind: str) -> None:
    generated = {n: o for n, o in outcomes.items() if n.startswith(f"generated-{kind}-")}
    assert len(generated) == GENERATED.max_examples, sorted(generated)
    for name, (result, fragments) in generated.items():
        result.assert_user_error(*fragments, wall_s=_wall_s(name))
