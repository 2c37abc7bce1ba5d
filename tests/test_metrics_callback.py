"""MetricsCallback: what it records from a trainer, and proof that it never syncs the device.

Unit tests drive the callback with plain trainer states and a hand-moved clock. The e2e test
trains the tiny model with the real transformers backend and TRL's SFTTrainer while every
tensor method that would wait for the GPU (``item``, ``tolist``, ``cpu``, ``numpy``, the
number conversions) and ``torch.cuda.synchronize`` are wrapped: the trainer itself calls some
of them (so the trap works), but not one call may come from the metrics code.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import runner.metrics
from runner.metrics import DeviceMemory, RunMetrics
from runner.spec.model import LoraSpec
from runner.train import metrics_callback
from runner.train.backend import BatchShape, Precision, TokenizedExample
from runner.train.metrics_callback import MetricsCallback, TokenCounts

GIB = 1024**3


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def state(step: int, epoch: float, tokens: int = 0, max_steps: int = 10) -> SimpleNamespace:
    return SimpleNamespace(
        global_step=step, epoch=epoch, max_steps=max_steps, num_input_tokens_seen=tokens
    )


def example(n: int, completion_from: int) -> TokenizedExample:
    ids = tuple(range(3, 3 + n))
    mask = tuple(1 if i >= completion_from else 0 for i in range(n))
    return TokenizedExample(ids, mask)


def test_token_counts_from_examples() -> None:
    rows = [example(10, 4), example(6, 0), example(5, 5)]
    counts = TokenCounts.from_examples(rows)
    # row 1: positions 4..9 = 6; row 2: positions 1..5 = 5 (position 0 never carries loss); row 3: 0
    assert counts == TokenCounts(rows=3, tokens=21, loss_tokens=11)
    assert counts.loss_fraction == pytest.approx(11 / 21)
    everything = TokenCounts.from_examples(rows, completion_only=False)
    assert everything.loss_tokens == 9 + 5 + 4
    assert TokenCounts.from_examples([]).loss_fraction == 0.0


def test_progress_throughput_and_eta_from_plain_trainer_state() -> None:
    m, clock = RunMetrics(), Clock()
    counts = TokenCounts(rows=100, tokens=10_000, loss_tokens=4_000)
    cb = MetricsCallback(m, counts, clock=clock, read_memory=list)
    cb.on_train_begin(None, state(0, 0.0), None)
    assert m.value("qlora_train_max_steps") == 10
    for step in range(1, 5):  # 2 s per step, 1,000 tokens (10 rows) per step
        clock.now += 2.0
        cb.on_step_end(None, state(step, step / 10, tokens=1000 * step), None)
    assert m.value("qlora_train_step") == 4
    assert m.value("qlora_train_epoch") == pytest.approx(0.4)
    assert m.value("qlora_train_tokens_total") == 4000
    assert m.value("qlora_train_loss_tokens_total") == pytest.approx(1600)
    assert m.value("qlora_train_samples_total") == pytest.approx(40)
    assert m.value("qlora_train_tokens_per_second") == pytest.approx(500)
    assert m.value("qlora_train_loss_tokens_per_second") == pytest.approx(200)
    assert m.value("qlora_train_samples_per_second") == pytest.approx(5)
    assert m.value("qlora_train_eta_seconds") == pytest.approx(6 * 2.0)
    cb.on_train_end(None, state(10, 1.0, tokens=10_000), None)
    assert m.value("qlora_train_eta_seconds") == 0


def test_tokens_come_from_the_epoch_when_the_trainer_does_not_count_them() -> None:
    m, clock = RunMetrics(), Clock()
    cb = MetricsCallback(m, TokenCounts(rows=8, tokens=800, loss_tokens=200), clock=clock)
    cb.on_train_begin(None, state(0, 0.0), None)
    clock.now += 1.0
    cb.on_step_end(None, state(1, 0.5, tokens=0), None)
    assert m.value("qlora_train_tokens_total") == 400
    assert m.value("qlora_train_loss_tokens_total") == 100


def test_on_log_records_numbers_and_skips_anything_else() -> None:
    m = RunMetrics()
    cb = MetricsCallback(m)
    cb.on_log(None, state(1, 0.1), None, logs={"loss": 2.5, "learning_rate": 1e-4, "grad_norm": 3})
    assert (m.value("qlora_train_loss"), m.value("qlora_train_grad_norm")) == (2.5, 3.0)
    torch = pytest.importorskip("torch")
    cb.on_log(None, state(2, 0.2), None, logs={"loss": torch.tensor(9.0), "grad_norm": True})
    assert m.value("qlora_train_loss") == 2.5  # a tensor is not converted (that would sync)
    assert m.value("qlora_train_grad_norm") == 3.0
    cb.on_log(None, state(3, 0.3), None, logs=None)


def test_memory_is_read_when_training_starts_and_at_most_once_a_second() -> None:
    m, clock = RunMetrics(), Clock()
    reads: list[float] = []

    def read() -> list[DeviceMemory]:
        reads.append(clock.now)
        return [DeviceMemory("cuda:0", 1 * GIB, 2 * GIB, 3 * GIB, 4 * GIB, 24 * GIB)]

    cb = MetricsCallback(m, clock=clock, read_memory=read)
    cb.on_train_begin(None, state(0, 0.0), None)
    for step in range(1, 11):
        clock.now += 0.25
        cb.on_step_end(None, state(step, step / 10), None)
    assert reads == [100.0, 101.0, 102.0]
    assert m.value("qlora_gpu_memory_peak_reserved_bytes", device="cuda:0") == 4 * GIB
    cb.on_train_end(None, state(10, 1.0), None)
    assert reads[-1] == 102.5


def test_no_cuda_means_no_memory_series() -> None:
    # On this CPU machine CUDA was never initialised, so nothing is reported (and nothing
    # initialises it).
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    assert metrics_callback.read_cuda_memory() == []


# --- the no-sync proof ----------------------------------------------------------------------

SYNCING_METHODS = (
    "item",
    "tolist",
    "cpu",
    "numpy",
    "__float__",
    "__int__",
    "__bool__",
    "__index__",
    "__format__",
)
METRICS_FILES = {
    str(Path(metrics_callback.__file__).resolve()),
    str(Path(runner.metrics.__file__).resolve()),
}


class SyncTrap:
    """Wraps device-syncing tensor methods; records calls whose stack passes the metrics code."""

    def __init__(self) -> None:
        self.calls = 0
        self.from_metrics: list[str] = []

    def wrap(self, name: str, original: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            frame = sys._getframe(1)
            while frame is not None:
                if frame.f_code.co_filename in METRICS_FILES:
                    self.from_metrics.append(f"{name} at {frame.f_code.co_name}:{frame.f_lineno}")
                    break
                frame = frame.f_back  # type: ignore[assignment]
            return original(*args, **kwargs)

        return wrapper


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from runner.train.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def sync_trap(monkeypatch: pytest.MonkeyPatch) -> Iterator[SyncTrap]:
    import torch

    trap = SyncTrap()
    for name in SYNCING_METHODS:
        monkeypatch.setattr(torch.Tensor, name, trap.wrap(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.cuda, "synchronize", trap.wrap("synchronize", torch.cuda.synchronize))
    yield trap


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_training_with_the_callback_never_syncs_from_metrics_code(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoTokenizer

    from runner.train.transformers_backend import TransformersBackend

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    examples = []
    for i in range(16):
        prompt = tok(f"question {i}: what is {i} + {i}?", add_special_tokens=False)["input_ids"]
        answer = tok(f" it is {2 * i}.", add_special_tokens=False)["input_ids"]
        ids = tuple(prompt + answer)
        examples.append(TokenizedExample(ids, (0,) * len(prompt) + (1,) * len(answer)))
    counts = TokenCounts.from_examples(examples)
    backend = TransformersBackend()
    session = backend.load(
        tiny_model, Precision("4bit", "float32"), LoraSpec(r=4, alpha=8), seed=0, max_seq_length=64
    )
    metrics = RunMetrics()
    shape = BatchShape(
        micro_batch_size=2,
        gradient_accumulation_steps=2,
        max_seq_length=64,
        max_steps=6,
        optimizer="adamw_torch",
        gradient_checkpointing=False,
        warmup_ratio=0.0,
    )
    import torch

    trap = SyncTrap()
    with monkeypatch.context() as patch:
        for name in SYNCING_METHODS:
            patch.setattr(torch.Tensor, name, trap.wrap(name, getattr(torch.Tensor, name)))
        patch.setattr(torch.cuda, "synchronize", trap.wrap("synchronize", torch.cuda.synchronize))
        outcome = backend.train(
            session, examples, None, shape, [MetricsCallback(metrics, counts)], tmp_path / "out"
        )

    assert trap.calls > 0, "the trap saw nothing: it would not catch a sync either"
    assert trap.from_metrics == []
    # ...and the callback did its job.
    assert metrics.value("qlora_train_step") == outcome.steps == 6
    assert metrics.value("qlora_train_max_steps") == 6
    assert metrics.value("qlora_train_loss") == pytest.approx(outcome.last_loss)
    assert metrics.value("qlora_train_tokens_total") == outcome.train_tokens > 0
    assert metrics.value("qlora_train_samples_total") == pytest.approx(6 * 4, rel=0.2)
    assert (metrics.value("qlora_train_tokens_per_second") or 0) > 0
    assert (metrics.value("qlora_train_learning_rate") or 0) > 0
    assert metrics.value("qlora_train_eta_seconds") == 0


def test_the_trap_catches_a_sync_from_metrics_code(sync_trap: SyncTrap) -> None:
    # The proof above can fail: a callback that converts a logged tensor is caught.
    import torch

    class Converting(MetricsCallback):
        pass

    m = RunMetrics()
    cb = Converting(m)
    metrics_callback_number = metrics_callback._number
    try:
        metrics_callback._number = lambda v: float(v.item()) if hasattr(v, "item") else v  # type: ignore[assignment]
        cb.on_log(None, state(1, 0.1), None, logs={"loss": torch.tensor(1.5)})
    finally:
        metrics_callback._number = metrics_callback_number  # type: ignore[assignment]
    assert sync_trap.from_metrics and sync_trap.from_metrics[0].startswith("item")


@pytest.mark.gpu
# torch warns on every set_sync_debug_mode call that the mode is a prototype (torch 2.11).
@pytest.mark.filterwarnings("ignore:Synchronization debug mode is a prototype:UserWarning")
def test_on_a_gpu_the_callback_reads_memory_without_synchronising() -> None:
    # CUDA's sync debug mode turns any synchronising call into an error. The callback runs
    # under it between steps whose kernels are still in flight, as in a real training loop.
    import torch

    m = RunMetrics()
    cb = MetricsCallback(m, TokenCounts(rows=64, tokens=64 * 512, loss_tokens=64 * 200))
    model = torch.nn.Linear(4096, 4096, device="cuda")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(2048, 4096, device="cuda")
    steps = 20

    def strict(call: Any) -> None:
        torch.cuda.set_sync_debug_mode("error")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")

    with pytest.raises(RuntimeError):  # the mode does catch a synchronising call
        strict(lambda: x.sum().item())
    strict(lambda: cb.on_train_begin(None, state(0, 0.0, max_steps=steps), None))
    for step in range(1, steps + 1):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        st = state(step, step / steps, tokens=512 * 8 * step, max_steps=steps)
        strict(lambda st=st: cb.on_step_end(None, st, None))
        strict(lambda st=st: cb.on_log(None, st, None, logs={"loss": 1.0, "grad_norm": 0.5}))
    strict(lambda: cb.on_train_end(None, state(steps, 1.0, max_steps=steps), None))
    torch.cuda.synchronize()

    device = "cuda:0"
    allocated = m.value("qlora_gpu_memory_allocated_bytes", device=device) or 0
    assert allocated >= (2048 * 4096 + 4096 * 4096) * 4  # at least the input and the weight
    assert (m.value("qlora_gpu_memory_peak_allocated_bytes", device=device) or 0) >= allocated
    assert (m.value("qlora_gpu_memory_reserved_bytes", device=device) or 0) >= allocated
    total = torch.cuda.get_device_properties(0).total_memory
    assert m.value("qlora_gpu_memory_total_bytes", device=device) == total
    assert m.value("qlora_train_step") == steps
