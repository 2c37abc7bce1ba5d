"""``qlora render`` as a user runs it: YAML for ``kubectl apply -f -``, clear errors otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from runner.cli import main
from runner.errors import ExitCode

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_SPEC = REPO / "manifests" / "example-finetunejob.yaml"
EXAMPLE_JOB = REPO / "manifests" / "example-job.yaml"
EXAMPLE_ENV = {"QLORA_S3_ENDPOINT_URL": "http://s3.storage.svc:8333"}

TINY = """
apiVersion: qlora-runner.io/v1alpha1
kind: FineTuneJob
metadata: {name: tiny}
spec:
  model: {source: hf://Qwen/Qwen2.5-0.5B-Instruct@main}
  dataset: {sources: [s3://datasets/tiny/train.jsonl]}
  output: {uri: s3://adapters/tiny}
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from QLORA_*; a developer's own must not leak into these tests."""
    for key in list(os.environ):
        if key.startswith("QLORA_"):
            monkeypatch.delenv(key)


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_committed_standalone_example_is_a_fresh_render(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for k, v in EXAMPLE_ENV.items():
        monkeypatch.setenv(k, v)
    code, out, _ = run(["render", str(EXAMPLE_SPEC), "--model-config", "llama-3.1-8b"], capsys)
    assert code == 0
    committed = EXAMPLE_JOB.read_text(encoding="utf-8")
    body = "".join(line for line in committed.splitlines(keepends=True) if not line.startswith("#"))
    assert body == out, (
        "manifests/example-job.yaml is stale; regenerate it with the command in its header"
    )


def test_render_prints_apply_ready_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("QLORA_NAMESPACE", "ml")
    monkeypatch.setenv("QLORA_IMAGE", "example/qlora-runner:1.2.3")
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY, encoding="utf-8")
    code, out, _ = run(["render", str(spec), "--queue", "team-a"], capsys)
    assert code == 0
    docs = list(yaml.safe_load_all(out))
    assert [d["kind"] for d in docs] == ["ConfigMap", "Job"]
    cm, job = docs
    assert cm["metadata"]["namespace"] == job["metadata"]["namespace"] == "ml"
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "example/qlora-runner:1.2.3"
    assert "Gt" in str(pod["affinity"])
    # Idempotent: the same spec renders the same bytes (and so the same names).
    assert run(["render", str(spec), "--queue", "team-a"], capsys)[1] == out


def test_render_with_a_saved_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY, encoding="utf-8")
    code, plan_json, _ = run(["plan", str(spec), "--json"], capsys)
    assert code == 0
    plan = tmp_path / "plan.json"
    plan.write_text(plan_json, encoding="utf-8")
    code, with_plan, _ = run(["render", str(spec), "--plan", str(plan)], capsys)
    assert code == 0
    assert with_plan == run(["render", str(spec)], capsys)[1]
    other = tmp_path / "other.yaml"
    other.write_text(TINY.replace("tiny/train", "other/train"), encoding="utf-8")
    code, out, err = run(["render", str(other), "--plan", str(plan)], capsys)
    assert code == ExitCode.DOES_NOT_FIT and out == ""
    assert "made for another spec" in err


def test_crd_flag_prints_the_committed_crd(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["render", "--crd"], capsys)
    assert code == 0
    assert out == (REPO / "manifests" / "crd.yaml").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["render"], ExitCode.INVALID_INPUT, "needs a spec FILE"),
        (["render", "missing.yaml"], ExitCode.INVALID_INPUT, "no such file"),
        (["render", "--crd", "x.yaml"], ExitCode.INVALID_INPUT, "not both"),
        (["render", "SPEC", "-n", "Bad_NS"], ExitCode.INVALID_INPUT, "--namespace"),
        (["render", "SPEC", "--queue", "a b"], ExitCode.INVALID_INPUT, "--queue"),
        (["render", "SPEC", "--model-config", "nope"], ExitCode.INVALID_INPUT, "bundled shape"),
    ],
    ids=["no-file", "missing", "crd-and-file", "bad-namespace", "bad-queue", "bad-config"],
)
def test_errors_are_messages_with_exit_codes(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    code: int,
    fragment: str,
) -> None:
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY, encoding="utf-8")
    args = [str(spec) if a == "SPEC" else a for a in args]
    got, out, err = run(args, capsys)
    assert got == code
    assert out == ""
    assert fragment in err
    assert "Traceback" not in err


def test_spec_that_fits_nothing_renders_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "big.yaml"
    spec.write_text(
        TINY.replace("Qwen/Qwen2.5-0.5B-Instruct", "meta-llama/Llama-3.1-70B-Instruct")
        + "  quantization: {mode: 16bit}\n  resources: {gpu_class: 24GB}\n",
        encoding="utf-8",
    )
    code, out, err = run(["render", str(spec)], capsys)
    assert code == ExitCode.DOES_NOT_FIT
    assert out == ""
    assert "24GB" in err
