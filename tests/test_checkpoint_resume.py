"""Resume on the real training path: the tiny model trains 4-bit QLoRA on the CPU in-process.

A run is preempted by a real SIGTERM (sent to this process from a trainer callback), the
checkpoint lands in storage, and a second run of the same spec resumes from it. The step count
continues, the loss curve is an uninterrupted run's, step for step (after an out-of-memory
re-plan of the batch shape: no jump beyond noise), the published adapter has the same tensor
dtypes as an uninterrupted run's, and a damaged newest checkpoint makes the resume fall back to
the previous one.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

from runner.checkpoints import step_name
from runner.deadline import POD_NAME_ENV
from runner.errors import OutOfMemoryError, PreemptedError
from runner.recipe import Phase, RunResult, run
from runner.settings import Settings
from runner.storage.commit import MANIFEST_NAME
from tests.conftest import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

STEPS = 12
EVERY = 4
PREEMPT_AT = 6


def write_spec(tmp_path: Path, model: Path, store: Path, **training: Any) -> Path:
    """The shipped tiny example with this test's model, data, store and schedule."""
    doc = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text(encoding="utf-8"))
    body = doc["spec"]
    body["model"]["source"] = str(model)
    body["dataset"]["sources"] = [str(REPO / "examples" / "data" / "antonyms-chat.jsonl")]
    body["training"].update(
        max_steps=STEPS, checkpoint_every_steps=EVERY, logging_steps=1, **training
    )
    body["output"]["uri"] = f"file://{store}"
    body["metrics"] = {"enabled": False}
    path = tmp_path / f"job-{store.name}.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def at_step(step: int, action: Any) -> Any:
    """A trainer callback that calls ``action()`` at the end of optimizer step ``step``."""
    from transformers import TrainerCallback

    class AtStep(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == step:
                action()

    return AtStep()


def sigterm_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def checkpoint_dirs(store: Path) -> dict[int, Path]:
    """Committed checkpoints in a file:// store, by step."""
    found = {}
    for manifest in store.glob(f"checkpoints/*/step-*/{MANIFEST_NAME}"):
        found[int(manifest.parent.name.removeprefix("step-"))] = manifest.parent
    return found


def losses(result: Any) -> list[float]:
    curve = result.metadata["training"]["loss_curve"]
    assert len(curve) == STEPS, curve
    return [float(x) for x in curve]


def safetensors_dtypes(path: Path) -> dict[str, str]:
    """Tensor name -> dtype (``BF16``, ``F32``...) from a safetensors file's JSON header."""
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return {name: entry["dtype"] for name, entry in header.items() if name != "__metadata__"}


def published_dtypes(result: RunResult) -> dict[str, str]:
    """Dtypes of the adapter a run published to its file:// store."""
    run_dir = Path(result.run_uri.removeprefix("file://"))
    return safetensors_dtypes(run_dir / "adapter_model.safetensors")


@pytest.fixture(autouse=True)
def _in_a_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    """These runs simulate a pod, where a SIGTERM is preemption (exit 7)."""
    monkeypatch.setenv(POD_NAME_ENV, "tiny-run-0")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(work_dir=str(tmp_path / "work"))


@pytest.fixture(scope="module")
def baseline_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    """An uninterrupted run of the same schedule."""
    tmp = tmp_path_factory.mktemp("baseline")
    spec = write_spec(tmp, tiny_model_dir, tmp / "store-a")
    result = run(str(spec), settings=Settings(work_dir=str(tmp / "work")))
    assert result.metadata["training"]["steps"] == STEPS
    assert result.metadata["checkpoints"]["resumed_from_step"] is None
    return result


@pytest.fixture(scope="module")
def baseline(baseline_run: RunResult) -> list[float]:
    """Per-step losses of the uninterrupted run."""
    return losses(baseline_run)


def test_sigterm_checkpoints_and_resume_continues_the_loss_curve(
    tiny_model_dir: Path, tmp_path: Path, settings: Settings, baseline: list[float]
) -> None:
    store = tmp_path / "store-b"
    spec = write_spec(tmp_path, tiny_model_dir, store)
    with pytest.raises(PreemptedError, match=f"at step {PREEMPT_AT}/{STEPS}"):
        run(str(spec), settings=settings, callbacks=[at_step(PREEMPT_AT, sigterm_self)])
    assert sorted(checkpoint_dirs(store)) == [EVERY, PREEMPT_AT]
    assert not (store / "runs").exists()  # nothing published by the preempted run
    saved = checkpoint_dirs(store)[PREEMPT_AT]
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        assert (saved / name).is_file(), name
    state = json.loads((saved / "trainer_state.json").read_text())
    assert state["global_step"] == PREEMPT_AT

    seen: list[int] = []
    resumed = run(
        str(spec),
        settings=settings,
        callbacks=[at_step(STEPS, lambda: seen.append(STEPS))],
    )
    training = resumed.metadata["training"]
    assert training["steps"] == STEPS
    assert resumed.metadata["checkpoints"]["resumed_from_step"] == PREEMPT_AT
    assert resumed.metadata["checkpoints"]["committed_steps"] == [8, 12]
    assert seen == [STEPS]
    curve = losses(resumed)
    # The resumed steps are the same computation as the baseline's: the checkpoint restores
    # the LoRA weights in the dtype they were trained in, the optimizer state and the RNG.
    assert curve == pytest.approx(baseline, abs=1e-6)
    # Published, and only the newest checkpoint is kept.
    assert (Path(resumed.manifest_uri.removeprefix("file://"))).is_file()
    assert sorted(checkpoint_dirs(store)) == [STEPS]


def test_resumed_run_publishes_the_adapter_in_the_uninterrupted_runs_dtypes(
    tiny_model_dir: Path, tmp_path: Path, settings: Settings, baseline_run: RunResult
) -> None:
    """Loading a checkpoint must not upcast the LoRA weights (peft's ``load_adapter`` makes
    bfloat16 float32): a preempted-and-resumed run, and a rerun that only reloads the final
    checkpoint, publish the tensors in the dtypes an uninterrupted run does."""
    expected = published_dtypes(baseline_run)
    assert set(expected.values()) == {"BF16"}  # TRL trains QLoRA adapters in bfloat16
    store = tmp_path / "store-g"
    spec = write_spec(tmp_path, tiny_model_dir, store)
    with pytest.raises(PreemptedError):
        run(str(spec), settings=settings, callbacks=[at_step(PREEMPT_AT, sigterm_self)])

    resumed = run(str(spec), settings=settings)
    assert resumed.metadata["checkpoints"]["resumed_from_step"] == PREEMPT_AT
    assert published_dtypes(resumed) == expected
    # The checkpoint the resumed run committed is what the next restart would load.
    final = checkpoint_dirs(store)[STEPS] / "adapter_model.safetensors"
    assert safetensors_dtypes(final) == expected

    rerun = run(str(spec), settings=settings)  # nothing left to train: loads the final one
    assert rerun.metadata["checkpoints"]["resumed_from_step"] == STEPS
    assert published_dtypes(rerun) == expected


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(
    tiny_model_dir: Path, tmp_path: Path, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    store = tmp_path / "store-c"
    spec = write_spec(tmp_path, tiny_model_dir, store)
    with pytest.raises(PreemptedError):
        run(str(spec), settings=settings, callbacks=[at_step(PREEMPT_AT, sigterm_self)])
    newest = checkpoint_dirs(store)[PREEMPT_AT]
    optimizer = newest / "optimizer.pt"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    optimizer.write_bytes(bytes(data))

    resumed = run(str(spec), settings=settings)
    assert resumed.metadata["checkpoints"]["resumed_from_step"] == EVERY
    assert resumed.metadata["training"]["steps"] == STEPS
    assert any(
        "skipping checkpoint step 6" in r.getMessage() and "sha256" in r.getMessage()
        for r in caplog.records
    )
    assert step_name(PREEMPT_AT) in str(newest)


def test_sigterm_before_training_exits_preempted_at_once(
    tiny_model_dir: Path, tmp_path: Path, settings: Settings
) -> None:
    store = tmp_path / "store-d"
    spec = write_spec(tmp_path, tiny_model_dir, store)

    def on_phase(phase: Phase) -> None:
        if phase is Phase.PREFLIGHT:
            sigterm_self()

    with pytest.raises(PreemptedError, match="during preflight"):
        run(str(spec), settings=settings, on_phase=[on_phase])
    assert not store.exists() or not any(store.rglob(MANIFEST_NAME))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(
        signal.getsignal(signal.SIGTERM)
    )


def test_cuda_out_of_memory_is_exit_6_with_the_batch_shape(
    tiny_model_dir: Path, tmp_path: Path, settings: Settings
) -> None:
    import torch

    def oom() -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    spec = write_spec(tmp_path, tiny_model_dir, tmp_path / "store-e")
    with pytest.raises(OutOfMemoryError) as info:
        run(str(spec), settings=settings, callbacks=[at_step(2, oom)])
    assert info.value.exit_code == 6
    assert "micro batch 8 x accumulation 1" in info.value.message
    assert "Tried to allocate 2.00 GiB" in info.value.message


def test_replanned_batch_shape_resumes_from_the_checkpoint(
    tiny_model_dir: Path, tmp_path: Path, settings: Settings, baseline: list[float]
) -> None:
    """After an out-of-memory re-plan (half the micro batch, double the accumulation) the new
    attempt resumes from the last checkpoint: same data position, no jump in the loss."""
    store = tmp_path / "store-f"
    spec = write_spec(tmp_path, tiny_model_dir, store)
    with pytest.raises(PreemptedError):
        run(str(spec), settings=settings, callbacks=[at_step(PREEMPT_AT, sigterm_self)])
    doc = yaml.safe_load(spec.read_text())
    doc["spec"]["training"].update(micro_batch_size=4, gradient_accumulation_steps=2)
    replanned = tmp_path / "job-replanned.yaml"
    replanned.write_text(yaml.safe_dump(doc), encoding="utf-8")

    resumed = run(str(replanned), settings=settings)
    assert resumed.metadata["checkpoints"]["resumed_from_step"] == PREEMPT_AT
    assert resumed.metadata["training"]["micro_batch_size"] == 4
    assert resumed.metadata["training"]["steps"] == STEPS
    curve = losses(resumed)
    noise = max(abs(a - b) for a, b in zip(baseline[1:], baseline[:-1], strict=False))
    after = [abs(c - b) for c, b in zip(curve[PREEMPT_AT:], baseline[PREEMPT_AT:], strict=True)]
    assert max(after) < 0.05 * noise, (after, noise)
