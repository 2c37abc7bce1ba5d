"""scripts/tools/pip_build_context.py: pip's settings become build secrets and contexts.

The image tests check that nothing of it reaches a layer; these check the translation itself,
table-driven, on made-up configurations (no pip call).
"""

from __future__ import annotations

import configparser
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import REPO


def load() -> ModuleType:
    path = REPO / "scripts" / "tools" / "pip_build_context.py"
    spec = importlib.util.spec_from_file_location("pip_build_context", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pbc = load()


def translate(tmp_path: Path, settings: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    args = pbc.build_args(tmp_path / "out", settings)
    conf = configparser.ConfigParser(interpolation=None)
    conf.read(tmp_path / "out" / "pip.conf")
    return args, dict(conf["global"])


def test_local_folders_become_contexts_and_files_secrets(tmp_path: Path) -> None:
    wheels, index = tmp_path / "wheels", tmp_path / "pypi" / "simple"
    wheels.mkdir()
    index.mkdir(parents=True)
    ca = tmp_path / "ca.pem"
    ca.write_text("CA")
    cons = tmp_path / "constraints.txt"
    cons.write_text("torch<=9\n")
    args, conf = translate(tmp_path, {
        "cert": str(ca), "find-links": str(wheels), "constraint": str(cons),
        "extra-index-url": f"file://{index} https://mirror.example/simple",
        "default-timeout": "180", "user": "true",
    })  # fmt: skip
    assert f"--secret=id=pip-ca,src={ca}" in args
    assert f"--build-context=pip-local-0={wheels}" in args
    assert f"--build-context=pip-local-1={index.parent}" in args  # the index's parent: ../files
    assert any(a.startswith("--build-context=pip-local-3=") and a.endswith("/empty") for a in args)
    assert conf == {
        "cert": "/tmp/pip-ca",
        "find-links": "/tmp/pip-local-0",
        "constraint": "/tmp/pip-files/0-constraints.txt",
        "extra-index-url": "file:///tmp/pip-local-1/simple https://mirror.example/simple",
        "default-timeout": "180",
    }  # `user` would break the build's venv install: dropped
    assert (tmp_path / "out" / "files" / "0-constraints.txt").read_text() == "torch<=9\n"
    assert (tmp_path / "out" / "pip.conf").stat().st_mode & 0o077 == 0


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ({"find-links": "wheels"}, "find-links: 'wheels' is a relative path"),
        ({"cert": "/nonexistent/ca.pem"}, "cert: /nonexistent/ca.pem is not a file"),
        ({"client-cert": "/x.pem"}, "client-cert: client certificates are not passed"),
    ],
    ids=["relative", "missing-cert", "client-cert"],
)
def test_settings_that_cannot_be_passed_are_errors(
    tmp_path: Path, settings: dict[str, str], fragment: str
) -> None:
    with pytest.raises(pbc.ConfigError, match=fragment):
        pbc.build_args(tmp_path / "out", settings)


def test_more_folders_than_slots_is_an_error(tmp_path: Path) -> None:
    dirs = []
    for i in range(pbc.LOCAL_SLOTS + 1):
        (tmp_path / f"d{i}").mkdir()
        dirs.append(str(tmp_path / f"d{i}"))
    with pytest.raises(pbc.ConfigError, match=f"more than {pbc.LOCAL_SLOTS} local folders"):
        pbc.build_args(tmp_path / "out", {"find-links": " ".join(dirs)})


def test_main_exits_2_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake_pip = tmp_path / "pip"
    fake_pip.write_text("#!/bin/sh\necho \"global.find-links='relative/dir'\"\n")
    fake_pip.chmod(0o755)
    assert pbc.main(["--out", str(tmp_path / "out"), "--pip", str(fake_pip)]) == 2
    assert "pip configuration: find-links:" in capsys.readouterr().err
