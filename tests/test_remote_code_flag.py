"""``trust_remote_code: true`` is loud: `qlora run` warns (structured), the manifest says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from runner import cli
from tests.conftest import REPO
from tests.fixtures.tiny_model import need_train_extra

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def test_remote_code_is_logged_and_recorded(
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    need_train_extra()
    trust = True  # off is checked by tests/test_train_e2e.py (manifest says false, no warning)
    monkeypatch.setenv("QLORA_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    doc = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text(encoding="utf-8"))
    body = doc["spec"]
    body["model"]["source"] = str(tiny_model_dir)
    body["model"]["trust_remote_code"] = trust
    body["dataset"]["sources"] = [str(REPO / "examples" / "data" / "antonyms-chat.jsonl")]
    body["dataset"]["eval_fraction"] = 0.0
    body["training"]["max_steps"] = 2
    body["output"]["uri"] = f"file://{tmp_path}/store"
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(doc), encoding="utf-8")

    rc = cli.main(["--log-format", "json", "run", "--spec", str(spec)])
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    warned = [r for r in records if r.get("trust_remote_code") is True]
    assert warned and warned[0]["level"] == "warning", records[:5]
    assert "will run in this process" in warned[0]["msg"]
    manifest = json.loads(Path(summary["manifest_uri"].removeprefix("file://")).read_text())
    assert manifest["base_model"]["trust_remote_code"] is trust
