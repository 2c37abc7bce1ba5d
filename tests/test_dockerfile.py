"""The Dockerfile: hadolint-clean with no ignores, and the contract the rendered pods rely on.

What the pods depend on, checked in the text in milliseconds: the entrypoint, the non-root UID
the Job's securityContext names, the writable directories, a base image taken as an ARG with no
registry host, OCI labels, the layer order, no package caches. The built image itself is
checked by tests/test_image_layers.py.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from runner.k8s import manifests
from tests.conftest import require_binary
from tests.image_refs import has_registry_host, image_refs

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"


def text() -> str:
    return DOCKERFILE.read_text(encoding="utf-8")


def instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", text())
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    ins = instructions()
    last_from = max(i for i, (op, _) in enumerate(ins) if op == "FROM")
    return ins[last_from:]


def test_hadolint_clean_without_ignores(tmp_path: Path) -> None:
    hadolint = require_binary("hadolint")
    assert "hadolint ignore" not in text()
    assert not (REPO / ".hadolint.yaml").exists() or "ignored" not in (
        REPO / ".hadolint.yaml"
    ).read_text(encoding="utf-8")
    out = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0 and out.stdout == "", out.stdout + out.stderr


def test_hadolint_would_catch_a_regression(tmp_path: Path) -> None:
    hadolint = require_binary("hadolint")
    bad = tmp_path / "Dockerfile"
    bad.write_text(text().replace("USER 10001:10001", "USER root"), encoding="utf-8")
    out = subprocess.run(
        [hadolint, "--no-color", str(bad)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode != 0 and "DL3002" in out.stdout  # last USER should not be root


def test_base_image_is_an_arg_without_registry_host() -> None:
    (arg,) = [rest for op, rest in instructions() if op == "ARG" and rest.startswith("BASE_IMAGE=")]
    default = arg.split("=", 1)[1]
    first = default.split("/", 1)[0]
    # a plain Debian image: no CUDA base (PyPI's torch wheels bring the CUDA user-space libraries)
    assert "/" not in default or ("." not in first and ":" not in first and first != "localhost")
    assert default.startswith(("debian:", "ubuntu:")) and "cuda" not in default
    assert ("FROM", "${BASE_IMAGE} AS runtime") in instructions()
    refs = image_refs(text())
    assert refs, "the image reference scan found nothing: the test would be vacuous"
    assert not [r for r in refs if has_registry_host(r)], refs


def test_gpu_variant_gets_a_compiler_and_python_headers() -> None:
    """Triton compiles a launcher against Python.h; the GPU extras install both."""
    script = (REPO / "scripts" / "tools" / "os_packages.sh").read_text(encoding="utf-8")
    gpu = script[script.index("*,gpu,*)") :]
    assert "gcc" in gpu and "python3-dev" in gpu and "Python.h" in gpu
    (extras,) = [rest for op, rest in instructions() if op == "ARG" and rest.startswith("EXTRAS=")]
    assert extras == "EXTRAS=gpu,k8s"


def test_entrypoint_and_non_root_user() -> None:
    stage = final_stage()
    (entrypoint,) = [rest for op, rest in stage if op == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["qlora", "run"]
    (user,) = [rest for op, rest in stage if op == "USER"]
    uid, _, gid = user.partition(":")
    assert int(uid) == manifests.RUN_AS_UID and int(gid) == manifests.RUN_AS_UID
    assert [op for op, _ in stage][-1] == "ENTRYPOINT"


def test_image_prepares_the_paths_the_pods_write() -> None:
    stage = " ".join(rest for _, rest in final_stage())
    for path in (manifests.CACHE_DIR, manifests.WORK_DIR, manifests.CONFIG_MOUNT_DIR):
        assert path in stage
    (workdir,) = [rest for op, rest in final_stage() if op == "WORKDIR"]
    assert workdir == manifests.WORK_DIR


@pytest.mark.parametrize(
    "label",
    ["title", "description", "version", "licenses", "base.name"],
)
def test_oci_labels(label: str) -> None:
    labels = " ".join(rest for op, rest in final_stage() if op == "LABEL")
    assert f"org.opencontainers.image.{label}=" in labels


def test_dependencies_before_source_and_no_caches_left() -> None:
    ins = instructions()
    runs = [rest for op, rest in ins if op == "RUN"]
    pip = [r for r in runs if "pip install" in r]
    assert pip and all("--no-cache-dir" in r for r in pip)
    deps = next(i for i, (op, r) in enumerate(ins) if op == "RUN" and "requirements.txt" in r)
    source = next(i for i, (op, r) in enumerate(ins) if op == "COPY" and r.startswith("runner "))
    package = next(i for i, (op, r) in enumerate(ins) if op == "RUN" and "--no-deps" in r)
    assert deps < source < package
    # pip's build-host settings come in as mounts only, never as ENV, ARG or COPY
    assert "type=secret,id=pip-conf" in ins[deps][1] and "type=secret,id=pip-ca" in ins[deps][1]
    env = " ".join(rest for op, rest in ins if op in {"ENV", "ARG"})
    assert "PIP_" not in env
    assert not [rest for op, rest in ins if op == "ADD"]


def test_context_files_come_in_by_copy_not_bind_mounts() -> None:
    """buildah does not hash bind-mounted context files: a changed source would hit the cache."""
    assert not re.findall(r"type=bind,source=", text())


def test_dockerignore_sends_only_what_the_build_copies() -> None:
    lines = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    rules = [x for x in lines if x and not x.startswith("#")]
    assert rules[0] == "*"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied = set()
    for op, rest in instructions():
        if op == "COPY" and not rest.startswith("--from"):
            copied |= {Path(p).as_posix().rstrip("/") for p in rest.split()[:-1]}
    assert copied and copied <= allowed, copied - allowed
    assert {".venv", ".git", "tests"}.isdisjoint(allowed)
