"""Dynamic 4-bit: which linear modules stay in 16 bit, and the budget they may spend. Pure.

``quantization.mode: dynamic-4bit`` on a 16-bit checkpoint quantizes the decoder's linear
modules to nf4 except the most sensitive ones, which bitsandbytes is told to skip
(``llm_int8_skip_modules``). The training layer measures each module's sensitivity
(:mod:`runner.train.sensitivity`: the relative error of its *output* on calibration rows of the
job's data when its weight is nf4-rounded); this module turns the scores into a decision:

* the **budget** is what the GPU class leaves: its usable memory minus the rest of the
  estimate (the planner computes it, :func:`budget_bytes`), capped by
  ``quantization.dynamic_budget_mib`` when the spec sets one;
* modules are **ranked** by score (highest first; ties by name, so the choice is
  deterministic) and **kept** in that order while their extra bytes (16-bit minus nf4, as the
  estimator counts them: :func:`runner.plan.estimator.kept_module_extra_bytes`) still fit
  the budget; one that does not fit is passed over and the next, smaller one may still fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from runner.plan.estimator import TrainingShape, kept_module_extra_bytes
from runner.plan.shapes import ModelShape

MIB = 1024 * 1024


@dataclass(frozen=True)
class ModuleScore:
    """One linear module's sensitivity to nf4 and what keeping it in 16 bit costs.

    Attributes:
        name: Full module name in the loaded model (``model.layers.3.mlp.down_proj``).
        score: Relative output error under nf4 (higher = more sensitive).
        extra_bytes: GPU bytes keeping it in 16 bit adds over nf4.
    """

    name: str
    score: float
    extra_bytes: int


@dataclass(frozen=True)
class Selection:
    """The modules kept in 16 bit and why.

    Attributes:
        budget_bytes: What the kept modules may spend.
        kept: Kept modules, most sensitive first.
        ranking: Every scored module, most sensitive first.
        spent_bytes: Extra bytes of the kept modules (at most ``budget_bytes``).
    """

    budget_bytes: int
    kept: tuple[ModuleScore, ...]
    ranking: tuple[ModuleScore, ...]

    @property
    def spent_bytes(self) -> int:
        """Extra GPU bytes of the kept modules."""
        return sum(m.extra_bytes for m in self.kept)

    @property
    def skip_modules(self) -> tuple[str, ...]:
        """The kept modules' names, for bitsandbytes' skip list."""
        return tuple(m.name for m in self.kept)

    def as_dict(self) -> dict[str, Any]:
        """For the manifest and the logs."""
        return {
            "budget_bytes": self.budget_bytes,
            "spent_bytes": self.spent_bytes,
            "kept": [vars(m) for m in self.kept],
            "ranking": [vars(m) for m in self.ranking],
        }


def rank(scores: Sequence[ModuleScore]) -> tuple[ModuleScore, ...]:
    """Most sensitive first; equal scores in name order."""
    return tuple(sorted(scores, key=lambda m: (-m.score, m.name)))


def select(scores: Sequence[ModuleScore], budget_bytes: int) -> Selection:
    """Keep modules in ranking order while their extra bytes fit ``budget_bytes``."""
    ranking = rank(scores)
    kept: list[ModuleScore] = []
    left = max(0, budget_bytes)
    for m in ranking:
        if m.extra_bytes <= left:
            kept.append(m)
            left -= m.extra_bytes
    return Selection(max(0, budget_bytes), tuple(kept), ranking)


def budget_bytes(
    usable_bytes: int, rest_bytes: int, cap_mib: float | None, all_bytes: int
) -> int:
    """The bytes dynamic 4-bit may spend on modules kept in 16 bit.

    Args:
        usable_bytes: The class's usable memory (after the safety margin).
        rest_bytes: The estimate without any kept module (plain nf4 weights).
        cap_mib: ``quantization.dynamic_budget_mib``, or None for no cap.
        all_bytes: What keeping every linear module would cost (more is never spent).
    """
    budget = max(0, usable_bytes - rest_bytes)
    if cap_mib is not None:
        budget = min(budget, int(cap_mib * MIB))
    return min(budget, all_bytes)


def all_linear_extra_bytes(shape: ModelShape, t: TrainingShape) -> int:
    """What keeping every decoder linear module in 16 bit would add over nf4."""
    return shape.num_layers * sum(
        kept_module_extra_bytes(d_in * d_out, t) for d_in, d_out in shape.linear_dims().values()
    )
