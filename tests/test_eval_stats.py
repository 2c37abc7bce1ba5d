"""The evaluation's statistics and gate, against numbers computed by hand."""

from __future__ import annotations

import math

import pytest

from runner.errors import VerificationError
from runner.train.eval_stats import (
    GateRule,
    clopper_pearson,
    compare,
    paired_accuracy_diff,
    paired_diff,
    wilson_interval,
)


@pytest.mark.parametrize(
    ("correct", "n", "low", "high"),
    [
        # p = 0.8, z = 1.959964: centre (0.8 + z^2/20) / (1 + z^2/10) = 0.71669,
        # half = z sqrt(0.016 + z^2/400) / (1 + z^2/10) = 0.22625
        (8, 10, 0.49016, 0.94332),
        (0, 10, 0.0, 0.27754),  # Wilson stays informative at 0 %
        (50, 100, 0.40383, 0.59617),
    ],
    ids=["8-of-10", "0-of-10", "half"],
)
def test_wilson_interval_matches_hand_computation(
    correct: int, n: int, low: float, high: float
) -> None:
    lo, hi = wilson_interval(correct, n, 0.95)
    assert lo == pytest.approx(low, abs=1e-4)
    assert hi == pytest.approx(high, abs=1e-4)


def test_paired_diff_mean_se_and_bounds() -> None:
    d = paired_diff([1.0, 2.0, 3.0, 4.0], 0.95)
    # mean 2.5, sample sd sqrt(5/3), se = sd / 2 = 0.645497
    assert d.mean == pytest.approx(2.5)
    assert d.se == pytest.approx(math.sqrt(5 / 3) / 2)
    assert d.low == pytest.approx(2.5 - 1.959964 * d.se, abs=1e-5)


def _report(base: list[float], adapter: list[float], bc=None, ac=None, rule=None):  # type: ignore[no-untyped-def]
    return compare(
        split="test",
        scoring="choices" if bc is not None else "loss",
        base_nll=base,
        adapter_nll=adapter,
        tokens=[2] * len(base),
        base_correct=bc,
        adapter_correct=ac,
        rule=rule or GateRule(),
    )


def test_loss_is_per_token_and_perplexity_its_exp() -> None:
    r = _report([2.0, 4.0], [1.0, 1.0])
    assert r.base.loss == pytest.approx(6.0 / 4)
    assert r.adapter.perplexity == pytest.approx(math.exp(0.5))


def test_an_adapter_identical_to_the_base_cannot_pass() -> None:
    """An adapter that learned nothing (lr 0): every per-row difference is exactly zero."""
    r = _report([3.0, 2.5, 4.0], [3.0, 2.5, 4.0])
    assert not r.gate_passed
    assert "evaluation.gate.loss" in r.gate_failures[0]
    with pytest.raises(VerificationError, match="quality gate failed: held-out loss"):
        r.raise_if_failed()


def test_noise_level_gain_fails_and_a_clear_gain_passes() -> None:
    noisy = _report([3.0, 2.0, 3.0, 2.0], [2.0, 3.0, 2.9, 2.0])  # mean gain > 0, within noise
    assert noisy.loss_gain.mean > 0 and not noisy.gate_passed
    clear = _report([3.0, 2.9, 3.1, 3.0], [2.0, 2.1, 1.9, 2.0])
    assert clear.gate_passed, clear.gate_failures


def test_accuracy_not_worse_and_improve() -> None:
    base_ok = [True] * 40 + [False] * 60
    worse = [False] * 100
    r = _report([3.0] * 100, [2.0] * 100, base_ok, worse)
    assert r.adapter.accuracy == 0.0 and r.base.accuracy == pytest.approx(0.4)
    assert any("gate.accuracy" in f for f in r.gate_failures)
    # Loss far better, accuracy unchanged: an adapter that learned the answer format only.
    # The default gate ('improve' where answers are scored) refuses it; 'not-worse' lets it by.
    same = _report([3.0] * 100, [2.0] * 100, base_ok, base_ok)
    assert any("evaluation.gate.accuracy: 'improve'" in f for f in same.gate_failures)
    assert _report(
        [3.0] * 100, [2.0] * 100, base_ok, base_ok, GateRule(accuracy="not-worse")
    ).gate_passed


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [(3, 10, 0.066739, 0.652453), (0, 10, 0.0, 0.308497), (10, 10, 0.691503, 1.0)],
    ids=["3-of-10", "none", "all"],
)
def test_clopper_pearson_matches_published_values(k: int, n: int, low: float, high: float) -> None:
    # R: binom.test(k, n)$conf.int
    got = clopper_pearson(k, n)
    assert got == pytest.approx((low, high), abs=1e-6)


@pytest.mark.parametrize(
    ("flips", "passes"),
    [(4, False), (5, False), (6, True)],
    ids=["4-0", "5-0", "6-0"],
)
def test_accuracy_improve_needs_an_exact_sign_test_on_the_flipped_rows(
    flips: int, passes: bool
) -> None:
    """24 rows, ``flips`` wrong->right, none right->wrong. The exact one-sided p-values are
    1/16, 1/32 and 1/64; at 95 % (2.5 % a side) only 6-0 is beyond chance. The normal
    approximation passed 4-0 (mean 0.167, se 0.078: bound +0.014): the defect that let a
    shuffled-answers adapter through on 24 questions."""
    base = [False] * 24
    adapter = [True] * flips + [False] * (24 - flips)
    normal = paired_diff([float(a) - float(b) for a, b in zip(adapter, base, strict=True)])
    assert normal.low > 0  # what the old gate read
    gain = paired_accuracy_diff(adapter, base)
    assert gain.mean == pytest.approx(flips / 24)
    assert (gain.low > 0) is passes
    r = _report([3.0] * 24, [2.0] * 24, base, adapter)
    assert r.gate_passed is passes
