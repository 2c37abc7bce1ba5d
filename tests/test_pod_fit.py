"""Render only what can work in a pod; Kueue flavors keyed on GPU memory; chart naming.

* ``qlora render`` / ``submit`` refuse local paths (exit 2, ``path: message``), ``qlora
  validate`` reports the label errors ``render`` does, and a ConfigMap the API server would
  refuse is refused at render time.
* The pod requests ``ephemeral-storage`` and its emptyDirs have size limits from the plan.
* The chart's Kueue objects pass a strict schema of Kueue's v1beta1 API, a misspelt field
  fails it, and ``qlora render --queue --kueue-flavors`` names the flavors Kueue would admit
  the job to.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from runner import cli
from runner.errors import SpecError
from runner.k8s import render_objects
from runner.k8s.pod_fit import model_download_bytes, volume_sizes
from runner.plan import bundled_config, make_plan
from runner.settings import Settings
from runner.spec import load_spec
from tests.kueue_schema import check_kueue
from tests.test_helm import CHART, by_kind, template

S3_SPEC = """
apiVersion: qlora-runner.io/v1alpha1
kind: FineTuneJob
metadata:
  name: fit
spec:
  model: {source: "s3://models/llama-3.1-8b"}
  dataset: {sources: ["s3://data/chat.jsonl"]}
  output: {uri: "s3://adapters/fit"}
"""


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def edit(**changes: Any) -> str:
    doc = yaml.safe_load(S3_SPEC)
    for dotted, value in changes.items():
        node = doc
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    return yaml.safe_dump(doc)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize(
    ("changes", "field", "fragment"),
    [
        ({"spec__model__source": "models/tiny"}, "spec.model.source", "a relative path"),
        ({"spec__dataset__sources": ["data.jsonl"]}, "spec.dataset.sources[0]", "relative"),
        ({"spec__output__uri": "file://out"}, "spec.output.uri", "relative"),
        ({"spec__output__uri": "file:///var/lib/qlora/out"}, "spec.output.uri", "emptyDir"),
        ({"spec__dataset__sources": ["/tmp/x.jsonl"]}, "spec.dataset.sources[0]", "emptyDir"),
        ({"spec__output__uri": "file:///data/adapters"}, "spec.output.uri", "submitting"),
    ],
    ids=["model-relative", "data-relative", "output-relative", "output-workdir", "data-tmp",
         "output-absolute"],
)  # fmt: skip
def test_render_refuses_paths_a_pod_cannot_reach(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    changes: dict[str, Any],
    field: str,
    fragment: str,
) -> None:
    spec = write(tmp_path, edit(**changes))
    rc, out, err = run(capsys, "render", str(spec), "--model-config", "llama-3.1-8b")
    assert rc == 2 and out == "", err
    (line,) = [x for x in err.splitlines() if x.startswith(f"{field}:")]
    assert fragment in line and "s3://" in line, line
    assert "Traceback" not in err


def test_absolute_paths_pass_only_when_the_user_says_they_are_mounted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write(tmp_path, edit(spec__output__uri="file:///data/adapters"))
    rc, out, err = run(
        capsys, "render", str(spec), "--model-config", "llama-3.1-8b", "--allow-local-paths"
    )
    assert rc == 0 and "file:///data/adapters" in out, err
    relative = write(tmp_path, edit(spec__output__uri="file://out"), "rel.yaml")
    rc, _, err = run(
        capsys, "render", str(relative), "--model-config", "llama-3.1-8b", "--allow-local-paths"
    )
    assert rc == 2 and "spec.output.uri:" in err


def test_submit_refuses_local_paths_before_any_api_call(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write(tmp_path, edit(spec__model__source="./models/tiny"))
    # no cluster is configured: reaching the client would fail with another exit code
    rc, _, err = run(capsys, "submit", str(spec), "--kubeconfig", str(tmp_path / "none"))
    assert rc == 2 and "spec.model.source:" in err, err


@pytest.mark.parametrize(
    ("labels", "fragment"),
    [
        ({"team": "a" * 64}, "not a valid label value"),
        ({"bad key!": "x"}, "not a valid label key"),
        ({"app.kubernetes.io/name": "x"}, "reserved"),
    ],
    ids=["value-too-long", "bad-key", "reserved"],
)
def test_validate_reports_the_label_errors_render_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], labels: dict[str, str], fragment: str
) -> None:
    spec = write(tmp_path, edit(metadata__labels=labels))
    rc, _, validate_err = run(capsys, "validate", str(spec))
    assert rc == 2 and fragment in validate_err, validate_err
    rc, _, render_err = run(capsys, "render", str(spec), "--model-config", "llama-3.1-8b")
    assert rc == 2
    lines = {x for x in validate_err.splitlines() if x.startswith("metadata.labels")}
    assert lines and lines == {x for x in render_err.splitlines() if x.startswith("metadata.")}


def plan_for(text: str, tmp_path: Path) -> tuple[Any, Any, Settings]:
    spec = load_spec(write(tmp_path, text))
    settings = Settings()
    config = bundled_config("llama-3.1-8b")
    assert config is not None
    return spec, make_plan(spec, settings, model_config=dict(config.config)), settings


def test_config_map_over_the_api_limit_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The spec file itself is bounded at 1 MiB (runner.spec.bounds), so a ConfigMap over the
    # API's limit cannot come from a spec the loader accepts; the render-time check stays as
    # defence in depth and is exercised here with the limit lowered below a real spec's size.
    doc = yaml.safe_load(S3_SPEC)
    doc["spec"]["dataset"]["chat_template"] = "x" * 60_000
    spec, plan, settings = plan_for(yaml.safe_dump(doc, width=10**9), tmp_path)
    monkeypatch.setattr("runner.k8s.pod_fit.MAX_CONFIG_MAP_BYTES", 16 * 1024 + 50_000)
    with pytest.raises(SpecError) as e:
        render_objects(spec, plan, settings)
    (line,) = e.value.details
    assert line.startswith("ConfigMap fit-") and "refuses objects over 1 MiB" in line, line


def test_pod_requests_the_disk_its_plan_needs(tmp_path: Path) -> None:
    spec, plan, settings = plan_for(S3_SPEC, tmp_path)
    download = model_download_bytes(plan)
    assert 15e9 < download < 17.5e9, download  # 8.0 B params in bf16
    _, job = render_objects(spec, plan, settings)
    pod = job["spec"]["template"]["spec"]
    limits = {v["name"]: v["emptyDir"].get("sizeLimit") for v in pod["volumes"] if "emptyDir" in v}
    assert all(limits.values()), limits
    mib = {k: int(v.removesuffix("Mi")) for k, v in limits.items()}
    assert mib["work"] * 2**20 > download, "an s3:// model is downloaded into the work dir"
    request = pod["containers"][0]["resources"]["requests"]["ephemeral-storage"]
    assert int(request.removesuffix("Mi")) == mib["tmp"] + mib["cache"] + mib["work"]
    # an hf:// model lands in the cache instead
    hf_spec = load_spec(write(tmp_path, edit(spec__model__source="hf://org/m"), "h.yaml"))
    hf = volume_sizes(hf_spec, plan)
    assert hf.cache > download > hf.work


def test_release_name_is_never_doubled() -> None:
    for release, want in [("qlora", "qlora-runner"), ("qlora-runner", "qlora-runner"),
                          ("team-a", "team-a-qlora-runner")]:  # fmt: skip
        (deploy,) = by_kind(template(release=release))["Deployment"]
        assert deploy["metadata"]["name"] == want, (release, deploy["metadata"]["name"])


KUEUE_VALUES = CHART / "ci" / "kueue-values.yaml"


def kueue_docs() -> dict[str, list[dict[str, Any]]]:
    return by_kind(template(str(KUEUE_VALUES)))


def test_chart_kueue_objects_pass_a_strict_kueue_schema() -> None:
    docs = kueue_docs()
    flavors = docs["ResourceFlavor"]
    assert {f["metadata"]["name"] for f in flavors} == {"l4-24gb", "l40s-48gb", "h100-80gb"}
    for doc in flavors + docs["ClusterQueue"] + docs["LocalQueue"]:
        check_kueue(doc)
    by_name = {f["metadata"]["name"]: f for f in flavors}
    assert by_name["l4-24gb"]["spec"]["nodeLabels"] == {"nvidia.com/gpu.memory": "23034"}
    assert by_name["l40s-48gb"]["metadata"]["annotations"]["qlora-runner.io/gpu-classes"] == (
        "24GB,48GB"
    )
    (cq,) = docs["ClusterQueue"]
    assert [f["name"] for f in cq["spec"]["resourceGroups"][0]["flavors"]] == [
        "l4-24gb", "l40s-48gb", "h100-80gb"
    ]  # fmt: skip
    assert {q["spec"]["clusterQueue"] for q in docs["LocalQueue"]} == {cq["metadata"]["name"]}


@pytest.mark.parametrize(
    ("kind", "mutate"),
    [
        ("ResourceFlavor", lambda d: d["spec"].update(nodeLabel=d["spec"].pop("nodeLabels"))),
        ("ClusterQueue", lambda d: d["spec"]["resourceGroups"][0]["flavors"][0]["resources"][0]
            .update(nominalQuotas="1")),
        ("ClusterQueue", lambda d: d["spec"].update(queueingStrategy="FIFO")),
        ("ClusterQueue", lambda d: d["spec"]["resourceGroups"][0]["flavors"][0]["resources"]
            .reverse()),
        ("LocalQueue", lambda d: d["spec"].update(clusterqueue=d["spec"].pop("clusterQueue"))),
    ],
    ids=["misspelt-nodeLabels", "misspelt-nominalQuota", "bad-enum", "resources-out-of-order",
         "misspelt-clusterQueue"],
)  # fmt: skip
def test_the_kueue_schema_catches_mistakes(kind: str, mutate: Any) -> None:
    doc = copy.deepcopy(kueue_docs()[kind][0])
    check_kueue(copy.deepcopy(doc))  # valid as rendered
    mutate(doc)
    with pytest.raises(AssertionError):
        check_kueue(doc)


def test_kueue_is_off_by_default() -> None:
    docs = by_kind(template())
    assert not {"ResourceFlavor", "ClusterQueue", "LocalQueue"} & set(docs)


@pytest.mark.parametrize(
    ("gpu_class", "usable"),
    [("24GB", "l4-24gb, l40s-48gb, h100-80gb"), ("80GB", "h100-80gb")],
)
def test_render_queue_names_the_flavors_kueue_can_admit_the_job_to(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], gpu_class: str, usable: str
) -> None:
    spec = write(tmp_path, edit(spec__resources={"gpu_class": gpu_class}))
    rc, out, err = run(
        capsys, "render", str(spec), "--model-config", "llama-3.1-8b",
        "--queue", "team-a", "--kueue-flavors", str(KUEUE_VALUES),
    )  # fmt: skip
    assert rc == 0, err
    assert f"kueue: the job can use flavors {usable} (class {gpu_class}:" in err, err
    assert "kueue.x-k8s.io/queue-name: team-a" in out


def test_render_queue_refuses_a_job_no_flavor_can_take(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    values = write(
        tmp_path,
        yaml.safe_dump({"kueue": {"flavors": [{"name": "l4", "gpuMemoryMiB": 23034}]}}),
        "values.yaml",
    )
    spec = write(tmp_path, edit(spec__resources={"gpu_class": "80GB"}))
    rc, out, err = run(
        capsys, "render", str(spec), "--model-config", "llama-3.1-8b",
        "--queue", "team-a", "--kueue-flavors", str(values),
    )  # fmt: skip
    assert rc == 2 and out == "" and "--kueue-flavors: no flavor" in err and "l4" in err, err
