"""Unreadable, misplaced and non-regular user files: exit 2 naming the file and the fix.

A model file the runner's user may not read (``chmod 000``), a directory or a FIFO where a file
belongs, a dataset symlinked to ``/dev/zero``, a template or tokenizer file that is not UTF-8:
each is the user's own input gone wrong, and must end ``qlora run`` (and ``validate`` / ``plan``
where they read the file) with exit 2 and one line naming the file and what to do, never exit 1
(which the Job retries on a GPU node), never a hang and never "phase training".

All the cases run in ONE child interpreter (:func:`tests.qlora_child.run_qlora_batch`), each
through the real ``runner.cli.main`` with its own output, exit code and timing; the batch's
peak RSS bounds every case. File modes bind the child even as root: it drops
CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH before exec.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import STRICT
from tests.fixtures.tiny_model import need_train_extra
from tests.qlora_child import (
    DATA,
    ChildResult,
    file_modes_bind_children,
    run_qlora_batch,
    tiny_job,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

Setup = Callable[[Path, Path], tuple[str, Path, list[str]]]
"""(case dir, tiny model) -> (command, spec, fragments that stderr must hold)."""


def _model(case: Path, tiny: Path) -> Path:
    model = case / "model"
    shutil.copytree(tiny, model)
    return model


def _unreadable(name: str) -> Setup:
    def setup(case: Path, tiny: Path) -> tuple[str, Path, list[str]]:
        model = _model(case, tiny)
        os.chmod(model / name, 0)
        return "run", tiny_job(case, model), [f"{model / name}: permission denied; make it "]

    return setup


def _unlistable_dir(case: Path, tiny: Path) -> tuple[str, Path, list[str]]:
    model = _model(case, tiny)
    os.chmod(model, 0o300)  # writable and searchable, but not listable
    return "run", tiny_job(case, model), [f"{model}: permission denied", "chmod a+rx"]


def _unreadable_data(case: Path, tiny: Path) -> tuple[str, Path, list[str]]:
    data = case / "data.jsonl"
    shutil.copy(DATA, data)
    os.chmod(data, 0)
    return "run", tiny_job(case, tiny, data=data), [f"dataset.sources[0]: {data}: permission"]


def _unreadable_spec(case: Path, tiny: Path) -> tuple[str, Path, list[str]]:
    spec = tiny_job(case, tiny)
    os.chmod(spec, 0)
    return "run", spec, [f"{spec}: cannot read the spec: permission denied; make it"]


def _replaced(name: str, kind: str) -> Setup:
    def setup(case: Path, tiny: Path) -> tuple[str, Path, list[str]]:
        model = _model(case, tiny)
        (model / name).unlink()
        if kind == "dir":
            (model / name).mkdir()
            want = f"{model / name}: is a directory, not a file"
        else:
            os.mkfifo(model / name)
            want = f"{model / name}: not a regular file (a FIFO, socket or device)"
        return "run", tiny_job(case, model), [want]

    return setup


def _data_is_dev_zero(case: Path, tiny: Path) -> tuple[str, Path, list[str]]:
    data = case / "data.jsonl"
    data.symlink_to("/dev/zero")
    return "run", tiny_job(case, tiny, data=data), [f"{data}: not a regular file"]


def _not_utf8(name: str, data: bytes) -> Setup:
    def setup(case: Path, tiny: Path) -> tuple[str, Path, list[str]]:
        model = _model(case, tiny)
        (model / name).write_bytes(data)
        return "run", tiny_job(case, model), [f"{model / name}: not UTF-8 text"]

    return setup


def _validate_unreadable_config(case: Path, tiny: Path) -> tuple[str, Path, list[str]]:
    model = _model(case, tiny)
    os.chmod(model / "config.json", 0)
    return "validate", tiny_job(case, model), [f"{model / 'config.json'}: permission denied"]


def _plan_unlistable(case: Path, tiny: Path) -> tuple[str, Path, list[str]]:
    model = _model(case, tiny)
    os.chmod(model, 0o300)
    return "plan", tiny_job(case, model), [f"{model}: permission denied"]


CASES: dict[str, Setup] = {
    "config-unreadable": _unreadable("config.json"),
    "tokenizer-json-unreadable": _unreadable("tokenizer.json"),
    "tokenizer-config-unreadable": _unreadable("tokenizer_config.json"),
    "template-unreadable": _unreadable("chat_template.jinja"),
    "weights-unreadable": _unreadable("model.safetensors"),
    "model-dir-unlistable": _unlistable_dir,
    "data-unreadable": _unreadable_data,
    "spec-unreadable": _unreadable_spec,
    "weights-is-a-dir": _replaced("model.safetensors", "dir"),
    "template-is-a-dir": _replaced("chat_template.jinja", "dir"),
    "tokenizer-json-is-a-fifo": _replaced("tokenizer.json", "fifo"),
    "data-is-dev-zero": _data_is_dev_zero,
    "template-not-utf8": _not_utf8("chat_template.jinja", b"{{ bos_token }}\xff\xfe"),
    "tokenizer-config-not-utf8": _not_utf8("tokenizer_config.json", b'{"a": "\xe9"}'),
    "config-utf16": _not_utf8("config.json", '{"model_type": "llama"}'.encode("utf-16")),
    "validate-config-unreadable": _validate_unreadable_config,
    "plan-model-dir-unlistable": _plan_unlistable,
}
NEEDS_MODES = {n for n in CASES if "unreadable" in n or "unlistable" in n}
"""Cases that need file modes to bind the child (see :func:`file_modes_bind_children`)."""


@pytest.fixture(scope="module")
def outcomes(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[ChildResult, list[str]]]:
    """Every case, run in one batch child."""
    need_train_extra()
    root = tmp_path_factory.mktemp("hostile-files")
    runs: list[tuple[list[str], Path]] = []
    wanted: dict[str, list[str]] = {}
    modes = file_modes_bind_children()
    for name, setup in CASES.items():
        if name in NEEDS_MODES and not modes:
            continue
        case = root / name
        case.mkdir()
        command, spec, fragments = setup(case, tiny_model_dir)
        argv = ["run", "--spec", str(spec)] if command == "run" else [command, str(spec)]
        runs.append((argv, case / "work"))
        wanted[name] = fragments
    results = run_qlora_batch(runs, modes_apply=True)
    return {name: (r, wanted[name]) for name, r in zip(wanted, results, strict=True)}


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_user_file_is_exit_2_naming_it(
    outcomes: dict[str, tuple[ChildResult, list[str]]], name: str
) -> None:
    if name not in outcomes:
        msg = "file modes do not bind a child here (root without CAP_SETPCAP)"
        if STRICT:
            pytest.fail(msg)
        pytest.skip(msg)
    result, fragments = outcomes[name]
    result.assert_user_error(*fragments, wall_s=120)
