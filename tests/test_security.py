"""Security: credentials stay out of specs, rendered objects, logs, manifests and metrics;
object keys cannot escape their prefix; only allow-listed URI schemes; no remote code unless
the spec asks for it, and then the plan says so.

The end-to-end check runs a real ``qlora run`` with S3 credentials and planted tokens in its
environment, writing to SeaweedFS and pushing metrics to a real Pushgateway, and greps
everything it produced: stdout, stderr (debug level), the termination message, every object
in the bucket (adapter, checkpoints, manifests) and every pushed metric label and value.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.checkpoints import CHECKPOINTS_DIR, CheckpointStore
from runner.cli import main
from runner.errors import ExitCode, SpecError
from runner.spec import json_schema, load_spec_text, validate_document
from runner.storage.keys import UnsafeKeyError, check_key, join_key, parse_uri
from tests.fixtures.qlora_process import run_env, started, tiny_spec
from tests.fixtures.s3 import S3Bucket

SECRET_NAMES = ("secret", "password", "token", "credential", "access_key", "private_key")

BASE = """
apiVersion: qlora-runner.io/v1alpha1
kind: FineTuneJob
metadata: {name: sec}
spec:
  model: {source: s3://models/llama}
  dataset: {sources: [s3://data/train.jsonl]}
  output: {uri: s3://adapters/sec}
"""


def _doc(**spec_overrides: Any) -> dict[str, Any]:
    doc = yaml.safe_load(BASE)
    for path, value in spec_overrides.items():
        section, _, field = path.partition("__")
        doc["spec"][section][field] = value
    return dict(doc)


def _property_names(node: Any) -> set[str]:
    names: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "properties" and isinstance(value, dict):
                names |= {k.lower() for k in value}
            names |= _property_names(value)
    elif isinstance(node, list):
        for item in node:
            names |= _property_names(item)
    return names


def test_the_spec_has_no_field_for_a_credential() -> None:
    names = _property_names(json_schema())
    assert not [n for n in names if any(s in n for s in SECRET_NAMES)], names


@pytest.mark.parametrize(
    "field",
    ["output__uri", "model__source", "dataset__sources"],
)
def test_credentials_in_a_uri_are_refused_and_not_echoed(field: str) -> None:
    secret = "s3cr3t-" + secrets.token_hex(8)
    uri = f"s3://AKIAIOSFODNN7EXAMPLE:{secret}@bucket/prefix"
    with pytest.raises(SpecError) as info:
        validate_document(_doc(**{field: [uri] if field.endswith("sources") else uri}))
    assert secret not in "\n".join(info.value.lines())


@pytest.mark.parametrize(
    "uri",
    [
        "http://bucket/out",
        "https://bucket/out",
        "gs://bucket/out",
        "ftp://host/out",
        "file:/etc",
        "s3:/bucket",
        "S3://bucket/out",
        "s3://bucket/../../etc",
        "s3://bucket/a//b",
        "file://../../etc",
        "file:///data/../etc",
        "/abs/path",
    ],
)
def test_output_uri_allow_list(uri: str) -> None:
    with pytest.raises(SpecError):
        validate_document(_doc(output__uri=uri))


@pytest.mark.parametrize(
    "key",
    ["../x", "a/../../x", "/etc/passwd", "a\\..\\b", "a/./b", "a//b", "a\x00b", "a/\nb"],
)
def test_unsafe_keys_are_refused(key: str) -> None:
    with pytest.raises(UnsafeKeyError):
        check_key(key)
    try:
        joined = join_key("runs", key)
    except UnsafeKeyError:
        return
    # Accepted only by dropping edge slashes: the result stays under the first part.
    assert joined.startswith("runs/") and ".." not in joined.split("/")


_segment = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=st.lists(_segment, min_size=0, max_size=4))
def test_checkpoint_keys_stay_under_the_output_prefix(prefix: list[str]) -> None:
    """Whatever output prefix a spec names, every accepted one keeps checkpoint keys (and so
    ``file://`` paths) inside ``<output>/checkpoints/<training hash>/``; the rest are refused.
    (Each example opens a real S3 client, hence fewer examples than the pure key tests.)"""
    from runner.settings import Settings

    uri = "s3://bucket/" + "/".join(prefix)
    try:
        parsed = parse_uri(uri)
    except UnsafeKeyError:
        return
    ck = CheckpointStore.open(uri, {"training_hash": "ab" * 32}, Settings())
    expected = join_key(parsed.key, CHECKPOINTS_DIR, "ab" * 32)
    assert ck.root == expected
    for part in ck.root.split("/"):
        assert part not in ("", ".", "..")
    assert not ck.root.startswith("/")
    assert ck.step_uri(7).startswith(f"s3://bucket/{expected}/step-")


def test_trust_remote_code_is_off_by_default_and_the_plan_says_when_on(tmp_path: Path) -> None:
    from runner.plan import make_plan
    from runner.settings import Settings

    off = load_spec_text(BASE)
    assert off.spec.model.trust_remote_code is False
    shape = {"model_config": _llama_config()}
    plan_off = make_plan(off, Settings(), **shape)
    assert plan_off.trust_remote_code is False
    assert not any("trust_remote_code" in r for r in plan_off.reasons)
    on = validate_document(_doc(model__trust_remote_code=True))
    plan_on = make_plan(on, Settings(), **shape)
    assert plan_on.trust_remote_code is True
    assert any("trust_remote_code is ON" in r for r in plan_on.reasons)


def _llama_config() -> dict[str, Any]:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "torch_dtype": "bfloat16",
    }


def test_model_code_is_not_run_without_trust_remote_code(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A model folder that ships Python code (``auto_map``) is loaded with the library's own
    classes, never by importing the shipped code, when trust_remote_code is off."""
    import shutil

    from runner.spec.model import LoraSpec
    from runner.train.backend import Precision
    from runner.train.model_files import load_tokenizer
    from runner.train.transformers_backend import TransformersBackend

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    marker = tmp_path / "remote-code-ran"
    (model / "evil_modeling.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaForCausalLM as EvilForCausalLM\n"
    )
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {
        "AutoModelForCausalLM": "evil_modeling.EvilForCausalLM",
        "AutoConfig": "evil_modeling.EvilConfig",
    }
    (model / "config.json").write_text(json.dumps(config))
    try:
        load_tokenizer(model, False)
        TransformersBackend().load(
            model, Precision("4bit", "float32"), LoraSpec(r=4, alpha=8), seed=0, max_seq_length=64
        )
    except SpecError:
        pass  # refusing to load is as good as loading without the code
    assert not marker.exists()


# --- end to end: grep everything a real run produced -------------------------------------


@pytest.mark.integration
@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_no_credential_reaches_logs_objects_or_metrics(
    tiny_model_dir: Path, tmp_path: Path, s3_bucket: S3Bucket, pushgateway: Any
) -> None:
    server = s3_bucket.server
    planted = {
        "HF_TOKEN": "hf_" + secrets.token_hex(20),
        "GITHUB_TOKEN": "ghp_" + secrets.token_hex(18),
        "QLORA_TEST_PLANTED_PASSWORD": "pw-" + secrets.token_hex(12),
    }
    needles = {server.secret_key, server.access_key, *planted.values()}
    spec = tiny_spec(tmp_path / "job.yaml", tiny_model_dir, f"{s3_bucket.uri}/sec", steps=4)
    doc = yaml.safe_load(spec.read_text())
    doc["spec"]["metrics"] = {
        "enabled": True,
        "port": _free_port(),
        "pushgateway_url": pushgateway.url,
    }
    spec.write_text(yaml.safe_dump(doc))
    # The spec, as written and as rendered for the cluster, holds none of them.
    assert not [n for n in needles if n in spec.read_text()]
    term = tmp_path / "termination-log"
    env = run_env(
        server.subprocess_env(**planted),
        tmp_path / "work",
        term,
        QLORA_METRICS_BIND_ADDRESS="127.0.0.1",
    )
    with started(spec, env, tmp_path, "-v") as run:  # debug records too
        rc = run.finish(400)
    assert rc == ExitCode.OK, run.text[-3000:]
    produced = {
        "stdout": run.stdout,
        "stderr": run.text,
        "termination": term.read_text(),
        "pushgateway": _http_get(f"{pushgateway.url}/metrics"),
    }
    objects = s3_bucket.keys("sec/")
    assert any("/checkpoints/" in k for k in objects) and any("/runs/" in k for k in objects)
    for key in objects:
        produced[f"s3://{s3_bucket.name}/{key}"] = s3_bucket.get(key).decode("latin-1")
    pushed = produced["pushgateway"]
    assert "qlora_" in pushed, "the run must have pushed its metrics"
    assert re.search(r"^qlora_checkpoint_last_step\{[^}]*\} 4(\.0)?$", pushed, re.M), pushed
    assert re.search(r"^qlora_resumed_from_step\{[^}]*\} 0(\.0)?$", pushed, re.M)
    leaks = [(where, n[:6]) for where, text in produced.items() for n in needles if n in text]
    assert not leaks, leaks


def test_render_prints_no_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = "wJalrXUtnFEMI/K7MDENG/" + secrets.token_hex(8)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("HF_TOKEN", "hf_" + secrets.token_hex(20))
    spec = tmp_path / "job.yaml"
    spec.write_text(BASE)
    rc = main(["render", str(spec), "--model-config", "llama-3.1-8b"])
    out = capsys.readouterr().out
    assert rc == ExitCode.OK
    assert "ConfigMap" in out and "Job" in out
    for needle in (secret, "AKIAIOSFODNN7EXAMPLE", os.environ["HF_TOKEN"]):
        assert needle not in out


def _free_port() -> int:
    from tests.fixtures.s3 import free_port

    return free_port()


def _http_get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())
