"""The image as built: what its layers hold, how it runs, and a tiny job trained inside it.

The build passes this machine's pip configuration in (CA bundle and settings as build secrets,
local wheel folders as named build contexts). These tests look into every layer, not just the
merged filesystem, since a file deleted in a later layer still ships in an earlier one: no pip
configuration, no CA bundle from the build host, no credentials, no empty mount points of the
build's mounts, nothing left in /tmp. Then the image runs the way the rendered pods run it: as
UID 10001, read-only root, all capabilities dropped, writable tmpfs only where the pods have
emptyDirs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from runner.k8s import manifests
from tests.conftest import REPO
from tests.fixtures.image import Image, podman

pytestmark = [pytest.mark.image, pytest.mark.timeout(1500)]

# Where the Dockerfile mounts the build's secrets, contexts and helper scripts.
BUILD_MOUNTS = ("run/secrets", "run/pip", "run/qlora-build")
PIP_CONFIG_NAMES = {"pip.conf", "pip.ini"}
CREDENTIAL_NAMES = {".netrc", ".git-credentials", "credentials", ".pypirc", "config.json"}


@pytest.fixture(scope="module")
def inspect(qlora_image: Image) -> dict[str, Any]:
    out = podman(qlora_image, "image", "inspect", qlora_image.ref)
    assert out.returncode == 0, out.stderr
    doc: dict[str, Any] = json.loads(out.stdout)[0]
    return doc


@pytest.fixture(scope="module")
def layer_dirs(inspect: dict[str, Any]) -> list[Path]:
    """Each layer's own files (overlay diff directories), base first."""
    driver = inspect["GraphDriver"]
    assert driver["Name"] == "overlay", f"the layer checks read overlay layers, not {driver}"
    lower = [Path(p) for p in driver["Data"].get("LowerDir", "").split(":") if p]
    dirs = [*reversed(lower), Path(driver["Data"]["UpperDir"])]
    assert len(dirs) >= 4 and all(d.is_dir() for d in dirs), dirs
    return dirs


def walk(layer: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(layer):
        for name in dirs + files:
            yield Path(root, name)


def host_pip_files() -> tuple[list[str], list[Path]]:
    """This machine's pip settings as strings, and the files they name (CA bundle etc.)."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    values = [line.partition("=")[2].strip("'\"") for line in out.splitlines() if "=" in line]
    files = [Path(v) for v in values if v.startswith("/") and Path(v).is_file()]
    return values, files


def test_no_build_mounts_pip_config_or_credentials_in_any_layer(layer_dirs: list[Path]) -> None:
    seen = 0
    for layer in layer_dirs:
        for path in walk(layer):
            seen += 1
            rel = path.relative_to(layer).as_posix()
            assert not any(rel == m or rel.startswith(m + "/") for m in BUILD_MOUNTS), (
                f"{rel}: a build mount point (or what it held) is left in layer {layer}"
            )
            assert path.name not in PIP_CONFIG_NAMES, f"{rel}: pip configuration in the image"
            if path.name in CREDENTIAL_NAMES and path.is_file():
                # config.json is a common name; only a Docker/registry auth file is a credential
                text = path.read_text(encoding="utf-8", errors="replace")
                assert path.name == "config.json" and '"auths"' not in text, rel
            assert not rel.startswith("tmp/") or rel == "tmp/.keep", f"{rel}: left in /tmp"
    assert seen > 10_000, "the walk saw almost nothing: the layer paths are wrong"


def test_no_file_from_the_build_hosts_pip_settings_in_any_layer(layer_dirs: list[Path]) -> None:
    """The CA bundle and constraint files pip is configured with here are not copied in."""
    _, files = host_pip_files()
    if not files:
        pytest.skip("pip on this machine names no local file (no CA bundle, no constraints)")
    wanted = {f.stat().st_size: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    for layer in layer_dirs:
        for path in walk(layer):
            if path.is_file() and not path.is_symlink() and path.stat().st_size in wanted:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                assert digest != wanted[path.stat().st_size], f"{path}: a copy of a host pip file"


def test_config_and_history_carry_no_pip_settings(
    qlora_image: Image, inspect: dict[str, Any]
) -> None:
    values, _ = host_pip_files()
    local = [v for v in values if v.startswith(("/", "file://"))]
    assert local, "pip here names no local file or folder: the check below would be vacuous"
    history = podman(
        qlora_image, "history", "--no-trunc", "--format", "{{.CreatedBy}}", qlora_image.ref
    )
    assert history.returncode == 0, history.stderr
    config = json.dumps(inspect["Config"])
    for value in local:
        for part in value.split():
            assert part not in config and part not in history.stdout, part
    env = inspect["Config"]["Env"]
    assert not [e for e in env if e.startswith(("PIP_", "PYTHONPATH="))], env


def test_runs_as_10001_with_the_run_entrypoint_and_oci_labels(inspect: dict[str, Any]) -> None:
    config = inspect["Config"]
    assert config["User"] == f"{manifests.RUN_AS_UID}:{manifests.RUN_AS_UID}"
    assert config["Entrypoint"] == ["qlora", "run"]
    assert config["WorkingDir"] == manifests.WORK_DIR
    labels = config["Labels"]
    for key in ("title", "version", "revision", "licenses", "base.name"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    assert labels["io.qlora-runner.extras"] == "train,k8s"


def locked_down(image: Image, *args: str) -> list[str]:
    """``podman run`` as the rendered pods run: read-only root, no capabilities, tmpfs dirs."""
    return [
        "run", "--rm", "--network", "host", "--read-only",
        "--user", f"{manifests.RUN_AS_UID}:{manifests.RUN_AS_UID}",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "--tmpfs", "/tmp:rw,size=512m,mode=1777",
        "--tmpfs", f"{manifests.CACHE_DIR}:rw,size=512m,mode=0750,U",
        "--tmpfs", f"{manifests.WORK_DIR}:rw,size=1g,mode=0750,U",
        *args,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (["--entrypoint", "qlora", "IMAGE", "--help"], "usage: qlora"),
        (["IMAGE", "--help"], "--spec"),
        (["--entrypoint", "qlora", "IMAGE", "operator", "--help"], "operator"),
    ],
    ids=["qlora", "entrypoint-run", "operator"],
)
def test_commands_start_on_a_read_only_root(
    qlora_image: Image, argv: list[str], expect: str
) -> None:
    args = [qlora_image.ref if a == "IMAGE" else a for a in argv]
    out = podman(qlora_image, *locked_down(qlora_image, *args))
    assert out.returncode == 0, out.stdout + out.stderr
    assert expect in out.stdout, out.stdout


def test_root_filesystem_really_is_read_only(qlora_image: Image) -> None:
    out = podman(
        qlora_image,
        *locked_down(qlora_image, "--entrypoint", "sh", qlora_image.ref, "-c",
                     "id -u; touch /opt/venv/x 2>&1; touch /var/lib/qlora/ok && echo writable"),
    )  # fmt: skip
    assert out.stdout.splitlines()[0] == str(manifests.RUN_AS_UID), out.stdout + out.stderr
    assert "Read-only file system" in out.stdout and "writable" in out.stdout, out.stdout


def test_tiny_job_trains_verifies_and_publishes_inside_the_image(
    qlora_image: Image, tiny_model_dir: Path, tmp_path: Path
) -> None:
    doc = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text(encoding="utf-8"))
    doc["spec"]["model"]["source"] = "/models/tiny"
    doc["spec"]["dataset"]["sources"] = ["/data/antonyms-chat.jsonl"]
    doc["spec"]["training"]["max_steps"] = 20
    doc["spec"]["output"]["uri"] = "file:///out/tiny"
    spec_dir = tmp_path / "spec"
    spec_dir.mkdir()
    (spec_dir / "job.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")
    model = tmp_path / "model"  # a readable copy: pytest's temporary folders are 0700
    shutil.copytree(tiny_model_dir, model)
    for p in [model, *model.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out_dir.chmod(0o777)  # written by UID 10001 inside
    out = podman(
        qlora_image,
        *locked_down(
            qlora_image,
            "-e", "HF_HUB_OFFLINE=1",
            "-v", f"{spec_dir}:{manifests.CONFIG_MOUNT_DIR}:ro",
            "-v", f"{model}:/models/tiny:ro",
            "-v", f"{REPO / 'examples' / 'data'}:/data:ro",
            "-v", f"{out_dir}:/out",
            qlora_image.ref,
            "--spec", f"{manifests.CONFIG_MOUNT_DIR}/job.yaml",
        ),
        timeout_s=600,
    )  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 20
    published = {p.name for p in (out_dir / "tiny").rglob("*") if p.is_file()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= published, published
    uri = summary["manifest_uri"]
    assert uri.startswith("file:///out/tiny/"), uri
    manifest = json.loads((out_dir / uri.removeprefix("file:///out/")).read_text())
    assert manifest["verification"]["weight_update"]["changed_tensors"] > 0
    assert (out_dir / "tiny" / "latest.json").is_file()
