"""A hostile FineTuneJob on a real control plane: marked Failed, and the others still reconciled.

The CRD's schema lets through what only our bounds reject (a 70 KiB model source, 1500 data
sources): the operator must fail that object with a condition naming the limit and go on
planning the good one created in the same run.
"""

from __future__ import annotations

from typing import Any

import pytest

from runner.k8s.operator import Operator
from runner.spec.bounds import DEFAULT_LIMITS
from tests.fixtures.kube import ControlPlane
from tests.test_k8s_operator import cond, crd, create_ftj, example, operator, wait_status

__all__ = ["crd", "operator"]  # fixtures used by name

pytestmark = [pytest.mark.k8s, pytest.mark.integration, pytest.mark.timeout(240)]


def hostile(name: str, **spec_changes: Any) -> dict[str, Any]:
    doc = example(name)
    for dotted, value in spec_changes.items():
        section, field = dotted.split("__")
        doc["spec"][section][field] = value
    return doc


def test_hostile_finetunejob_fails_and_the_other_is_still_planned(
    kube_control_plane: ControlPlane, kube_namespace: str, operator: Operator
) -> None:
    cp, ns = kube_control_plane, kube_namespace
    long_source = "s3://models/" + "m" * (DEFAULT_LIMITS.max_scalar_chars + 10)
    create_ftj(cp, ns, hostile("huge-value", model__source=long_source))
    many = [f"s3://data/shard-{i}.jsonl" for i in range(DEFAULT_LIMITS.max_items + 500)]
    create_ftj(cp, ns, hostile("huge-list", dataset__sources=many))
    create_ftj(cp, ns, example("good-one"))

    good = wait_status(cp, ns, "good-one", "Planned")
    assert cond(good, "Planned")["status"] == "True"
    for name, message in (
        ("huge-value", "spec.model.source: a value of"),
        ("huge-list", "spec.dataset.sources: more than 1000 entries"),
    ):
        failed = wait_status(cp, ns, name, "Failed")
        assert failed["reason"] == "InvalidSpec", failed
        assert message in failed["message"], failed["message"][:500]
        assert cond(failed, "Failed")["status"] == "True"
        assert "jobName" not in failed  # nothing was rendered for it
