"""The statistics of an evaluation, and the quality gate that reads them. Pure Python.

Base and adapter are scored on the same held-out rows, so every comparison is *paired*: the
per-row difference (base loss - adapter loss, or adapter correct - base correct) has far less
noise than the two numbers apart. The gate asks whether the mean difference is above zero by
more than chance allows at ``confidence``, which an adapter that learned nothing cannot do:
its differences are zero or noise around zero.

* Loss: the normal-approximation bound of the mean per-row gain.
* Accuracy: an exact bound. Only the rows where the two disagree carry information (b rows
  right only with the adapter, c only with the base); under "no difference" b is
  Binomial(b + c, 1/2) (McNemar's exact test). The bound on the accuracy gain is
  ``(b + c) / n * (2 p - 1)`` for the Clopper-Pearson bounds ``p`` of ``b / (b + c)``. The
  normal approximation used before was anti-conservative exactly where it mattered: with 24
  rows, 4 flips to right and none to wrong passed 'improve' at "95 %" although the exact
  one-sided p-value is 1/16.
* Accuracy alone gets a Wilson score interval (it behaves near 0 % and 100 %, where the normal
  interval does not).

Why the default gate asks for accuracy to *improve* where answers are scored: the held-out
loss of an answer includes its format tokens (on QuaRTz the letter, ``<|im_end|>`` and the
newline), and any adapter that learns the format - one trained on shuffled answers too -
lowers that loss far beyond noise; accuracy "not worse" is met by any adapter at chance when
the base is at chance. Only the score says whether the answers got better.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

from runner.errors import VerificationError


def z_value(confidence: float) -> float:
    """Two-sided normal quantile: 1.96 for 0.95."""
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``correct / n`` (``(0, 1)`` when ``n`` is 0)."""
    if n <= 0:
        return 0.0, 1.0
    z = z_value(confidence)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class PairedDiff:
    """Mean of per-row differences with its standard error and confidence interval.

    Attributes:
        mean: Mean difference (positive = the adapter is better).
        se: Standard error of the mean (sample standard deviation / sqrt n; 0 for n < 2).
        low: Lower confidence bound.
        high: Upper confidence bound.
        n: Rows.
    """

    mean: float
    se: float
    low: float
    high: float
    n: int


def paired_diff(diffs: Sequence[float], confidence: float = 0.95) -> PairedDiff:
    """Mean, standard error and normal-approximation interval of paired differences."""
    n = len(diffs)
    if n == 0:
        return PairedDiff(0.0, 0.0, 0.0, 0.0, 0)
    mean = math.fsum(diffs) / n
    var = math.fsum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    se = math.sqrt(var / n)
    z = z_value(confidence)
    return PairedDiff(mean, se, mean - z * se, mean + z * se, n)


def _log_binom_pmf(k: int, n: int, p: float) -> float:
    if p <= 0.0:
        return 0.0 if k == 0 else -math.inf
    if p >= 1.0:
        return 0.0 if k == n else -math.inf
    return (
        math.lgamma(n + 1)
        - math.lgamma(k + 1)
        - math.lgamma(n - k + 1)
        + k * math.log(p)
        + (n - k) * math.log1p(-p)
    )


def _binom_tail_ge(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return min(1.0, math.fsum(math.exp(_log_binom_pmf(i, n, p)) for i in range(k, n + 1)))


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval of a proportion ``k / n`` (``(0, 1)`` when n is 0)."""
    if n <= 0:
        return 0.0, 1.0
    alpha = (1 - confidence) / 2

    def solve(target: Any, rising: bool) -> float:
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if (target(mid) < alpha) == rising:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    # lower: P(X >= k | p) = alpha (rises with p); upper: P(X <= k | p) = alpha (falls with p)
    low = 0.0 if k == 0 else solve(lambda p: _binom_tail_ge(k, n, p), True)
    high = 1.0 if k == n else solve(lambda p: 1 - _binom_tail_ge(k + 1, n, p), False)
    return low, high


def paired_accuracy_diff(
    adapter_correct: Sequence[bool], base_correct: Sequence[bool], confidence: float = 0.95
) -> PairedDiff:
    """Accuracy gain (adapter - base) with exact bounds from the discordant rows (McNemar).

    ``se`` is the usual standard error of the mean difference (for display); ``low`` and
    ``high`` are ``(b + c) / n * (2 p - 1)`` at the Clopper-Pearson bounds of ``b / (b + c)``.
    """
    n = len(adapter_correct)
    if n == 0:
        return PairedDiff(0.0, 0.0, 0.0, 0.0, 0)
    pairs = list(zip(adapter_correct, base_correct, strict=True))
    b = sum(1 for a, o in pairs if a and not o)
    c = sum(1 for a, o in pairs if o and not a)
    normal = paired_diff([float(a) - float(o) for a, o in pairs], confidence)
    m = b + c
    if m == 0:
        return PairedDiff(0.0, 0.0, 0.0, 0.0, n)
    p_low, p_high = clopper_pearson(b, m, confidence)
    return PairedDiff(normal.mean, normal.se, m / n * (2 * p_low - 1), m / n * (2 * p_high - 1), n)


@dataclass(frozen=True)
class ModelScores:
    """One model's numbers on the held-out rows.

    Attributes:
        loss: Mean negative log-likelihood per completion token (nats).
        perplexity: ``exp(loss)``.
        tokens: Completion tokens scored.
        rows: Rows scored.
        accuracy: Fraction answered correctly, or None where nothing is scored.
        correct: Rows answered correctly (0 when not scored).
        scored_rows: Rows with an answer to score.
        accuracy_low: Wilson lower bound.
        accuracy_high: Wilson upper bound.
    """

    loss: float
    perplexity: float
    tokens: int
    rows: int
    accuracy: float | None = None
    correct: int = 0
    scored_rows: int = 0
    accuracy_low: float | None = None
    accuracy_high: float | None = None


def model_scores(
    row_nll: Sequence[float],
    row_tokens: Sequence[int],
    correct: Sequence[bool] | None,
    confidence: float,
) -> ModelScores:
    """Aggregate per-row summed NLL, token counts and correctness."""
    tokens = sum(row_tokens)
    loss = math.fsum(row_nll) / tokens if tokens else float("nan")
    acc = low = high = None
    k = n = 0
    if correct is not None and len(correct):
        n, k = len(correct), sum(bool(c) for c in correct)
        acc = k / n
        low, high = wilson_interval(k, n, confidence)
    ppl = math.exp(loss) if math.isfinite(loss) and loss < 700 else float("inf")
    return ModelScores(loss, ppl, tokens, len(row_tokens), acc, k, n, low, high)


@dataclass(frozen=True)
class GateRule:
    """What the gate requires (``spec.evaluation.gate``).

    Attributes:
        loss: 'improve' (the adapter's held-out loss is lower than the base's beyond noise),
            'not-worse' (not higher beyond noise) or 'ignore'.
        accuracy: Same choices, for accuracy where answers are scored.
        confidence: Confidence level of the bounds.
    """

    loss: str = "improve"
    accuracy: str = "improve"
    confidence: float = 0.95


def gate_failures(
    loss_gain: PairedDiff, accuracy_gain: PairedDiff | None, rule: GateRule
) -> list[str]:
    """The gate's failing lines; empty when it passes.

    ``loss_gain`` is base loss - adapter loss per row (positive = better); ``accuracy_gain``
    is adapter correct - base correct per scored row.
    """
    pct = f"{rule.confidence:.0%}"
    out: list[str] = []
    checks: list[tuple[str, str, PairedDiff | None, str]] = [
        ("loss", rule.loss, loss_gain, "nats/token"),
        ("accuracy", rule.accuracy, accuracy_gain, "points"),
    ]
    for name, mode, diff, unit in checks:
        if mode == "ignore" or diff is None or diff.n == 0:
            continue
        scale = 100.0 if name == "accuracy" else 1.0
        shown = (
            f"adapter - base {name} gain {scale * diff.mean:+.4g} {unit} "
            f"({pct} bound {scale * diff.low:+.4g} .. {scale * diff.high:+.4g}, n {diff.n})"
        )
        if mode == "improve" and not diff.low > 0:
            out.append(f"evaluation.gate.{name}: 'improve' needs a gain above noise; {shown}")
        elif mode == "not-worse" and diff.high < 0:
            out.append(f"evaluation.gate.{name}: 'not-worse' failed, worse beyond noise; {shown}")
    return out


@dataclass(frozen=True)
class EvalReport:
    """Base versus adapter on the same rows, and the gate's verdict."""

    split: str
    rows: int
    scoring: str
    base: ModelScores
    adapter: ModelScores
    loss_gain: PairedDiff
    accuracy_gain: PairedDiff | None
    gate: GateRule
    gate_passed: bool
    gate_failures: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for the manifest, the logs and ``qlora eval --json``."""
        return {
            "split": self.split,
            "rows": self.rows,
            "scoring": self.scoring,
            "base": asdict(self.base),
            "adapter": asdict(self.adapter),
            "loss_gain": asdict(self.loss_gain),
            "accuracy_gain": asdict(self.accuracy_gain) if self.accuracy_gain else None,
            "gate": {
                **asdict(self.gate),
                "passed": self.gate_passed,
                "failures": list(self.gate_failures),
            },
        }

    def summary(self) -> str:
        """One line with the numbers (logs, the termination message)."""
        line = (
            f"held-out loss base {self.base.loss:.4f} -> adapter {self.adapter.loss:.4f} "
            f"(ppl {self.base.perplexity:.3g} -> {self.adapter.perplexity:.3g}, {self.rows} rows)"
        )
        if self.base.accuracy is not None and self.adapter.accuracy is not None:
            a = self.adapter
            line += (
                f"; accuracy {100 * self.base.accuracy:.1f}% -> {100 * (a.accuracy or 0):.1f}%"
                f" (adapter {self.gate.confidence:.0%} CI {100 * (a.accuracy_low or 0):.1f}"
                f"-{100 * (a.accuracy_high or 0):.1f}%)"
            )
        return line

    def raise_if_failed(self) -> None:
        """Raise the gate's failure (exit code 4) with the numbers in the message."""
        if not self.gate_passed:
            raise VerificationError(
                f"quality gate failed: {self.summary()}; nothing was published",
                details=list(self.gate_failures),
            )


def compare(
    *,
    split: str,
    scoring: str,
    base_nll: Sequence[float],
    adapter_nll: Sequence[float],
    tokens: Sequence[int],
    base_correct: Sequence[bool] | None,
    adapter_correct: Sequence[bool] | None,
    rule: GateRule,
) -> EvalReport:
    """Build the report from per-row numbers (summed NLL per row, tokens per row)."""
    c = rule.confidence
    base = model_scores(base_nll, tokens, base_correct, c)
    adapter = model_scores(adapter_nll, tokens, adapter_correct, c)
    per_row = zip(base_nll, adapter_nll, tokens, strict=True)
    loss_gain = paired_diff([(b - a) / t for b, a, t in per_row if t], c)
    acc_gain = None
    if base_correct is not None and adapter_correct is not None and len(base_correct):
        acc_gain = paired_accuracy_diff(adapter_correct, base_correct, c)
    failures = gate_failures(loss_gain, acc_gain, rule)
    return EvalReport(
        split,
        len(tokens),
        scoring,
        base,
        adapter,
        loss_gain,
        acc_gain,
        rule,
        not failures,
        tuple(failures),
    )
