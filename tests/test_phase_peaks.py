"""The phase records carry the CUDA allocator's peaks as each phase ends (runner/recipe.py).

The planner's estimate is of the training phase's peak; the whole-process peak gauge also spans
the verification reload and the evaluation. Logging the peaks at each phase change is what lets
the speed bench compare the estimate with the phase it sizes (bench/speed_data.py)."""

from __future__ import annotations

import logging
import sys
from types import SimpleNamespace

import pytest

import runner.train.metrics_callback  # noqa: F401  (imported before torch is faked)
from runner import recipe
from runner.recipe import Phase, _device_peaks, _PhaseTracker


class _FakeCuda:
    def __init__(self, initialized: bool) -> None:
        self.initialized = initialized
        self.reserved = 0
        self.allocated = 0

    def is_initialized(self) -> bool:
        return self.initialized

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def memory_reserved(self, i: int) -> int:
        return self.reserved

    def memory_allocated(self, i: int) -> int:
        return self.allocated

    def max_memory_reserved(self, i: int) -> int:
        return self.reserved

    def max_memory_allocated(self, i: int) -> int:
        return self.allocated

    def get_device_properties(self, i: int) -> SimpleNamespace:
        return SimpleNamespace(total_memory=80 << 30)


def test_no_peaks_before_cuda_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=_FakeCuda(False)))
    assert _device_peaks("training") == {}
    monkeypatch.setitem(sys.modules, "torch", None)  # torch absent: import torch fails
    assert _device_peaks("training") == {}


def test_a_failing_reading_never_fails_the_phase_change(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = _FakeCuda(True)
    cuda.max_memory_reserved = lambda i: 1 / 0  # type: ignore[method-assign]
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    assert _device_peaks("training") == {}


def test_each_phase_record_names_the_peaks_of_the_phase_that_ended(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cuda = _FakeCuda(True)
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    seen: list[Phase] = []
    tracker = _PhaseTracker([seen.append])
    with caplog.at_level(logging.INFO, logger=recipe.log.name):
        tracker.enter(Phase.LOADING)
        cuda.reserved, cuda.allocated = 7 << 30, 6 << 30
        tracker.enter(Phase.TRAINING)
        cuda.reserved, cuda.allocated = 19 << 30, 18 << 30
        tracker.enter(Phase.VERIFYING)
        cuda.reserved = 21 << 30  # the reload raised the process peak
        tracker.enter(Phase.EVALUATING)
    records = [r for r in caplog.records if getattr(r, "phase", None)]
    assert [r.phase for r in records] == ["loading", "training", "verifying", "evaluating"]
    assert not hasattr(records[0], "loading_peak_reserved_bytes")
    assert records[1].loading_peak_reserved_bytes == 7 << 30
    assert records[2].training_peak_reserved_bytes == 19 << 30
    assert records[2].training_peak_allocated_bytes == 18 << 30
    assert records[3].verifying_peak_reserved_bytes == 21 << 30
    assert isinstance(records[2].training_s, float)
    assert seen == [Phase.LOADING, Phase.TRAINING, Phase.VERIFYING, Phase.EVALUATING]
